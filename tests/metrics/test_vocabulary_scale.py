"""Vocabulary scale: C = 5,000 classes in D = 64 dimensions (C > D + 1), rare and absent classes, streamed.

The reference is the test's own, dense numpy in float64: full ``C x C`` matrices for the pair metrics and the
pseudo-inverse of ``Sigma_B`` (``D x D`` here) for NC1, on the features held in memory.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_neural_collapse import NCCMismatch, NeuralCollapse

CLASSES, DIM, SAMPLES = 5000, 64, 30_000


@pytest.fixture(scope="module")
def problem() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, CLASSES + 1) ** 1.1
    labels = rng.choice(CLASSES, size=SAMPLES, p=zipf / zipf.sum())
    centres = rng.standard_normal((CLASSES, DIM))
    features = 40.0 + centres[labels] + 0.3 * rng.standard_normal((SAMPLES, DIM))  # far from the origin
    weight = centres + 0.5 * rng.standard_normal((CLASSES, DIM))
    return {"features": features, "labels": labels, "weight": weight}


def dense_reference(features: np.ndarray, labels: np.ndarray, weight: np.ndarray) -> dict[str, float]:
    present = np.unique(labels)
    num = len(present)
    counts = np.bincount(labels, minlength=CLASSES)[present]
    sums = np.zeros((CLASSES, DIM))
    np.add.at(sums, labels, features)
    means = sums[present] / counts[:, None]
    centred = means - means.mean(axis=0)
    index = np.searchsorted(present, labels)
    resid = features - means[index]
    sigma_w = resid.T @ resid / len(labels)
    var = np.bincount(index, weights=(resid**2).sum(axis=1)) / counts
    sigma_b = centred.T @ centred / num
    eigvals, eigvecs = np.linalg.eigh(sigma_b)
    keep = eigvals > eigvals.max() * max(num, DIM) * np.finfo(np.float64).eps
    pinv = (eigvecs[:, keep] / eigvals[keep]) @ eigvecs[:, keep].T
    out = {"nc1": float(np.trace(sigma_w @ pinv)) / num}
    off = ~np.eye(num, dtype=bool)
    for name, rows in (("means", centred), ("weights", weight[present])):
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        cos = (unit @ unit.T)[off]
        out[f"nc2_equiangular_{name}"] = float(cos.std())
        out[f"nc2_maxangle_{name}"] = float(np.abs(cos + 1.0 / (num - 1)).mean())
        gram = rows @ rows.T
        target = (np.eye(num) - 1.0 / num) / math.sqrt(num - 1)
        out[f"nc2_etf_distance_{name}"] = float(np.linalg.norm(gram / np.linalg.norm(gram) - target))
        if name == "means":
            out["nc2_log_energy_means"] = float((-0.5 * np.log(2.0 - 2.0 * cos)).mean())
            sq = (centred**2).sum(axis=1)
            dist = (sq[:, None] + sq[None, :] - 2.0 * gram)[off]
            out["nc1_cdnv"] = float(((var[:, None] + var[None, :])[off] / (2.0 * dist)).mean())
    w = weight[present]
    classwise = (w * centred).sum(axis=1) / (np.linalg.norm(w, axis=1) * np.linalg.norm(centred, axis=1))
    out["nc3_cosine"] = float(classwise.mean())
    out["nc3_cosine_cov"] = float(classwise.std() / classwise.mean())
    out["present"] = float(num)
    return out


def test_streamed_metric_equals_the_dense_reference(problem: dict[str, np.ndarray]) -> None:
    features = torch.tensor(problem["features"], dtype=torch.float32)
    labels = torch.tensor(problem["labels"])
    weight = torch.tensor(problem["weight"], dtype=torch.float32)
    metric = NeuralCollapse(CLASSES, DIM)
    for start in range(0, SAMPLES, 4096):
        metric.update(features[start : start + 4096], labels[start : start + 4096])
    got = metric.compute(weight=weight)
    reference = dense_reference(features.double().numpy(), problem["labels"], weight.double().numpy())
    present = int(reference.pop("present"))
    assert 1000 < present < CLASSES  # rare classes, and absent ones
    assert int((metric.statistics().counts == 1).sum()) > 100  # classes seen once
    for key, value in reference.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key


def test_nc4_over_thousands_of_classes(problem: dict[str, np.ndarray]) -> None:
    features = torch.tensor(problem["features"][:6000])
    labels = torch.tensor(problem["labels"][:6000])
    weight = torch.tensor(problem["weight"])
    metric = NeuralCollapse(CLASSES, DIM)
    metric.update(features, labels)
    stats = metric.statistics()
    logits = features @ weight.T
    ncc = NCCMismatch(stats.means, stats.present)
    ncc.update(features, logits)
    means = stats.means.numpy()[stats.present.numpy()]
    ids = np.flatnonzero(stats.present.numpy())
    x = features.numpy()
    nearest = np.concatenate(
        [ids[((x[a : a + 1000, None, :] - means[None]) ** 2).sum(axis=2).argmin(axis=1)] for a in range(0, 6000, 1000)]
    )
    expected = float((logits.argmax(dim=1).numpy() != nearest).mean())
    assert ncc.compute() == pytest.approx(expected, abs=1e-12)

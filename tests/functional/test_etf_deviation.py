"""``functional.etf_deviation``: the fixed bins and what is counted in them, against NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_neural_collapse.functional import class_statistics
from lightning_neural_collapse.functional.etf_deviation import (
    BIN_WIDTH,
    CLASS_COSINE_EDGES,
    NORM_EDGES,
    Binned,
    centred_grid,
    cosine_edges,
    etf_deviation,
)


@pytest.mark.parametrize("num_classes", [2, 3, 10, 100, 50_257])
def test_cosine_bins_cover_the_range_and_centre_the_simplex_value(num_classes: int) -> None:
    edges = cosine_edges(num_classes).numpy()
    assert edges[0] <= -1.0 < edges[1] and edges[-2] < 1.0 <= edges[-1]
    assert np.allclose(np.diff(edges), BIN_WIDTH, rtol=0, atol=1e-12)
    ideal = -1.0 / (num_classes - 1)
    index = int(np.floor((ideal - edges[0]) / BIN_WIDTH))
    assert (edges[index] + edges[index + 1]) / 2 == pytest.approx(ideal, abs=1e-12)


def test_norm_and_class_cosine_bins() -> None:
    for edges, low, high in ((NORM_EDGES, 0.0, 2.0), (CLASS_COSINE_EDGES, -1.0, 1.0)):
        e = edges.numpy()
        assert e[0] <= low and e[-1] >= high and len(e) - 1 <= 802
        index = int(np.floor((1.0 - e[0]) / BIN_WIDTH))
        assert (e[index] + e[index + 1]) / 2 == pytest.approx(1.0, abs=1e-12)
    assert centred_grid(0.0, -0.01, 0.01, 0.01).tolist() == pytest.approx([-0.015, -0.005, 0.005, 0.015])


def test_counts_match_numpy_and_the_ends_take_what_lies_outside() -> None:
    values = torch.tensor([-3.0, 0.0, 0.51, 0.99, 2.5, float("nan"), float("inf")])
    edges = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    binned = Binned.count(values, edges)
    assert binned is not None
    finite = values[torch.isfinite(values)].double().numpy()
    expected, _ = np.histogram(np.clip(finite, 0.0, 1.0), bins=edges.numpy())
    assert binned.counts.tolist() == expected.tolist()
    assert (binned.total, binned.min, binned.max) == (5, -3.0, 2.5)
    assert binned.sum == pytest.approx(finite.sum()) and binned.sum_sq == pytest.approx((finite**2).sum())
    assert Binned.count(torch.tensor([float("nan")]), edges) is None


def test_etf_deviation_against_brute_force() -> None:
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(200, 6, generator=generator, dtype=torch.float64)
    labels = torch.arange(200) % 5
    weight = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    values = etf_deviation(class_statistics(features, labels), weight)
    assert set(values) == {"cosines_means", "norms_means", "cosines_weights", "norms_weights", "cosine_weight_mean"}
    means = torch.stack([features[labels == c].mean(0) for c in range(5)])
    centred = (means - means.mean(0)).numpy()
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True)
    cos = (unit @ unit.T)[~np.eye(5, dtype=bool)]
    expected, _ = np.histogram(cos, bins=cosine_edges(5).numpy())
    assert values["cosines_means"].counts.tolist() == expected.tolist() and values["cosines_means"].total == 20
    norms = np.linalg.norm(centred, axis=1)
    assert values["norms_means"].sum == pytest.approx((norms / norms.mean()).sum())
    w = weight.numpy()
    per_class = (w * centred).sum(1) / np.linalg.norm(w, axis=1) / norms
    assert values["cosine_weight_mean"].max == pytest.approx(per_class.max())
    assert values["cosine_weight_mean"].min == pytest.approx(per_class.min())


def test_a_simplex_etf_falls_in_the_ideal_bins() -> None:
    num_classes = 7
    etf = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes  # centred vertices, equal norms
    stats = class_statistics(etf.repeat(3, 1), torch.arange(num_classes).repeat(3))
    values = etf_deviation(stats, etf.clone())
    for name in values:
        assert int((values[name].counts > 0).sum()) == 1, name  # all in one bin: the ideal one
    (index,) = torch.nonzero(values["cosines_means"].counts).flatten().tolist()
    edges = values["cosines_means"].edges
    assert float(edges[index]) < -1.0 / (num_classes - 1) < float(edges[index + 1])

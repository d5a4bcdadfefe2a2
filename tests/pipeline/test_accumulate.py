"""``pipeline.accumulate``: one rank's sums over an epoch's training steps."""

from __future__ import annotations

import torch

from lightning_neural_collapse.functional import class_statistics, ncc_mismatch
from lightning_neural_collapse.pipeline.accumulate import COUNT_KEYS, Accumulator, Reference
from lightning_neural_collapse.pipeline.samples import samples_of


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(24) % 3
    features = 4 * torch.eye(3, 5)[labels] + torch.randn(24, 5, generator=g)
    logits = features[:, :3] + 0.5 * torch.randn(24, 3, generator=g)
    return features, logits, labels


def test_counts_and_skipped_samples() -> None:
    features, logits, labels = _batch()
    features[0, 1] = float("nan")
    logits[1, 0] = float("inf")  # non-finite logits count as skipped too
    labels = labels.clone()
    labels[2], labels[3] = 3, -1  # invalid (C) and ignored (-1)
    acc = Accumulator(3, 5, torch.device("cpu"), statistics=True)
    acc.add(samples_of(features, logits), labels)
    counts = {key: int(value) for key, value in acc.local_counts().items()}
    assert list(counts) == list(COUNT_KEYS)
    keep = torch.ones(24, dtype=torch.bool)
    keep[:4] = False
    errors = int((logits[keep].argmax(dim=1) != labels[keep]).sum())
    assert counts == {
        "errors": errors,
        "total": 20,
        "nonfinite": 2,
        "bad_label": 1,
        "ncc_mismatches": 0,
        "ncc_hits": 0,
        "ncc_total": 0,
    }
    assert acc.statistics is not None
    stats = acc.statistics.statistics()
    expected = class_statistics(features[keep].double(), labels[keep], 3)
    assert torch.allclose(stats.means, expected.means, atol=1e-12) and stats.counts.tolist() == expected.counts.tolist()
    assert acc.batches == 1


def test_counts_only_without_statistics() -> None:
    acc = Accumulator(3, 5, torch.device("cpu"), statistics=False)
    features, logits, labels = _batch()
    acc.add(samples_of(features, logits), labels)
    assert acc.statistics is None and acc.ncc is None and int(acc.local_counts()["total"]) == 24


def test_the_previous_means_shift_the_statistics_and_give_lagged_nc4() -> None:
    old_features, _, old_labels = _batch(seed=1)
    previous = class_statistics(old_features.double(), old_labels, 3)
    reference = Reference(previous.means, previous.present)
    features, logits, labels = _batch()
    acc = Accumulator(3, 5, torch.device("cpu"), statistics=True, reference=reference)
    acc.add(samples_of(features, logits), labels)
    assert acc.statistics is not None and torch.equal(acc.statistics.shift, previous.means)
    assert not bool(acc.statistics.shift_from_data.any())
    counts = acc.local_counts()
    expected = ncc_mismatch(features, previous.means, logits, previous.present)
    assert int(counts["ncc_total"]) == 24 and int(counts["ncc_mismatches"]) == round(expected * 24)
    nearest = torch.cdist(features.double(), previous.means).argmin(dim=1)  # every class is present
    assert int(counts["ncc_hits"]) == int((nearest == labels).sum())  # the held-out ncc_accuracy's count
    assert Accumulator(3, 5, torch.device("cpu"), statistics=True, reference=reference, lagged_ncc=False).ncc is None
    wrong_shape = Reference(torch.zeros(4, 5), torch.ones(4, dtype=torch.bool))
    assert Accumulator(3, 5, torch.device("cpu"), statistics=True, reference=wrong_shape).ncc is None


def test_ncc_samples_count_a_seeded_subsample_of_each_batch() -> None:
    old_features, _, old_labels = _batch(seed=1)
    previous = class_statistics(old_features.double(), old_labels, 3)
    reference = Reference(previous.means, previous.present)
    features, logits, labels = _batch()
    counts = []
    for _ in range(2):
        acc = Accumulator(3, 5, torch.device("cpu"), statistics=True, reference=reference, ncc_samples=5, ncc_seed=7)
        acc.add(samples_of(features, logits), labels)
        acc.add(samples_of(features[:3], logits[:3]), labels[:3])  # smaller than k: every sample
        counts.append({key: int(value) for key, value in acc.local_counts().items()})
    assert counts[0] == counts[1] and counts[0]["ncc_total"] == 5 + 3
    assert counts[0]["total"] == 24 + 3  # the error and the statistics see every sample

"""The streaming ``NeuralCollapse``, ``NCCMismatch`` and ``ClassificationError`` against the reference."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from reference import (
    ALL_KEYS,
    CASE_NAMES,
    CLASSIFIER_KEYS,
    FEATURE_KEYS,
    NC4_KEY,
    Case,
    assert_matches_reference,
    compare,
    gaussian_mixture,
    make_case,
    near_collapse,
    reference_for,
    reference_metrics,
)

from lightning_neural_collapse import ClassificationError, NCCMismatch, NeuralCollapse
from lightning_neural_collapse.functional import neural_collapse_metrics

CHUNK = 256


pytestmark = pytest.mark.usefixtures("one_thread")


def feed(metric: NeuralCollapse, features: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> None:
    for start in range(0, features.shape[0], chunk):
        metric.update(features[start : start + chunk], labels[start : start + chunk])


def stream(
    case: Case, dtype: torch.dtype = torch.float32, metric: NeuralCollapse | None = None
) -> tuple[NeuralCollapse, dict[str, float]]:
    """Feed ``case`` in chunks, then NC4 in a second pass through ``NCCMismatch``; all keys."""
    metric = metric if metric is not None else NeuralCollapse(case.num_classes, case.dim)
    features = torch.tensor(case.features, dtype=dtype)
    labels = torch.tensor(case.labels)
    weight = torch.tensor(case.weight, dtype=dtype)
    bias = torch.tensor(case.bias, dtype=dtype)
    feed(metric, features, labels)
    feature_only = metric.compute()
    assert set(feature_only) <= set(FEATURE_KEYS)
    values = metric.compute(weight=weight)
    assert {k: values[k] for k in feature_only} == feature_only
    stats = metric.statistics()
    ncc = NCCMismatch(stats.means, stats.present)
    for start in range(0, features.shape[0], CHUNK):
        h = features[start : start + CHUNK]
        ncc.update(h, h @ weight.T + bias)
    values[NC4_KEY] = ncc.compute()
    return metric, values


@pytest.mark.parametrize(
    ("name", "dtype"),
    [pytest.param(n, torch.float32, id=f"{n}-float32") for n in CASE_NAMES]
    # float64 input as well, but the float32 run alone covers the large case (keeps the suite fast)
    + [pytest.param(n, torch.float64, id=f"{n}-float64") for n in CASE_NAMES if n != "large_c100_d256"],
)
def test_streaming_matches_reference(name: str, dtype: torch.dtype) -> None:
    case = make_case(name)
    _, values = stream(case, dtype)
    assert_matches_reference(values, reference_for(name), len(case.labels), float32=dtype == torch.float32)


def test_statistics_match_functional() -> None:
    case = make_case("missing_class_c6_d8")
    metric, _ = stream(case, torch.float64)
    stats = metric.statistics()
    assert stats.counts.tolist() == np.bincount(case.labels, minlength=6).tolist()
    assert not stats.present[2]
    got = metric.compute(weight=torch.tensor(case.weight))
    expected = neural_collapse_metrics(
        torch.tensor(case.features), torch.tensor(case.labels), torch.tensor(case.weight)
    )
    expected.pop(NC4_KEY)
    assert not compare(got, expected, 1e-10, floor=1e-6)


@pytest.mark.parametrize("shift", ["common", "from data"])
@pytest.mark.parametrize("name", ["gmm_c10_d64", "missing_class_c6_d8", "near_collapse_c10_d32"])
def test_summed_states_equal_one_metric(name: str, shift: str) -> None:
    """Adding every state of one metric into another (what a DDP all-reduce does) equals one metric: directly when
    both use the same shift, after rewriting both to the zero shift (what a sync does) when each took its own."""
    case = make_case(name)
    features = torch.tensor(case.features, dtype=torch.float32)
    labels = torch.tensor(case.labels)
    # uneven shards, the second one missing class 0 entirely
    first = torch.zeros(len(labels), dtype=torch.bool)
    first[: len(labels) // 3] = True
    first |= labels == 0
    parts = []
    common = torch.randn(case.num_classes, case.dim, generator=torch.Generator().manual_seed(3))
    for mask in (first, ~first):
        metric = NeuralCollapse(case.num_classes, case.dim)
        if shift == "common":
            metric.set_shift(common)
        feed(metric, features[mask], labels[mask])
        if shift == "from data":
            assert bool(metric.shift_from_data.any())
            metric._to_zero_shift()
        parts.append(metric)
    assert parts[1].statistics().counts[0] == 0
    whole = NeuralCollapse(case.num_classes, case.dim)
    feed(whole, features, labels)
    for state in parts[0]._defaults:
        getattr(parts[0], state).add_(getattr(parts[1], state))
    weight = torch.tensor(case.weight)
    summed, single = parts[0].compute(weight=weight), whole.compute(weight=weight)
    assert set(summed) == set(single)
    assert not compare(summed, single, 1e-9, floor=1e-6)
    assert torch.equal(parts[0].statistics().counts, whole.statistics().counts)


def test_compute_with_other_weight_is_not_cached() -> None:
    case = make_case("gmm_c10_d64")
    metric, _ = stream(case)
    w1 = torch.tensor(case.weight)
    w2 = w1 + torch.randn(w1.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    first, second, again = metric.compute(weight=w1), metric.compute(weight=w2), metric.compute(weight=w1)
    assert first == again
    assert all(first[k] == second[k] for k in FEATURE_KEYS)
    assert all(first[k] != second[k] for k in CLASSIFIER_KEYS)
    ref2 = reference_metrics(case.features, case.labels, w2.numpy(), num_classes=case.num_classes)
    tolerances = {**dict.fromkeys(FEATURE_KEYS, 1e-5), **dict.fromkeys(CLASSIFIER_KEYS, 1e-3)}
    assert not compare(second, ref2, tolerances, floor=1e-6, keys=FEATURE_KEYS + CLASSIFIER_KEYS)


def _last_means(case: Case, features: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Class means of a previous pass, slightly off (as last epoch's means would be)."""
    metric = NeuralCollapse(case.num_classes, case.dim)
    feed(metric, features, torch.tensor(case.labels))
    means = metric.statistics().means
    noise = torch.randn(means.shape, generator=torch.Generator().manual_seed(1), dtype=means.dtype)
    return (means + 0.05 * noise).to(dtype)


@pytest.mark.parametrize("name", ["gmm_c10_d64", "near_collapse_c10_d32", "missing_class_c6_d8"])
def test_shift_changes_nothing_in_float64(name: str) -> None:
    case = make_case(name)
    features = torch.tensor(case.features, dtype=torch.float32)
    weight = torch.tensor(case.weight)
    plain = NeuralCollapse(case.num_classes, case.dim)
    feed(plain, features, torch.tensor(case.labels))
    shifted = NeuralCollapse(case.num_classes, case.dim)
    shifted.set_shift(_last_means(case, features))
    feed(shifted, features, torch.tensor(case.labels))
    a, b = plain.compute(weight=weight), shifted.compute(weight=weight)
    assert set(a) == set(b) == set(FEATURE_KEYS + CLASSIFIER_KEYS)
    assert not compare(b, a, 1e-8, floor=1e-6)
    assert torch.allclose(plain.statistics().means, shifted.statistics().means, rtol=0, atol=1e-10)


@pytest.mark.parametrize("sum_dtype", [torch.float64, torch.float32], ids=["float64 sums", "float32 sums"])
@pytest.mark.parametrize("explicit", [False, True], ids=["fresh metric", "explicit shift"])
def test_float32_products_are_accurate_near_collapse(explicit: bool, sum_dtype: torch.dtype) -> None:
    """Means of norm ~1000, within-class std 0.02: float32 products of unshifted features cancel catastrophically
    (checked below on the same data); a fresh float32 metric takes each class's first sample as its shift, so its
    first measurement is as accurate as one with the previous means as shift."""
    case = near_collapse(10, 32, seed=21, norm=1000.0)
    features = torch.tensor(case.features, dtype=torch.float32)
    labels = torch.tensor(case.labels)
    # reference on exactly the float32 values the metric sees, so only the accumulation differs
    ref = reference_metrics(features.double().numpy(), case.labels, num_classes=case.num_classes)

    metric = NeuralCollapse(case.num_classes, case.dim, accumulate_dtype=torch.float32, sum_dtype=sum_dtype)
    if explicit:
        metric.set_shift(_last_means(case, features, torch.float32))
    feed(metric, features, labels)
    assert metric.shifted_gram.dtype == sum_dtype and metric.shift.dtype == torch.float32
    assert bool(metric.shift_from_data.any()) != explicit
    got = metric.compute()
    problems = compare(got, ref, {**dict.fromkeys(FEATURE_KEYS, 1e-5)}, floor=1e-6)
    assert not problems, problems

    # the same accumulation without a shift: float32 products summed in float64 are far off
    gram = torch.zeros(case.dim, case.dim, dtype=torch.float64)
    for start in range(0, len(labels), 256):
        chunk = features[start : start + 256]
        gram += (chunk.T @ chunk).double()
    means = torch.zeros(case.num_classes, case.dim, dtype=torch.float64).index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=case.num_classes).double()
    within = (gram - (means.T / counts) @ means) / len(labels)
    exact = metric.statistics().within_cov
    assert float((within - exact).norm() / exact.norm()) > 1e-2


def test_set_shift_rules() -> None:
    metric = NeuralCollapse(3, 2)
    with pytest.raises(ValueError):
        metric.set_shift(torch.zeros(2, 2))
    metric.set_shift(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [5.0, 5.0]]), torch.tensor([True, True, False]))
    assert metric.shift.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]  # non-finite and absent rows: zero
    metric.update(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(RuntimeError):
        metric.set_shift(torch.zeros(3, 2))
    metric.reset()
    metric.set_shift(torch.ones(3, 2))


def _clean_metric(case: Case, keep: np.ndarray, **kwargs: object) -> dict[str, float]:
    metric = NeuralCollapse(case.num_classes, case.dim, **kwargs)  # type: ignore[arg-type]
    feed(metric, torch.tensor(case.features[keep]), torch.tensor(case.labels[keep]))
    return metric.compute(weight=torch.tensor(case.weight))


def test_nonfinite_features_are_skipped_and_counted() -> None:
    case = make_case("gmm_c10_d64")
    features = torch.tensor(case.features)
    bad = np.zeros(len(case.labels), dtype=bool)
    bad[[3, 50, 51, 700]] = True
    features[3, 0] = float("nan")
    features[50, :] = float("nan")
    features[51, 7] = float("inf")
    features[700, 63] = -float("inf")
    metric = NeuralCollapse(case.num_classes, case.dim)
    feed(metric, features, torch.tensor(case.labels))
    got = metric.compute(weight=torch.tensor(case.weight))
    assert all(math.isfinite(v) for v in got.values())
    assert metric.skipped() == {"nonfinite": 4, "bad_label": 0}
    assert metric.statistics().num_samples == len(case.labels) - 4
    assert not compare(got, _clean_metric(case, ~bad), 1e-12, floor=1e-6)


def test_out_of_range_labels_are_counted() -> None:
    case = make_case("gmm_c10_d64")
    labels = torch.tensor(case.labels)
    bad = np.zeros(len(labels), dtype=bool)
    bad[[0, 10, 20, 30, 40]] = True
    labels[[0, 10]] = 10
    labels[20] = 1000
    labels[[30, 40]] = -1
    metric = NeuralCollapse(case.num_classes, case.dim)
    feed(metric, torch.tensor(case.features), labels)
    assert metric.skipped() == {"nonfinite": 0, "bad_label": 5}
    got = metric.compute(weight=torch.tensor(case.weight))
    assert not compare(got, _clean_metric(case, ~bad), 1e-12, floor=1e-6)


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index_is_dropped_silently(ignore_index: int) -> None:
    """Out of range (-100) or a real class (3): those samples are dropped and counted nowhere."""
    case = make_case("gmm_c10_d64")
    labels = torch.tensor(case.labels)
    if ignore_index < 0:
        dropped = np.arange(len(labels)) % 7 == 0
        labels[torch.from_numpy(dropped)] = ignore_index
    else:
        dropped = case.labels == ignore_index
    features = torch.tensor(case.features)
    features[int(np.flatnonzero(dropped)[0]), 0] = float("nan")  # ignored: not counted as non-finite either
    bad = int(np.flatnonzero(~dropped)[0])
    labels[bad] = -1  # one genuinely bad label for comparison
    metric = NeuralCollapse(case.num_classes, case.dim, ignore_index=ignore_index)
    feed(metric, features, labels)
    assert metric.skipped() == {"nonfinite": 0, "bad_label": 1}
    keep = ~dropped
    keep[bad] = False
    stats = metric.statistics()
    assert stats.num_samples == int(keep.sum())
    if ignore_index >= 0:
        assert not bool(stats.present[ignore_index])
    got = metric.compute(weight=torch.tensor(case.weight))
    assert not compare(got, _clean_metric(case, keep), 1e-12, floor=1e-6)


def test_ncc_mismatch_skips_nonfinite_and_respects_present() -> None:
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    metric = NCCMismatch(means, torch.tensor([True, True, False]))
    features = torch.tensor([[6.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [4.0, 0.0]])
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    metric.update(features, logits)
    # NCC picks 1, 0, -, 0 (class 2 is absent); network picks 2, 0, -, 1
    assert (float(metric.mismatches), float(metric.total)) == (2.0, 3.0)
    assert metric.compute() == pytest.approx(2 / 3)


def test_ncc_label_hits_count_the_nearest_mean_equal_to_the_label() -> None:
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
    metric = NCCMismatch(means, torch.tensor([True, True, False]))
    features = torch.tensor([[6.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [4.0, 0.0], [9.0, 0.0]])
    decisions = torch.tensor([1, 0, 0, 1, 1])
    labels = torch.tensor([1, 1, 0, 0, 1])  # nearest: 1, 0, -, 0, 1 -> hits at 0, 3, 4
    metric.update_decisions(features, decisions, labels=labels)
    assert (int(metric.label_hits), int(metric.total), int(metric.mismatches)) == (3, 4, 1)
    assert metric.accuracy() == pytest.approx(3 / 4) and metric.compute() == pytest.approx(1 / 4)
    counted = torch.tensor([True, True, True, False, True])  # the caller's mask (ignore_index, a bad label)
    masked = NCCMismatch(means, torch.tensor([True, True, False]))
    masked.update_decisions(features, decisions, counted, labels=labels)
    assert (int(masked.label_hits), int(masked.total)) == (2, 3)
    assert math.isnan(NCCMismatch(means).accuracy())  # nothing seen
    plain = NCCMismatch(means)
    plain.update(features[:2], torch.eye(3)[:2])  # no labels: no hits, the mismatch as before
    assert int(plain.label_hits) == 0 and int(plain.total) == 2


def test_classification_error_counts() -> None:
    err = ClassificationError(num_classes=3)
    logits = torch.tensor(
        [
            [2.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 5.0],
            [1.0, 0.0, 0.0],
            [float("nan"), 0.0, 0.0],
            [0.0, 0.0, 1.0],
        ]
    )
    labels = torch.tensor([0, 2, 2, 3, 1, -100])  # correct, wrong, correct, bad label, nan logits, bad label
    err.update(logits, labels)
    assert err.counts() == (1, 3)
    assert err.compute() == pytest.approx(1 / 3)
    err.update(torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([0]))
    assert err.counts() == (2, 4) and err.compute() == 0.5
    err.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        assert math.isnan(err.compute())


def test_metric_outputs_every_key_of_the_spec() -> None:
    case = gaussian_mixture(4, 6, [10, 20, 30, 40], seed=31, name="c4_d6")
    _, values = stream(case, torch.float64)
    assert set(values) == set(ALL_KEYS)


def test_statistics_are_a_snapshot() -> None:
    case = make_case("gmm_c10_d64")
    metric, _ = stream(case)
    stats = metric.statistics()
    frozen = [t.clone() for t in (stats.counts, stats.means, stats.within_cov, stats.variances)]
    feed(metric, torch.tensor(case.features), torch.tensor(case.labels))  # the same data again
    for before, after in zip(frozen, (stats.counts, stats.means, stats.within_cov, stats.variances), strict=True):
        assert torch.equal(before, after)
    assert float(metric.statistics().counts.sum()) == 2 * float(stats.counts.sum())


def test_counts_are_integers_and_the_states_float64_by_default() -> None:
    metric = NeuralCollapse(3, 2)
    assert metric.count.dtype == torch.long and metric.skipped_nonfinite.dtype == torch.long
    assert metric.shifted_gram.dtype == torch.float64 and metric.shift.dtype == torch.float64
    low = NeuralCollapse(3, 2, accumulate_dtype=torch.float32, sum_dtype=torch.float32)  # no float64 at all (MPS)
    assert not any(t.dtype == torch.float64 for t in (*low.local_states().values(), low.shift))
    with pytest.raises(ValueError, match="`sum_dtype`"):
        NeuralCollapse(3, 2, sum_dtype=torch.float16)


def test_each_class_takes_its_first_sample_as_shift() -> None:
    metric = NeuralCollapse(3, 2)
    metric.update(torch.tensor([[5.0, 5.0], [7.0, 7.0], [1.0, 2.0], [9.0, 9.0]]), torch.tensor([0, 0, 2, 5]))
    assert metric.shift.tolist() == [[5.0, 5.0], [0.0, 0.0], [1.0, 2.0]]  # class 1 not seen, label 5 invalid
    assert metric.shift_from_data.tolist() == [True, False, True]
    metric.update(torch.tensor([[3.0, 3.0], [4.0, 4.0]]), torch.tensor([0, 1]))
    assert metric.shift.tolist() == [[5.0, 5.0], [4.0, 4.0], [1.0, 2.0]]  # class 0 keeps its shift
    means = metric.statistics().means
    assert means.tolist() == [[5.0, 5.0], [4.0, 4.0], [1.0, 2.0]]


def test_nonfinite_rows_and_float32_overflow_are_skipped_and_counted() -> None:
    """A NaN/Inf feature, or one whose ||h - s||^2 overflows float32, is left out and counted, never summed."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(12, 4, generator=g)
    labels = torch.arange(12) % 3
    bad = features.clone()
    bad[1, 2], bad[5, 0], bad[7, 3] = float("nan"), float("inf"), 3e19  # 3e19 squared overflows float32
    for dtype in (torch.float32, torch.float64):
        metric = NeuralCollapse(3, 4, accumulate_dtype=dtype)
        metric.update(bad, labels)
        keep = torch.ones(12, dtype=torch.bool)
        keep[[1, 5]] = False
        if dtype == torch.float32:
            keep[7] = False
        assert metric.skipped() == {"nonfinite": int((~keep).sum()), "bad_label": 0}
        stats = metric.statistics()
        if dtype == torch.float32:
            clean = NeuralCollapse(3, 4)
            clean.update(features[keep], labels[keep])
            assert torch.allclose(stats.within_cov, clean.statistics().within_cov, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(stats.means).all() and torch.isfinite(stats.within_cov).all()


def test_shifts_from_the_data_per_class_and_per_sample() -> None:
    """Both routes of the first-sample shift (C <= B per class, C > B per sample) give the same statistics; a
    class whose first sample is NaN takes its first finite one."""
    g = torch.Generator().manual_seed(1)
    means = 1e3 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 0])
    features = means[labels] + 1e-3 * torch.randn(14, 5, generator=g, dtype=torch.float64)
    features[0, 0] = float("nan")  # class 0's first sample
    expected = NeuralCollapse(6, 5)
    for start in range(0, 14, 14):
        expected.update(features[start : start + 14], labels[start : start + 14])
    small_batches = NeuralCollapse(6, 5)  # C = 6 > B = 4: the per-sample route
    for start in range(0, 14, 4):
        small_batches.update(features[start : start + 4], labels[start : start + 4])
    a, b = expected.statistics(), small_batches.statistics()
    assert torch.allclose(a.means, b.means, rtol=1e-12) and torch.allclose(
        a.within_cov, b.within_cov, rtol=1e-9, atol=1e-12
    )
    assert bool(expected.shift_set.all()) and float(expected.shift[0].abs().sum()) > 0  # a later sample of 0
    assert expected.skipped()["nonfinite"] == 1

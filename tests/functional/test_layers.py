"""Per-layer math (``functional/layers.py``) against brute force float64 with ``D x D`` matrices, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference import layer_reference

from lightning_neural_collapse.functional.layers import (
    MeanStatistics,
    depth_fit,
    mean_statistics,
    nc1_directions,
    projected_nc1,
    statistics_values,
    trace_ratio,
)


def sample(num_classes: int, dim: int, num: int = 120, seed: int = 0, spread: float = 0.5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(num) % num_classes
    return centres[labels] + spread * torch.randn(num, dim, generator=g, dtype=torch.float64), labels


def nc1_through_projection(h: torch.Tensor, y: torch.Tensor, num_classes: int, centres: torch.Tensor) -> float:
    stats = mean_statistics(h, y, num_classes)
    p = nc1_directions(stats.means, stats.present)
    z = (h - centres[y]) @ p.T
    counts = torch.bincount(y, minlength=num_classes).double()
    return projected_nc1(z.square().sum(), counts, stats.means, centres, p)


@pytest.mark.parametrize(
    ("num_classes", "dim"), [(4, 10), (10, 3), (5, 4), (3, 200)], ids=["C<D", "C>D", "C=D+1", "wide"]
)
def test_every_key_equals_the_brute_force_reference(num_classes: int, dim: int) -> None:
    h, y = sample(num_classes, dim)
    expected = layer_reference(h.numpy(), y.numpy(), num_classes)
    stats = mean_statistics(h, y, num_classes)
    values = statistics_values(stats)
    for key, value in values.items():
        assert value == pytest.approx(expected[key], rel=1e-9), key
    assert nc1_through_projection(h, y, num_classes, stats.means) == pytest.approx(expected["nc1"], rel=1e-9)


def test_nc1_against_other_centres_needs_only_the_correction() -> None:
    """Online mode: samples measured against the previous means give the same NC1 through the same P."""
    h, y = sample(4, 6)
    stats = mean_statistics(h, y, 4)
    exact = nc1_through_projection(h, y, 4, stats.means)
    elsewhere = stats.means + torch.randn(stats.means.shape, dtype=torch.float64)
    assert nc1_through_projection(h, y, 4, elsewhere) == pytest.approx(exact, rel=1e-10)


def test_scale_invariance_and_class_permutation() -> None:
    h, y = sample(5, 8)
    base = statistics_values(mean_statistics(h, y, 5))
    scaled = statistics_values(mean_statistics(7.5 * h, y, 5))
    perm = torch.tensor([3, 0, 4, 1, 2])
    permuted = statistics_values(mean_statistics(h, perm[y], 5))
    for key, value in base.items():
        assert scaled[key] == pytest.approx(value, rel=1e-9), key
        assert permuted[key] == pytest.approx(value, rel=1e-9), key
    stats = mean_statistics(h, y, 5)
    assert nc1_through_projection(7.5 * h, y, 5, 7.5 * stats.means) == pytest.approx(
        nc1_through_projection(h, y, 5, stats.means), rel=1e-9
    )


def test_a_simplex_etf_without_spread_scores_zero() -> None:
    etf = torch.eye(4, dtype=torch.float64) - 0.25
    h, y = etf.repeat(3, 1), torch.arange(12) % 4
    values = statistics_values(mean_statistics(h, y, 4))
    assert all(abs(value) < 1e-12 for value in values.values()), values
    assert nc1_through_projection(h, y, 4, etf) == pytest.approx(0.0, abs=1e-24)


def test_absent_classes_are_left_out() -> None:
    h, y = sample(3, 5)
    with_gap = mean_statistics(h, torch.tensor([0, 2, 3])[y], 4)  # class 1 never occurs
    plain = statistics_values(mean_statistics(h, y, 3))
    assert statistics_values(with_gap) == pytest.approx(plain, rel=1e-12)
    assert nc1_directions(with_gap.means, with_gap.present).shape == (2, 5)


def test_trace_ratio_and_undefined_cases() -> None:
    one = MeanStatistics(torch.tensor([3.0, 0.0]), torch.zeros(2, 2, dtype=torch.float64), torch.ones(2))
    assert math.isnan(trace_ratio(one))
    assert statistics_values(one) == {}
    assert nc1_directions(one.means, one.present).shape == (0, 2)
    assert math.isnan(projected_nc1(1.0, torch.tensor([1.0, 0.0]), one.means, one.means, torch.zeros(0, 2)))


def test_depth_fit_is_least_squares_with_pearson_r() -> None:
    values = [5.0, 2.0, 1.5, 0.2]
    fit = depth_fit(values)
    assert fit is not None
    x, logs = np.arange(4.0), np.log(values)
    assert fit.slope == pytest.approx(np.polyfit(x, logs, 1)[0], rel=1e-12)
    assert fit.ratio == pytest.approx(math.exp(fit.slope))
    assert fit.pearson_r == pytest.approx(np.corrcoef(x, logs)[0, 1], rel=1e-12)
    assert depth_fit([1.0]) is None and depth_fit([1.0, float("nan"), 0.0]) is None
    two = depth_fit([4.0, 1.0])
    assert two is not None and math.isnan(two.pearson_r) and two.ratio == pytest.approx(0.25)

"""Streaming per-layer metrics: batch by batch equals one pass in float64; shifts, skips and NCC."""

from __future__ import annotations

import pytest
import torch

from lightning_neural_collapse.functional.layers import mean_statistics, nc1_directions, projected_nc1
from lightning_neural_collapse.metrics.layer import LayerMoments, LayerProjection


def data(seed: int = 0, offset: float = 1e4) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight classes around large means: the regime where unshifted float32 sums cancel."""
    g = torch.Generator().manual_seed(seed)
    centres = offset + 3.0 * torch.randn(3, 16, generator=g, dtype=torch.float64)
    labels = torch.arange(90) % 3
    return centres[labels] + 1e-2 * torch.randn(90, 16, generator=g, dtype=torch.float64), labels


@pytest.mark.parametrize(("offset", "shifted", "float32"), [(1.0, False, False), (1e4, True, False), (1e4, True, True)])
def test_moments_in_batches_equal_one_float64_pass(offset: float, shifted: bool, float32: bool) -> None:
    """Near the previous means (the shift), tight classes around means of 1e4 stay exact, float32 inputs too."""
    h, y = data(offset=offset)
    if float32:
        h = h.float().double()  # the reference sees the same rounded inputs
    reference = mean_statistics(h, y, 3)
    metric = LayerMoments(3, 16, reference.means + 0.05 if shifted else None)
    for rows in torch.split(torch.arange(90), 32):
        metric.update(h[rows].float() if float32 else h[rows], y[rows])
    stats = metric.statistics()
    assert torch.equal(stats.counts, reference.counts)
    assert torch.allclose(stats.means, reference.means, rtol=1e-12)
    assert torch.allclose(stats.variances, reference.variances, rtol=1e-9)


def test_without_a_shift_large_means_cancel() -> None:
    """Why the shift exists: at means of 1e4 and a spread of 1e-2, unshifted float64 sums lose about 1e-4."""
    h, y = data(offset=1e4)
    reference = mean_statistics(h, y, 3)
    metric = LayerMoments(3, 16)
    metric.update(h, y)
    error = ((metric.statistics().variances - reference.variances).abs() / reference.variances).max()
    assert error > 1e-9


def test_moments_skip_non_finite_rows_ignored_labels_and_uncounted_samples() -> None:
    h = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0], [5.0, 6.0]])
    metric = LayerMoments(2, 2)
    metric.update(h, torch.tensor([0, 0, -1, 1]), counted=torch.tensor([True, True, True, False]))
    stats = metric.statistics()
    assert stats.counts.tolist() == [1.0, 0.0] and int(metric.skipped) == 1
    with pytest.raises(ValueError, match="features must have shape"):
        metric.update(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_projection_counts_ncc_and_gives_nc1_through_p() -> None:
    h, y = data(offset=0.0)
    stats = mean_statistics(h, y, 3)
    p = nc1_directions(stats.means, stats.present)
    metric = LayerProjection(stats.means, stats.present, p)
    for rows in torch.split(torch.arange(90), 25):
        metric.update(h[rows], y[rows])
    z = (h - stats.means[y]) @ p.T
    expected = projected_nc1(z.square().sum(), stats.counts, stats.means, stats.means, p)
    nc1, accuracy = metric.values(stats.means)
    assert nc1 == pytest.approx(expected, rel=1e-12)
    nearest = torch.cdist(h, stats.means).argmin(dim=1)
    assert accuracy == float((nearest == y).double().mean())


def test_projection_without_directions_counts_ncc_only_and_skips_absent_centres() -> None:
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [9.0, 9.0]])
    metric = LayerProjection(centres, torch.tensor([True, True, False]))
    metric.update(torch.tensor([[0.5, 0.0], [3.0, 0.0], [8.0, 8.0]]), torch.tensor([0, 0, 2]))
    nc1, accuracy = metric.values(None)
    assert nc1 != nc1  # nan: no directions
    assert accuracy == pytest.approx(1 / 3)  # class 2 has no centre: its sample's nearest is class 1

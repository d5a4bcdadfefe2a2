"""NC1 from the SVD of the centred means: accurate when the means are ill-conditioned, and honest about rank."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from lightning_neural_collapse.functional import nc1


def _means(singular: list[float], dim: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Centred means (rows summing to zero) ``U diag(s) V^T`` with known right singular vectors ``V``."""
    num = len(singular) + 1
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.cat([torch.ones(num, 1), torch.randn(num, num - 1, generator=g)], dim=1).double())[0]
    u = basis[:, 1:]  # orthonormal and orthogonal to the ones vector: the rows sum to zero
    v = torch.linalg.qr(torch.randn(dim, num - 1, generator=g).double())[0]
    return u @ torch.diag(torch.tensor(singular, dtype=torch.float64)) @ v.T, v


def test_ill_conditioned_means_keep_every_direction() -> None:
    """Singular values down to 1e-9 of the largest: an eigendecomposition of the Gram (1e-18) would drop the last
    direction below its tolerance and miss almost all of NC1; the SVD keeps it."""
    singular = [1.0, 1e-3, 1e-9]
    means, v = _means(singular)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 10, generator=g).double()
    within = a @ a.T / 10 * 1e-20  # tiny within-class spread, as in collapse
    expected = sum(float(v[:, i] @ within @ v[:, i]) / s**2 for i, s in enumerate(singular))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank: no warning
        assert nc1(within, means) == pytest.approx(expected, rel=1e-6)
    gram_eigenvalues = torch.linalg.eigvalsh(means @ means.T)
    assert float(gram_eigenvalues[-3] / gram_eigenvalues[-1]) < 1e-15  # what the Gram route would have dropped


def test_a_short_rank_is_warned_and_not_inverted() -> None:
    means, v = _means([2.0, 1.0, 1.0])
    means[3] = means[2]  # two classes share a mean: rank 2 of the min(C-1, D) = 3 possible
    means = means - means.mean(dim=0)
    within = torch.eye(10, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"4 classes span only 2 of the min\(C-1, D\) = 3"):
        value = nc1(within, means)
    assert math.isfinite(value) and 0 < value < 10


def test_fewer_dimensions_than_classes_need() -> None:
    means = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # D = 2 < C - 1 = 3: rank min(C-1, D) = 2 is full
        value = nc1(0.5 * torch.eye(2, dtype=torch.float64), means)
    assert value == pytest.approx(0.5 / 2 + 0.5 / 2)  # s^2 = 2 in both directions
    assert math.isnan(nc1(torch.eye(2), torch.zeros(3, 2)))
    assert math.isnan(nc1(torch.eye(2), torch.ones(1, 2)))

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


def test_ill_conditioned_means_keep_full_precision() -> None:
    """Singular values down to 1e-6 of the largest: the Gram's eigenvalue 1e-12 is kept by the tolerance, but an
    eigendecomposition of the Gram gets it only to about 2e-16 absolute (1e-4 relative); the SVD to full precision."""
    singular = [1.0, 1e-3, 1e-6]
    means, v = _means(singular)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(10, 10, generator=g).double()
    within = a @ a.T / 10 * 1e-20  # tiny within-class spread, as in collapse
    expected = sum(float(v[:, i] @ within @ v[:, i]) / s**2 for i, s in enumerate(singular))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full rank: no warning
        assert nc1(within, means) == pytest.approx(expected, rel=1e-6)
    # the route it replaces, an eigendecomposition of the C x C Gram, loses the small direction's digits
    eigenvalues, vectors = torch.linalg.eigh(means @ means.T)
    directions = vectors[:, -3:].T @ means
    gram_route = float((((directions @ within) * directions).sum(dim=1) / eigenvalues[-3:].square()).sum())
    assert abs(gram_route / expected - 1) > 1e-5
    dropped = _means([1.0, 1e-3, 1e-9])[0]  # below the tolerance: inverted no more, and said so
    with pytest.warns(RuntimeWarning, match="span only 2 of"):
        assert math.isfinite(nc1(within, dropped))


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

"""``functional.pairs``: the tiled pair pass gives the same numbers whatever the tile, and the right histogram."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_neural_collapse.functional.pairs import COSINE_EDGES, pair_sums, tile_rows


def _vectors(num: int = 23, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(num, dim, generator=g, dtype=torch.float64)
    return v - v.mean(dim=0), torch.rand(num, generator=g, dtype=torch.float64)


def _dense(v: torch.Tensor, var: torch.Tensor) -> dict[str, float]:
    """The same quantities from the full ``C x C`` matrices (numpy, explicit)."""
    x, w = v.numpy(), var.numpy()
    num = len(x)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    off = ~np.eye(num, dtype=bool)
    gram = x @ x.T
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(axis=2)
    target = (np.eye(num) - 1.0 / num) / math.sqrt(num - 1)
    dist = np.linalg.norm(unit[:, None, :] - unit[None, :, :], axis=2)
    return {
        "equiangular": float(cos[off].std()),
        "max_angle": float(np.abs(cos[off] + 1.0 / (num - 1)).mean()),
        "etf_distance": float(np.linalg.norm(gram / np.linalg.norm(gram) - target)),
        "cdnv": float(((w[:, None] + w[None, :]) / (2 * np.where(off, sq, 1.0)))[off].mean()),
        "log_energy": float(-np.log(dist[off]).mean()),
    }


@pytest.mark.parametrize("tile", [1, 4, 7, 23, None])
def test_every_tile_gives_the_dense_numbers(tile: int | None) -> None:
    v, var = _vectors()
    sums = pair_sums(v, var, tile=tile)
    dense = _dense(v, var)
    assert sums.count == 23 * 22
    for name, value in dense.items():
        assert getattr(sums, name)() == pytest.approx(value, rel=1e-12), name


@pytest.mark.parametrize(("num", "tile"), [(200, None), (3000, 1100)])
def test_float32_tiles_agree_with_float64_ones(num: int, tile: int | None) -> None:
    # millions of pairs per tile: a reduction that is not cascaded (vector_norm in float32) drifts to 1e-3 here
    v, var = _vectors(num, 16)
    exact = pair_sums(v, var, edges=COSINE_EDGES, tile=tile)
    fast = pair_sums(v, var, edges=COSINE_EDGES, dtype=torch.float32, tile=tile)
    for name in ("equiangular", "max_angle", "etf_distance", "cdnv", "log_energy"):
        assert getattr(fast, name)() == pytest.approx(getattr(exact, name)(), rel=1e-6), name
    assert fast.histogram is not None and exact.histogram is not None
    assert int(fast.histogram.sum()) == int(exact.histogram.sum()) == num * (num - 1)
    assert (fast.histogram - exact.histogram).abs().sum() <= 1e-4 * num * num  # pairs on a bin edge may move


def test_the_histogram_counts_every_pair_once() -> None:
    v, _ = _vectors(31, 5)
    sums = pair_sums(v, edges=COSINE_EDGES, tile=6)
    unit = (v / v.norm(dim=1, keepdim=True)).numpy()
    cos = (unit @ unit.T)[~np.eye(31, dtype=bool)]
    expected, _ = np.histogram(np.clip(cos, -1, 1), bins=COSINE_EDGES.numpy())
    assert sums.histogram is not None and sums.histogram.tolist() == expected.tolist()
    assert sums.cos_min == pytest.approx(cos.min()) and sums.cos_max == pytest.approx(cos.max())
    assert sums.cos_sum == pytest.approx(cos.sum()) and sums.cos_sq_sum == pytest.approx((cos**2).sum())


def test_undefined_cases() -> None:
    one = pair_sums(torch.ones(1, 3))
    assert one.count == 0 and math.isnan(one.max_angle()) and math.isnan(one.etf_distance())
    v, var = _vectors(5, 3)
    v[2] = 0.0  # a class at the global mean: no cosine, but distances and the ETF distance exist
    sums = pair_sums(v, var)
    assert math.isnan(sums.max_angle()) and math.isnan(sums.equiangular())
    assert math.isfinite(sums.cdnv()) and math.isfinite(sums.etf_distance())
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-2.0, 0.0]])
    assert math.isnan(pair_sums(same, torch.ones(3)).cdnv())  # two equal means
    assert math.isinf(pair_sums(same).log_energy())  # two equal directions
    assert math.isnan(pair_sums(v, None).cdnv())  # no variances


def test_tile_rows_bounds_the_tile() -> None:
    assert tile_rows(1) == 1 and tile_rows(100) == 100
    assert tile_rows(50_257) * 50_257 <= 1 << 24 and tile_rows(10**9) == 1

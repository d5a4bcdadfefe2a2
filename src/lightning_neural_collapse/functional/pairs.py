"""Every metric over pairs of classes, from tiles of the Gram matrix: nothing ``C x C`` is built.

NC2's equiangularity and max-angle, Zhu et al.'s ETF distance, the CDNV, the log energy (GNC2) and the
histogram of the pairwise cosines all reduce over the ``C (C - 1)`` ordered pairs of distinct classes.
:func:`pair_sums` streams over blocks of ``tile`` rows of the Gram of the vectors (``tile x C`` at a time) and
keeps exact float64 sums (of the cosines' distance to the simplex value and its square, of its absolute
value, of the log energy, of the CDNV terms, of the squared ETF deviation) and fixed histogram bins. Memory is
``O(tile * C + C * D + D^2)``, time ``O(C^2 D)``: one Gram of the vectors, the floor for all-pair metrics.

Example:
    >>> import torch
    >>> sums = pair_sums(torch.tensor([[1.0, 0.0], [-0.5, 0.8660254], [-0.5, -0.8660254]]))
    >>> sums.count, round(sums.max_angle(), 6), round(sums.etf_distance(), 6)
    (6, 0.0, 0.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

TILE_ELEMENTS = 1 << 24
"""Elements of one Gram tile (``tile rows x C``): 128 MiB in float64; the tile's row count follows from ``C``."""
COSINE_EDGES = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
"""Default bin edges of the histogram of pairwise cosines (40 bins of 0.05 on ``[-1, 1]``)."""


@dataclass(frozen=True)
class PairSums:
    """Exact float64 sums over the ordered pairs ``c != c'`` of ``C`` vectors (see :func:`pair_sums`).

    ``x = cos(v_c, v_c') + 1/(C-1)`` is each pair's cosine minus its simplex-ETF value. Sums that are undefined
    for these vectors (a zero vector, two equal vectors) are ``nan``.
    """

    count: int
    x_sum: float
    x_sq_sum: float
    x_abs_sum: float
    log_energy_sum: float
    cdnv_sum: float
    etf_sq_sum: float
    histogram: Tensor | None = None
    """Counts of the pairwise cosines in the bins of ``edges`` (``len(edges) - 1`` int64 counts), or ``None``."""
    edges: Tensor | None = None
    cos_min: float = math.nan
    cos_max: float = math.nan

    @property
    def cos_sum(self) -> float:
        """``sum`` of the pairwise cosines."""
        return self.x_sum - self.count / (self._classes() - 1)

    @property
    def cos_sq_sum(self) -> float:
        """``sum`` of the squared pairwise cosines."""
        ideal = 1.0 / (self._classes() - 1)
        return self.x_sq_sum - 2.0 * ideal * self.x_sum + self.count * ideal * ideal

    def _classes(self) -> int:
        return int(round((1 + math.sqrt(1 + 4 * self.count)) / 2))  # count = C (C - 1)

    def _mean(self, total: float) -> float:
        return total / self.count if self.count > 0 else math.nan

    def equiangular(self) -> float:
        """Population Std of the pairwise cosines (NC2, Fig. 3)."""
        mean = self._mean(self.x_sum)
        variance = self._mean(self.x_sq_sum) - mean * mean
        return math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else math.nan

    def max_angle(self) -> float:
        """``Avg |cos + 1/(C-1)|`` (NC2, Fig. 4)."""
        return self._mean(self.x_abs_sum)

    def log_energy(self) -> float:
        """``Avg log(1 / ||u_c - u_c'||)`` of the unit vectors (GNC2, hyperspherical uniformity)."""
        return self._mean(self.log_energy_sum)

    def cdnv(self) -> float:
        """``Avg (var_c + var_c') / (2 ||v_c - v_c'||^2)`` (NC1, CDNV; ``nan`` without variances)."""
        return self._mean(self.cdnv_sum)

    def etf_distance(self) -> float:
        """``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F`` of ``G = V V^T`` (Zhu et al.)."""
        return math.sqrt(self.etf_sq_sum) if self.etf_sq_sum >= 0 else math.nan


def tile_rows(num_vectors: int, budget: int = TILE_ELEMENTS) -> int:
    """Rows per Gram tile for ``num_vectors`` vectors: about ``budget`` elements per tile.

    Example:
        >>> tile_rows(10), tile_rows(50_257)
        (10, 333)
    """
    return max(1, min(num_vectors, budget // max(num_vectors, 1)))


def pair_sums(
    vectors: Tensor,
    variances: Tensor | None = None,
    *,
    edges: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    tile: int | None = None,
) -> PairSums:
    """The pair reductions of ``vectors`` (``(C, D)``, one row per class), in tiles of ``tile`` rows.

    Each tile is ``V[a:b] V^T`` (in ``dtype``); the cosines, the squared distances
    ``||v_c||^2 + ||v_c'||^2 - 2 <v_c, v_c'>`` and the ETF deviation follow from it and the norms.

    Args:
        vectors: the centred class means or the classifier rows.
        variances: ``(C,)`` within-class variances ``var_c``, for the CDNV (means only).
        edges: uniform histogram bin edges for the pairwise cosines, or ``None`` for no histogram.
        dtype: dtype of the Gram tiles (``torch.float32`` is faster; every sum stays float64).
        tile: rows per tile; default :func:`tile_rows`.

    Returns:
        A :class:`PairSums`.
    """
    v = vectors.detach().to(torch.float64)
    num = v.shape[0]
    nan = math.nan
    if num < 2:
        return PairSums(0, nan, nan, nan, nan, nan, nan)
    norms = v.norm(dim=1)
    sq_norms = norms.square()
    ideal = 1.0 / (num - 1)
    gram_norm = float(torch.linalg.matrix_norm(v.T @ v))  # ||V V^T||_F = ||V^T V||_F: a D x D product
    root = math.sqrt(num - 1)
    target_diag = torch.tensor((1.0 - 1.0 / num) / root, dtype=torch.float64, device=v.device)
    target_off = torch.tensor(-1.0 / num / root, dtype=torch.float64, device=v.device)
    columns = v.T.to(dtype)
    var = None if variances is None else variances.detach().to(device=v.device, dtype=torch.float64)
    rows = tile or tile_rows(num)
    totals = torch.zeros(6, dtype=torch.float64, device=v.device)  # x, x^2, |x|, log energy, cdnv, etf^2
    extremes = torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=v.device)
    too_close = torch.zeros((), dtype=torch.bool, device=v.device)
    histogram = None if edges is None else torch.zeros(len(edges) - 1, dtype=torch.long, device=v.device)
    low, high = (0.0, 0.0) if edges is None else (float(edges[0]), float(edges[-1]))
    for start in range(0, num, rows):
        stop = min(start + rows, num)
        gram = (v[start:stop].to(dtype) @ columns).to(torch.float64)  # (tile, C)
        here = torch.arange(stop - start, device=v.device)
        diagonal = torch.zeros_like(gram, dtype=torch.bool)
        diagonal[here, here + start] = True
        off = ~diagonal
        cos = gram / (norms[start:stop, None] * norms[None, :])
        x = torch.where(off, cos + ideal, 0.0)
        totals[0] += x.sum()
        totals[1] += x.square().sum()
        totals[2] += x.abs().sum()
        totals[3] += torch.where(off, -0.5 * torch.log((2.0 - 2.0 * cos).clamp(min=0.0)), 0.0).sum()
        extremes[0] = torch.minimum(extremes[0], torch.where(off, cos, math.inf).min())
        extremes[1] = torch.maximum(extremes[1], torch.where(off, cos, -math.inf).max())
        totals[5] += (gram / gram_norm - torch.where(diagonal, target_diag, target_off)).square().sum()
        if var is not None:
            sq_dist = sq_norms[start:stop, None] + sq_norms[None, :] - 2.0 * gram
            too_close |= (off & (sq_dist <= 0)).any()
            pair_var = var[start:stop, None] + var[None, :]
            terms = pair_var / (2.0 * sq_dist.clamp(min=torch.finfo(torch.float64).tiny))
            totals[4] += torch.where(off, terms, 0.0).sum()
        if histogram is not None:
            values = torch.where(off, cos.clamp(low, high), high + 1.0 + abs(high))  # the diagonal falls outside
            histogram += torch.histc(values, bins=len(histogram), min=low, max=high).long()
    sums = totals.tolist()
    cdnv = nan if var is None or bool(too_close) else sums[4]
    etf = sums[5] if gram_norm > 0 else nan
    low_cos, high_cos = extremes.tolist()
    return PairSums(
        num * (num - 1),
        sums[0],
        sums[1],
        sums[2],
        sums[3],
        cdnv,
        etf,
        histogram,
        None if edges is None else edges.to(v.device),
        low_cos,
        high_cos,
    )

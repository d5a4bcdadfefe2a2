"""Every metric over pairs of classes, from tiles of the Gram matrix: nothing ``C x C`` is built.

NC2's equiangularity and max-angle, Zhu et al.'s ETF distance, the CDNV, the log energy (GNC2) and the
histogram of the pairwise cosines all reduce over the ``C (C - 1)`` ordered pairs of distinct classes.
:func:`pair_sums` streams over blocks of ``tile`` rows of the Gram of the vectors (``tile x C`` at a time) and
keeps sums (of the cosines' distance to the simplex value and its square, of its absolute value, of the log
energy, of the CDNV terms, of the squared ETF deviation) and fixed histogram bins. Each tile is reduced in its
own dtype (PyTorch's cascaded summation) and the tiles' sums add up in float64. Every step after the matrix
product works in place on two preallocated tile buffers: fresh ``tile x C`` allocations would cost more than
the arithmetic. The Gram is symmetric, so each tile holds the upper part only: rows ``a:b`` against columns
``a:C``, whose pairs right of the diagonal block count for both orders. Memory is ``O(tile * C + C * D + D^2)``,
time ``O(C^2 D / 2)``: half a Gram of the vectors, plus about thirty passes over half of each tile.

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
"""Coarse uniform bin edges for the histogram of pairwise cosines (40 bins of 0.05 on ``[-1, 1]``); the callback uses
the finer :func:`~lightning_neural_collapse.functional.etf_deviation.cosine_edges`."""


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


def _both_orders(values: Tensor, width: int) -> Tensor:
    """The float64 sum over ordered pairs of an upper tile: its diagonal block once, the columns right of it
    twice (each stands for its mirror image below the diagonal)."""
    return values[:, :width].sum().to(torch.float64) + 2.0 * values[:, width:].sum().to(torch.float64)


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

    Each tile is ``V[a:b] V^T`` (in ``dtype``); the squared distances ``||v_c||^2 + ||v_c'||^2 - 2 <v_c, v_c'>``
    (their reciprocals summed by rows and by columns give the CDNV), the ETF deviation and the cosines follow
    from it and the float64 norms.

    Args:
        vectors: the centred class means or the classifier rows.
        variances: ``(C,)`` within-class variances ``var_c``, for the CDNV (means only).
        edges: uniform histogram bin edges for the pairwise cosines, or ``None`` for no histogram.
        dtype: dtype of the Gram tiles and of the work on them (``torch.float32``: faster, 1.4x at
            ``C = 50,257``, and accurate to about ``1e-7`` relative; the sums over tiles are float64).
        tile: rows per tile; default :func:`tile_rows`.

    Returns:
        A :class:`PairSums`.
    """
    v = vectors.detach().to(torch.float64)
    num = v.shape[0]
    nan = math.nan
    if num < 2:
        return PairSums(0, nan, nan, nan, nan, nan, nan)
    device = v.device
    norms = v.norm(dim=1)
    sq_norms = norms.square()
    ideal = 1.0 / (num - 1)
    # ||V V^T||_F = ||V^T V||_F: the smaller of the two products (min(C, D) squared; a wide layer has D >> C)
    gram_norm = float(torch.linalg.matrix_norm(v @ v.T if num <= v.shape[1] else v.T @ v))
    root = math.sqrt(num - 1)
    off_target, diag_target = -1.0 / num / root, (1.0 - 1.0 / num) / root
    low_v = v.to(dtype)
    columns = low_v.T
    # the per-pair factors, in the tile dtype: norms (for the cosines), squared norms (for the distances)
    inv_norms = (1.0 / norms).to(dtype)  # a zero row gives inf, so its cosines are nan (0 * inf)
    sq = sq_norms.to(dtype)
    var = None if variances is None else variances.detach().to(device=device, dtype=torch.float64)
    rows = min(tile or tile_rows(num), num)
    gram_buf = torch.empty(rows * num, dtype=dtype, device=device)  # flat: each tile is a contiguous view
    work_buf = torch.empty(rows * num, dtype=dtype, device=device)
    bins = 0 if edges is None else len(edges) - 1
    histogram = None if edges is None else torch.zeros(bins, dtype=torch.long, device=device)
    index_buf = None
    if edges is not None:
        index_dtype = torch.uint8 if bins < 255 else torch.int16 if bins < 32767 else torch.long
        index_buf = torch.empty(rows * num, dtype=index_dtype, device=device)
    low, high = (0.0, 1.0) if edges is None else (float(edges[0]), float(edges[-1]))
    # each tile's sums (reduced in the tile dtype) of x, x^2, |x|, the log1p terms, the CDNV terms, etf^2
    totals = torch.zeros(6, dtype=torch.float64, device=device)
    extremes = torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=device)
    too_close = torch.zeros((), dtype=torch.bool, device=device)
    for start in range(0, num, rows):
        # the upper part only: rows start:stop against columns start:C. Its first `width` columns (the diagonal
        # block) hold both orders of their pairs; every pair to their right stands for its mirror image too
        stop = min(start + rows, num)
        width, cols = stop - start, num - start
        gram = torch.mm(low_v[start:stop], columns[:, start:], out=gram_buf[: width * cols].view(width, cols))
        work = work_buf[: width * cols].view(width, cols)
        if var is not None:  # ||v_c - v_c'||^2 = |v_c|^2 + |v_c'|^2 - 2 <v_c, v_c'>, the diagonal left out
            torch.mul(gram, -2.0, out=work).add_(sq[start:stop, None]).add_(sq[None, start:])
            work.diagonal(0).fill_(math.inf)
            too_close |= work.amin() <= 0
            work.reciprocal_()  # (var_c + var_c') / (2 d^2) summed = (sum_c var_c R_c. + sum_c' R_.c' var_c') / 2
            rows_var, cols_var = var[start:stop], var[start:]
            block, right = work[:, :width], work[:, width:]
            totals[4] += 0.5 * (
                (block.sum(dim=1).to(torch.float64) * rows_var).sum()
                + (block.sum(dim=0).to(torch.float64) * cols_var[:width]).sum()
            )
            totals[4] += (right.sum(dim=1).to(torch.float64) * rows_var).sum()
            totals[4] += (right.sum(dim=0).to(torch.float64) * cols_var[width:]).sum()
        # the ETF deviation G/||G|| - (I - 11^T/C)/sqrt(C-1), squared and summed
        torch.mul(gram, 1.0 / gram_norm if gram_norm > 0 else math.nan, out=work).sub_(off_target)
        work.diagonal(0).sub_(diag_target - off_target)
        totals[5] += _both_orders(work.square_(), width)  # sum(): cascaded; vector_norm is not, in float32
        cos = gram.mul_(inv_norms[start:stop, None]).mul_(inv_norms[None, start:])
        diagonal = cos.diagonal(0)
        diagonal.fill_(math.inf)
        extremes[0] = torch.minimum(extremes[0], cos.amin().to(torch.float64))
        diagonal.fill_(-math.inf)
        extremes[1] = torch.maximum(extremes[1], cos.amax().to(torch.float64))
        cos.clamp_(-1.0, 1.0)
        if histogram is not None and index_buf is not None:  # uniform bins, values outside in the end bins
            torch.sub(cos, low, out=work).mul_(bins / (high - low)).floor_().clamp_(0, bins - 1)
            index = index_buf[: width * cols].view(width, cols)
            index.copy_(work)
            index.diagonal(0).fill_(bins)
            histogram += torch.bincount(index[:, :width].reshape(-1), minlength=bins + 1)[:bins]
            histogram += 2 * torch.bincount(index[:, width:].reshape(-1), minlength=bins + 1)[:bins]
        diagonal.fill_(-ideal)
        x = cos.add_(ideal)  # the distance to the simplex value; 0 on the diagonal
        totals[0] += _both_orders(x, width)
        totals[1] += _both_orders(torch.mul(x, x, out=work), width)
        totals[2] += _both_orders(torch.abs(x, out=work), width)
        # log(1/||u_c - u_c'||) = -(log(2 + 2/(C-1)) + log1p(-x / (1 + 1/(C-1)))) / 2; 0 on the diagonal
        totals[3] += _both_orders(torch.mul(x, -1.0 / (1.0 + ideal), out=work).log1p_(), width)
    sums = totals.tolist()
    pairs = num * (num - 1)
    log_energy = -0.5 * (pairs * math.log(2.0 + 2.0 * ideal) + sums[3])
    cdnv = nan if var is None or bool(too_close) else sums[4]
    etf = sums[5] if gram_norm > 0 else nan
    low_cos, high_cos = extremes.tolist()
    if not bool(torch.isfinite(inv_norms).all()):  # a zero vector: no cosine, no histogram
        histogram = None
    return PairSums(
        pairs,
        sums[0],
        sums[1],
        sums[2],
        log_energy,
        cdnv,
        etf,
        histogram,
        None if edges is None else edges.to(v.device),
        low_cos,
        high_cos,
    )

"""Per-layer collapse from per-class first moments only: ``O(C * D)`` memory at any layer width ``D``.

A hidden layer's output, flattened to ``D`` values per sample, can be far wider than the penultimate features
(a ``64 x 16 x 16`` feature map is ``D = 16,384``): its ``D x D`` second moment would not fit. Every per-layer key
of SPEC.md ("Per-layer collapse") needs only the per-class counts ``n_c``, means ``mu_c`` and variances
``var_c = mean over class c of ||h_i - mu_c||^2`` (:class:`MeanStatistics`), plus, for NC1 itself, a second
look at the samples through ``P = pinv(M)``: with ``M`` the ``D x C`` centred means,
``Tr(Sigma_W Sigma_B^+) / C = (1/N) sum_i ||P (h_i - mu_{y_i})||^2``. Only the ``k <= C - 1`` directions that
NC1's pseudo-inverse keeps matter, so ``P`` is held as the ``k x D`` matrix ``S_k^{-1} V_k^T`` of the thin SVD
``M^T = U S V^T`` (:func:`nc1_directions`; ``U`` is orthonormal and drops out of the norm).

The samples can be measured against centres ``m_c`` other than the final means (online mode uses the previous
measurement's means and directions): since ``sum_{i in c} P (h_i - m_c) = n_c P (mu_c - m_c)``,
``sum_{i in c} ||P (h_i - mu_c)||^2 = sum_{i in c} ||P (h_i - m_c)||^2 - n_c ||P (mu_c - m_c)||^2``
(:func:`projected_nc1`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neural_collapse.functional.nc1 import _mean_directions
from lightning_neural_collapse.functional.nc2 import equinorm
from lightning_neural_collapse.functional.pairs import pair_sums
from lightning_neural_collapse.functional.statistics import GlobalMean, PerClassCounts, global_mean

STATISTICS_KEYS: tuple[str, ...] = (
    "nc1_trace_ratio",
    "nc1_cdnv",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_distance_means",
)
"""The per-layer keys that follow from one pass's per-class means and variances (:func:`statistics_values`)."""

PROJECTION_KEYS: tuple[str, ...] = ("nc1", "ncc_accuracy")
"""The per-layer keys that need the class means before the samples: a second pass in exact mode, the previous
measurement's means (keys with :data:`PREVIOUS_SUFFIX`) online."""

LAYER_KEYS: tuple[str, ...] = ("nc1", "nc1_trace_ratio", "nc1_cdnv", "ncc_accuracy", *STATISTICS_KEYS[2:])
"""Every per-layer key of SPEC.md, in the order the docs list them."""

PREVIOUS_SUFFIX = "_prev_means"
"""Online mode's projection keys (``nc1_prev_means``, ``ncc_accuracy_prev_means``): measured against the class
means (and ``P``) of the previous measurement, as online NC4 is."""


@dataclass(frozen=True)
class MeanStatistics(PerClassCounts):
    """Per-class first moments of one layer's features, float64: a
    :class:`~lightning_neural_collapse.functional.statistics.ClassStatistics` without ``Sigma_W``.

    Attributes:
        counts: ``(C,)`` samples per class (0 for an absent class).
        means: ``(C, D)`` class means; rows of absent classes are zero and must not be used.
        variances: ``(C,)`` ``var_c``, the mean squared distance of class ``c``'s samples to ``mu_c``.
    """

    counts: Tensor
    means: Tensor
    variances: Tensor


def mean_statistics(features: Tensor, labels: Tensor, num_classes: int) -> MeanStatistics:
    """:class:`MeanStatistics` of ``(N, D)`` features with ``(N,)`` labels in ``[0, num_classes)``, in two passes
    over the samples in float64 (a reference, and the doctests' helper).

    Example:
        >>> stats = mean_statistics(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 3)
        >>> stats.counts.tolist(), stats.means.flatten().tolist(), stats.variances.tolist()
        ([2.0, 1.0, 0.0], [1.0, 5.0, 0.0], [1.0, 0.0, 0.0])
    """
    h, y = features.detach().to(torch.float64).flatten(1), labels.long()
    counts = torch.zeros(num_classes, dtype=torch.float64, device=h.device).index_add_(
        0, y, torch.ones_like(y, dtype=torch.float64)
    )
    sums = torch.zeros(num_classes, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, y, h)
    means = sums / counts.clamp(min=1)[:, None]
    deviation = h - means.index_select(0, y)
    squares = torch.zeros(num_classes, dtype=torch.float64, device=h.device).index_add_(
        0, y, deviation.square().sum(dim=1)
    )
    return MeanStatistics(counts, means, squares / counts.clamp(min=1))


def centred_means(stats: MeanStatistics, kind: GlobalMean = "classes") -> Tensor:
    """``(C', D)`` float64 rows ``mu_c - mu_G`` of the ``C'`` present classes, in label order."""
    present = stats.present
    return stats.means[present] - global_mean(stats.means, stats.counts, kind)


def trace_ratio(stats: MeanStatistics, kind: GlobalMean = "classes") -> float:
    """``Tr(Sigma_W) / Tr(Sigma_B)`` (``nc1_trace_ratio``; SPEC.md's ``Sigma_B``, classes weighted equally).

    ``Tr(Sigma_W) = sum_c n_c var_c / N`` and ``Tr(Sigma_B) = Avg_c ||mu_c - mu_G||^2`` over the present classes.

    Returns:
        The ratio (dimensionless, 0 when collapsed); ``nan`` with fewer than two classes or equal means.

    Example:
        >>> stats = MeanStatistics(torch.tensor([2.0, 2.0]), torch.tensor([[1.0], [-1.0]]), torch.tensor([0.5, 0.5]))
        >>> trace_ratio(stats)
        0.5
    """
    present = stats.present
    if int(present.sum()) < 2:
        return math.nan
    within = float((stats.counts * stats.variances).sum()) / float(stats.counts.sum())
    between = float(centred_means(stats, kind).square().sum(dim=1).mean())
    return within / between if between > 0 else math.nan


def statistics_values(
    stats: MeanStatistics, kind: GlobalMean = "classes", *, dtype: torch.dtype = torch.float64
) -> dict[str, float]:
    """The :data:`STATISTICS_KEYS` of one layer, from its per-class statistics (undefined keys left out).

    One tiled pass over the Gram of the centred means gives the pair metrics
    (:func:`~lightning_neural_collapse.functional.pairs.pair_sums`, in ``dtype``): nothing ``C x C`` or ``D x D``.

    Example:
        >>> etf = torch.tensor([[1.0, 0.0], [-0.5, 3**0.5 / 2], [-0.5, -(3**0.5) / 2]], dtype=torch.float64)
        >>> stats = MeanStatistics(torch.full((3,), 4.0), etf, torch.zeros(3, dtype=torch.float64))
        >>> values = statistics_values(stats)
        >>> {key: round(value, 12) + 0.0 for key, value in values.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'nc1_trace_ratio': 0.0, 'nc1_cdnv': 0.0, 'nc2_equinorm_means': 0.0, 'nc2_equiangular_means': 0.0,
         'nc2_maxangle_means': 0.0, 'nc2_etf_distance_means': 0.0}
    """
    centred = centred_means(stats, kind)
    sums = pair_sums(centred, stats.variances[stats.present], dtype=dtype)
    values = {
        "nc1_trace_ratio": trace_ratio(stats, kind),
        "nc1_cdnv": sums.cdnv(),
        "nc2_equinorm_means": equinorm(centred),
        "nc2_equiangular_means": sums.equiangular(),
        "nc2_maxangle_means": sums.max_angle(),
        "nc2_etf_distance_means": sums.etf_distance(),
    }
    return {key: value for key, value in values.items() if math.isfinite(value)}


def nc1_directions(
    means: Tensor, present: Tensor, kind: GlobalMean = "classes", counts: Tensor | None = None
) -> Tensor:
    """``P`` of NC1 as the ``(k, D)`` float64 matrix ``S_k^{-1} V_k^T``: ``||P x||`` is ``||pinv(M) x||`` for every
    ``x``, with ``M`` the ``D x C`` centred means of the present classes (``k <= min(C - 1, D)`` kept directions,
    with NC1's tolerance, see :func:`~lightning_neural_collapse.functional.nc1.nc1`). ``(0, D)`` when none is kept.

    Args:
        means: ``(C, D)`` class means.
        present: ``(C,)`` bool, the classes that take part.
        kind: the global mean, ``"classes"`` or ``"sample"`` (which then needs ``counts``).
        counts: ``(C,)`` samples per class, for ``kind="sample"``.

    Example:
        >>> means = torch.tensor([[2.0, 0.0], [-2.0, 0.0]], dtype=torch.float64)
        >>> nc1_directions(means, torch.tensor([True, True])).abs().tolist()  # 1 / (2 sqrt(2)) along the axis
        [[0.35355339059327373, 0.0]]
    """
    m = means.detach().to(torch.float64)
    weights = present.to(torch.float64) if counts is None else counts.to(torch.float64) * present
    centred = m[present] - global_mean(m, weights, kind)
    directions, singular = _mean_directions(centred)
    if directions is None:
        return torch.zeros(0, m.shape[1], dtype=torch.float64, device=m.device)
    return (directions / singular).T.contiguous()


def projected_nc1(
    square_sum: float | Tensor,
    counts: Tensor,
    means: Tensor,
    centres: Tensor,
    directions: Tensor,
    *,
    tile: int = 4096,
) -> float:
    """NC1 of samples seen through ``P`` against centres ``m_c``: ``(S - sum_c n_c ||P (mu_c - m_c)||^2) / N``.

    Args:
        square_sum: ``S = sum_i ||P (h_i - m_{y_i})||^2`` over the ``N`` samples counted.
        counts: ``(C,)`` samples counted per class (``N`` is their sum).
        means: ``(C, D)`` the classes' means over all samples of the measurement (rows of classes not counted
            are ignored).
        centres: ``(C, D)`` the centres ``m_c`` the samples were measured against (the means themselves in exact
            mode's second pass, where the correction is 0).
        directions: ``(k, D)`` ``P`` (:func:`nc1_directions`).
        tile: classes per product in the correction (no ``C x C`` matrix).

    Returns:
        NC1 (dimensionless), ``nan`` with no sample or no direction.

    Example:
        >>> directions = torch.tensor([[0.5, 0.0]], dtype=torch.float64)
        >>> means = torch.tensor([[2.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
        >>> projected_nc1(2.0, torch.tensor([2.0, 2.0]), means, means, directions)
        0.5
        >>> projected_nc1(2.0, torch.tensor([2.0, 2.0]), means, means + 1.0, directions)  # 2 - 4 * 0.25
        0.25
    """
    total = float(counts.sum())
    if total <= 0 or directions.shape[0] == 0:
        return math.nan
    counted = (counts > 0).nonzero().flatten()
    correction = 0.0
    p = directions.to(torch.float64)
    for start in range(0, int(counted.numel()), tile):
        rows = counted[start : start + tile]
        shift = means.index_select(0, rows).to(torch.float64) - centres.index_select(0, rows).to(torch.float64)
        correction += float((counts.index_select(0, rows).to(torch.float64) * (shift @ p.T).square().sum(dim=1)).sum())
    return (float(square_sum) - correction) / total


@dataclass(frozen=True)
class DepthFit:
    """He & Su's law of data separation fitted to one measurement: ``log NC1`` against the layer index.

    Attributes:
        slope: the least-squares slope of ``log NC1`` per layer (negative when each layer separates better).
        ratio: ``exp(slope)``, the factor by which each layer multiplies NC1 (below 1: it shrinks).
        pearson_r: the Pearson correlation of ``log NC1`` with depth (``nan`` with two layers).
        layers: how many layers took part (those with a positive, finite NC1).
    """

    slope: float
    ratio: float
    pearson_r: float
    layers: int


def depth_fit(values: list[float]) -> DepthFit | None:
    """:class:`DepthFit` of per-layer NC1 ``values`` in depth order (layer index 0, 1, ...); layers whose NC1 is
    not positive and finite are left out. ``None`` with fewer than two layers left.

    Example:
        >>> fit = depth_fit([8.0, 4.0, 2.0, 1.0])  # each layer halves NC1
        >>> round(fit.ratio, 12), round(fit.pearson_r, 12), fit.layers
        (0.5, -1.0, 4)
    """
    points = [(float(i), math.log(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    if len(points) < 2:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    syy = sum((y - mean_y) ** 2 for _, y in points)
    slope = sxy / sxx
    r = sxy / math.sqrt(sxx * syy) if n > 2 and syy > 0 else math.nan
    return DepthFit(slope, math.exp(slope), r, n)

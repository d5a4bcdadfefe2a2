"""All Neural Collapse metrics at once, from samples or from per-class statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neural_collapse.functional.nc1 import nc1
from lightning_neural_collapse.functional.nc2 import equinorm
from lightning_neural_collapse.functional.nc3 import cosine_cov, self_duality, self_duality_cosine
from lightning_neural_collapse.functional.nc4 import ncc_mismatch
from lightning_neural_collapse.functional.pairs import PairSums, pair_sums
from lightning_neural_collapse.functional.statistics import (
    ClassStatistics,
    GlobalMean,
    class_statistics,
)
from lightning_neural_collapse.functional.statistics import (
    global_mean as _global_mean,
)

FEATURE_KEYS: tuple[str, ...] = (
    "nc1",
    "nc1_cdnv",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_distance_means",
    "nc2_log_energy_means",
)
"""Keys computed from the features alone."""

CLASSIFIER_KEYS: tuple[str, ...] = (
    "nc2_equinorm_weights",
    "nc2_equiangular_weights",
    "nc2_maxangle_weights",
    "nc2_etf_distance_weights",
    "nc3_self_duality",
    "nc3_cosine",
    "nc3_cosine_cov",
)
"""Keys that also need the classifier weight (NC4 aside)."""

NC4_KEY = "nc4_ncc_mismatch"
ALL_KEYS: tuple[str, ...] = FEATURE_KEYS + CLASSIFIER_KEYS + (NC4_KEY,)


def centred_class_means(stats: ClassStatistics, global_mean: GlobalMean = "classes") -> Tensor:
    """``(C', D)`` float64 rows ``mu_c - mu_G`` of the ``C'`` present classes, in label order."""
    mu_g = _global_mean(stats.means, stats.counts, global_mean)
    return stats.means[stats.present] - mu_g


@dataclass(frozen=True)
class Geometry:
    """What one look at the class means (and the classifier rows) gives: the metric ``values`` and the pair
    reductions behind them (``means``, ``weights``: :class:`~lightning_neural_collapse.functional.pairs.PairSums`,
    with the cosine histograms when bins were asked for)."""

    values: dict[str, float]
    means: PairSums | None = None
    weights: PairSums | None = None


def geometry(
    stats: ClassStatistics,
    weight: Tensor | None = None,
    *,
    global_mean: GlobalMean = "classes",
    edges: Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> Geometry:
    """Every key of SPEC.md but ``nc4_ncc_mismatch``, from per-class statistics, and the pair reductions.

    One tiled pass over the Gram of the centred means (and one over the classifier rows) gives every pair metric
    (:func:`~lightning_neural_collapse.functional.pairs.pair_sums`): nothing ``C x C`` is built. Only classes
    with at least one sample take part; undefined keys are left out (see :func:`metrics_from_statistics`).

    Args:
        stats: per-class statistics.
        weight: optional ``(C, D)`` classifier weight.
        global_mean: ``"classes"`` or ``"sample"``.
        edges: histogram bin edges for the pairwise cosines, or ``None``.
        dtype: dtype of the Gram tiles (every sum is float64).
    """
    centred = centred_class_means(stats, global_mean)
    means = pair_sums(centred, stats.variances[stats.present], edges=edges, dtype=dtype)
    values: dict[str, float] = {
        "nc1": nc1(stats.within_cov, centred),
        "nc1_cdnv": means.cdnv(),
        "nc2_equinorm_means": equinorm(centred),
        "nc2_equiangular_means": means.equiangular(),
        "nc2_maxangle_means": means.max_angle(),
        "nc2_etf_distance_means": means.etf_distance(),
        "nc2_log_energy_means": means.log_energy(),
    }
    weights = None
    if weight is not None:
        w = _check_weight(weight, stats.means.shape).to(torch.float64)[stats.present]
        weights = pair_sums(w, edges=edges, dtype=dtype)
        values.update(
            {
                "nc2_equinorm_weights": equinorm(w),
                "nc2_equiangular_weights": weights.equiangular(),
                "nc2_maxangle_weights": weights.max_angle(),
                "nc2_etf_distance_weights": weights.etf_distance(),
                "nc3_self_duality": self_duality(w, centred),
                "nc3_cosine": self_duality_cosine(w, centred),
                "nc3_cosine_cov": cosine_cov(w, centred),
            }
        )
    finite = {key: value for key, value in values.items() if math.isfinite(value)}
    return Geometry(finite, means, weights)


def metrics_from_statistics(
    stats: ClassStatistics,
    weight: Tensor | None = None,
    *,
    global_mean: GlobalMean = "classes",
    dtype: torch.dtype = torch.float64,
) -> dict[str, float]:
    """Every key of SPEC.md but ``nc4_ncc_mismatch`` from per-class statistics.

    Only classes with at least one sample take part. Keys whose quantity is undefined for these
    statistics (for example every NC2 key with fewer than two classes) are left out, never reported
    as ``nan``.

    Args:
        stats: per-class statistics (:func:`class_statistics` or ``NeuralCollapse.statistics()``).
        weight: optional ``(C, D)`` classifier weight; adds the keys of :data:`CLASSIFIER_KEYS`.
        global_mean: ``"classes"`` (mean of the class means, default) or ``"sample"``.
        dtype: dtype of the Gram tiles of the pair metrics (:func:`geometry`).

    Returns:
        A dict from metric key to a dimensionless float.
    """
    return geometry(stats, weight, global_mean=global_mean, dtype=dtype).values


def neural_collapse_metrics(
    features: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    global_mean: GlobalMean = "classes",
    num_classes: int | None = None,
) -> dict[str, float]:
    """NC1-NC4 of features held in memory, exactly as SPEC.md defines them (float64 throughout).

    Args:
        features: ``(N, D)`` penultimate-layer features ``h_i``.
        labels: ``(N,)`` integer labels.
        weight: optional ``(C, D)`` last-layer weight ``W``; adds the NC2-weight, NC3 and NC4 keys.
        bias: optional ``(C,)`` last-layer bias ``b`` (NC4 uses ``argmax(W h + b)``).
        global_mean: ``"classes"`` (default) or ``"sample"``, see :func:`global_mean`.
        num_classes: ``C``; default ``max(labels) + 1``, or ``weight.shape[0]`` when given.

    Returns:
        A dict from key to dimensionless float, undefined keys left out (see :func:`metrics_from_statistics`).

    Example:
        >>> feats = torch.tensor([[1.0, 0.0], [1.2, 0.0], [-1.0, 0.0], [-1.2, 0.0]])
        >>> labels = torch.tensor([0, 0, 1, 1])
        >>> m = neural_collapse_metrics(feats, labels, weight=torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        >>> round(m["nc1"], 6), m["nc2_maxangle_means"], m["nc3_self_duality"], m["nc4_ncc_mismatch"]
        (0.004132, 0.0, 0.0, 0.0)
    """
    if num_classes is None and weight is not None:
        num_classes = weight.shape[0]
    stats = class_statistics(features, labels, num_classes)
    values = metrics_from_statistics(stats, weight, global_mean=global_mean)
    if weight is not None and features.shape[0] > 0:
        w = weight.to(torch.float64)
        logits = features.to(torch.float64) @ w.T
        if bias is not None:
            logits = logits + bias.to(torch.float64)
        values[NC4_KEY] = ncc_mismatch(features, stats.means, logits, stats.present)
    return values


def _check_weight(weight: Tensor, means_shape: torch.Size) -> Tensor:
    if weight.ndim != 2 or tuple(weight.shape) != tuple(means_shape):
        raise ValueError(f"weight must have shape (num_classes, dim) = {tuple(means_shape)}, got {tuple(weight.shape)}")
    return weight

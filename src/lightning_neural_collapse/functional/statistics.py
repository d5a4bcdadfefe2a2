"""Per-class sufficient statistics of penultimate-layer features, and the global mean.

Every metric of the package is a function of these statistics (NC4 also needs the samples).
They are computed here in two exact float64 passes from features held in memory; the streaming
:class:`~lightning_neural_collapse.NeuralCollapse` metric produces the same object batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

GlobalMean = Literal["classes", "sample"]
GLOBAL_MEAN_CHOICES: tuple[str, ...] = ("classes", "sample")


class PerClassCounts:
    """What every per-class statistics object derives from its ``counts`` (a ``(C,)`` tensor attribute)."""

    counts: Tensor

    @property
    def present(self) -> Tensor:
        """``(C,)`` boolean mask of the classes with at least one sample."""
        return self.counts > 0

    @property
    def num_samples(self) -> int:
        """Total number of samples ``N``."""
        return int(self.counts.sum().item())


@dataclass(frozen=True)
class ClassStatistics(PerClassCounts):
    """Per-class statistics of features ``h_i`` in ``R^D`` with labels in ``{0..C-1}``, all float64.

    Attributes:
        counts: ``(C,)`` number of samples per class (0 for a class that never occurs).
        means: ``(C, D)`` class means ``mu_c``; rows of absent classes are zero and must not be used.
        within_cov: ``(D, D)`` within-class covariance ``Sigma_W = (1/N) sum_i (h_i - mu_y)(h_i - mu_y)^T``.
        variances: ``(C,)`` ``var_c = mean over class c of ||h_i - mu_c||^2`` (0 for absent classes).
    """

    counts: Tensor
    means: Tensor
    within_cov: Tensor
    variances: Tensor


def class_statistics(features: Tensor, labels: Tensor, num_classes: int | None = None) -> ClassStatistics:
    """Exact per-class statistics from features in memory (two passes, float64).

    Args:
        features: ``(N, D)`` features, any floating dtype.
        labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes ``C``; default ``labels.max() + 1``.

    Returns:
        A :class:`ClassStatistics` in float64 on the device of ``features``.

    Example:
        >>> feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0]])
        >>> stats = class_statistics(feats, torch.tensor([0, 0, 1]))
        >>> stats.means.tolist(), stats.variances.tolist()
        ([[1.0, 0.0], [0.0, 4.0]], [1.0, 0.0])
    """
    features, labels = _check_features_labels(features, labels)
    if num_classes is None:
        num_classes = int(labels.max().item()) + 1 if labels.numel() else 0
    if labels.numel() and (int(labels.min().item()) < 0 or int(labels.max().item()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got values in "
            f"[{int(labels.min().item())}, {int(labels.max().item())}]"
        )
    h = features.to(torch.float64)
    dim = h.shape[1]
    counts = torch.zeros(num_classes, dtype=torch.float64, device=h.device)
    counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=h.device).index_add_(0, labels, h)
    means = sums / counts.clamp(min=1)[:, None]
    centred = h - means[labels]
    within_cov = centred.T @ centred / max(h.shape[0], 1)
    sq = torch.zeros(num_classes, dtype=torch.float64, device=h.device)
    sq.index_add_(0, labels, (centred * centred).sum(dim=1))
    return ClassStatistics(counts, means, within_cov, sq / counts.clamp(min=1))


def global_mean(means: Tensor, counts: Tensor, kind: GlobalMean = "classes") -> Tensor:
    """Global mean ``mu_G`` of the present classes (float64, shape ``(D,)``).

    ``"classes"`` (default, SPEC.md): the unweighted mean of the class means, which keeps ``mu_G`` in
    their affine hull and makes an exact simplex ETF score zero on imbalanced data.
    ``"sample"``: the count-weighted mean, i.e. the mean of all samples.

    Example:
        >>> means = torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=torch.float64)
        >>> global_mean(means, torch.tensor([3.0, 1.0])).tolist()
        [2.0, 0.0]
        >>> global_mean(means, torch.tensor([3.0, 1.0]), "sample").tolist()
        [1.0, 0.0]
    """
    present = counts > 0
    if kind == "classes":
        return means[present].mean(dim=0)
    if kind == "sample":
        weights = counts[present].to(means.dtype)
        return (weights[:, None] * means[present]).sum(dim=0) / weights.sum()
    raise ValueError(f"global_mean must be one of {GLOBAL_MEAN_CHOICES}, got {kind!r}")


def _check_features_labels(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {tuple(features.shape)}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    return features, labels.long()

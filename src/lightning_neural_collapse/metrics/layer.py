"""Streaming per-layer statistics in ``O(C * D)`` memory: :class:`LayerMoments` and :class:`LayerProjection`.

The math is in :mod:`~lightning_neural_collapse.functional.layers`; these metrics only hold the sums, which add
across batches and ranks (one in-place ``all_reduce`` per state, see
:class:`~lightning_neural_collapse.metrics.base.SumStateMetric`). Neither keeps a ``D x D`` matrix, so a layer of
``D = 32,768`` values per sample costs a few ``C x D`` states and the batch itself.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_neural_collapse.functional.layers import MeanStatistics, projected_nc1
from lightning_neural_collapse.functional.nc4 import NearestClassCentre
from lightning_neural_collapse.metrics.base import SumStateMetric


def _rows(features: Tensor, labels: Tensor, counted: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, index, valid)``: the ``(B, D)`` features, labels clamped to class indices, and which rows count (a
    label in ``[0, C)``, ``counted`` if given); finiteness is the caller's (it has the shifted rows)."""
    if features.ndim != 2 or labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"features must be (batch, dim) and labels (batch,), got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.detach().to(features.device, torch.long)
    valid = (labels >= 0) & (labels < num_classes)
    if counted is not None:
        valid = valid & counted.to(device=features.device, dtype=torch.bool)
    return features.detach(), labels.clamp(0, num_classes - 1), valid


class LayerMoments(SumStateMetric):
    """Per-class counts, shifted sums and shifted squared norms of one layer's ``(B, D)`` features (float64).

    States: ``count`` ``n_c``, ``shifted_sum`` ``sum (h_i - s_c)`` (``C x D``), ``shifted_sq``
    ``sum ||h_i - s_c||^2`` (``C``) and ``skipped`` (counted rows with a non-finite value). The per-class shift
    ``s_c`` (the previous measurement's means of the layer, identical on every rank, or zero) keeps the variances
    free of cancellation; the products are elementwise, in float64.

    Args:
        num_classes: ``C``.
        dim: ``D``, the layer's values per sample.
        shift: optional ``(C, D)`` shift (non-finite rows count as zero).
        sum_dtype: dtype of the states and the work; float32 only on devices without float64.

    Example:
        >>> metric = LayerMoments(2, 1)
        >>> metric.update(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]))
        >>> stats = metric.statistics()
        >>> stats.means.flatten().tolist(), stats.variances.tolist()
        ([1.0, 5.0], [1.0, 0.0])
    """

    count: Tensor
    shifted_sum: Tensor
    shifted_sq: Tensor
    skipped: Tensor
    shift: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        shift: Tensor | None = None,
        *,
        sum_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_classes, self.dim, self.sum_dtype = num_classes, dim, sum_dtype
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("shifted_sum", torch.zeros(num_classes, dim, dtype=sum_dtype), dist_reduce_fx="sum")
        self.add_state("shifted_sq", torch.zeros(num_classes, dtype=sum_dtype), dist_reduce_fx="sum")
        self.add_state("skipped", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        values = torch.zeros(num_classes, dim, dtype=sum_dtype)
        if shift is not None:
            if tuple(shift.shape) != (num_classes, dim):
                raise ValueError(f"shift must have shape {(num_classes, dim)}, got {tuple(shift.shape)}")
            values = torch.nan_to_num(shift.detach().to(sum_dtype), nan=0.0, posinf=0.0, neginf=0.0)
        self.register_buffer("shift", values)

    def update(self, features: Tensor, labels: Tensor, counted: Tensor | None = None) -> None:
        """Add ``(B, D)`` features with ``(B,)`` class indices (others ignored) and an optional ``(B,)`` bool
        ``counted``; no host-device sync."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (batch, {self.dim}), got {tuple(features.shape)}")
        device = self.count.device
        h, index, valid = _rows(features.to(device), labels.to(device), counted, self.num_classes)
        x = h.to(self.sum_dtype) - self.shift.index_select(0, index)
        sq = torch.linalg.vecdot(x, x)
        finite = torch.isfinite(sq)
        self.skipped += (valid & ~finite).sum()
        valid = valid & finite
        x.masked_fill_(~valid[:, None], 0.0)
        self.count.index_add_(0, index, valid.long())
        self.shifted_sum.index_add_(0, index, x)
        self.shifted_sq.index_add_(0, index, torch.where(valid, sq, torch.zeros_like(sq)))

    def statistics(self) -> MeanStatistics:
        """The per-class statistics, summed over ranks (a collective on every rank)."""
        return self.synced(self._statistics)

    def _statistics(self) -> MeanStatistics:
        counts = self.count.to(torch.float64)
        denominator = counts.clamp(min=1)[:, None]
        offset = self.shifted_sum.to(torch.float64) / denominator
        present = (counts > 0)[:, None]
        means = torch.where(present, self.shift.to(torch.float64) + offset, torch.zeros_like(offset))
        variances = (self.shifted_sq.to(torch.float64) / denominator[:, 0] - offset.square().sum(dim=1)).clamp(min=0)
        return MeanStatistics(counts, means, variances)

    def compute(self) -> MeanStatistics:
        """:meth:`statistics`."""
        return self.statistics()


class LayerProjection(SumStateMetric):
    """One layer's samples against fixed class centres: NCC hits and, with NC1's directions, ``||P (h - m_y)||^2``.

    States: ``count`` (samples counted per class), ``square_sum`` (float64 ``sum_i ||P (h_i - m_{y_i})||^2`` over
    the samples whose class has a centre), ``hits`` (nearest centre == label) and ``total``.

    Args:
        centres: ``(C, D)`` class centres ``m_c`` (the final means in exact mode's second pass, the previous
            measurement's online and in validation).
        present: ``(C,)`` bool, the classes that have a centre.
        directions: ``(k, D)`` ``P`` (:func:`~lightning_neural_collapse.functional.layers.nc1_directions`), or
            ``None`` to count NCC only.
        accumulate_dtype: dtype of the projection product (the differences are taken in it too).

    Example:
        >>> centres = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])
        >>> metric = LayerProjection(centres, torch.tensor([True, True]), torch.tensor([[0.25, 0.0]]))
        >>> metric.update(torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, 5.0]]), torch.tensor([0, 0, 0]))
        >>> metric.accuracy(), metric.nc1(centres.double())  # (1 + 1 + 9) / 16 / 3; the third is nearer class 1
        (0.6666666666666666, 0.22916666666666666)
    """

    count: Tensor
    square_sum: Tensor
    hits: Tensor
    total: Tensor

    def __init__(
        self,
        centres: Tensor,
        present: Tensor,
        directions: Tensor | None = None,
        *,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        num_classes = int(centres.shape[0])
        self.num_classes, self.accumulate_dtype = num_classes, accumulate_dtype
        self.centres = centres.detach().to(accumulate_dtype)
        self.present = present.detach().to(device=centres.device, dtype=torch.bool)
        self.directions = None if directions is None else directions.detach().to(accumulate_dtype)
        self.rule = NearestClassCentre(centres.detach(), self.present)
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("square_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hits", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn: Any, exclude_state: Any = "") -> Any:  # keep the centres on the states' device
        this = super()._apply(fn, exclude_state)
        device = self.count.device
        self.centres, self.present = self.centres.to(device), self.present.to(device)
        self.directions = None if self.directions is None else self.directions.to(device)
        self.rule = self.rule.to(device)
        return this

    def update(self, features: Tensor, labels: Tensor, counted: Tensor | None = None) -> None:
        """Add ``(B, D)`` features with ``(B,)`` class indices and an optional ``(B,)`` bool ``counted``; no sync."""
        device = self.count.device
        h, index, valid = _rows(features.to(device), labels.to(device), counted, self.num_classes)
        nearest, finite = self.rule.nearest(h)
        valid = valid & finite
        self.hits += ((nearest == index) & valid).sum()
        self.total += valid.sum()
        if self.directions is None:
            return
        valid = valid & self.present.index_select(0, index)
        z = (h.to(self.accumulate_dtype) - self.centres.index_select(0, index)) @ self.directions.T
        squares = torch.linalg.vecdot(z, z).to(torch.float64)
        self.square_sum += torch.where(valid, squares, torch.zeros_like(squares)).sum()
        self.count.index_add_(0, index, valid.long())

    def accuracy(self) -> float:
        """The share of counted samples whose nearest centre is their label (this rank's states), ``nan`` if none."""
        total = int(self.total)
        return int(self.hits) / total if total > 0 else float("nan")

    def nc1(self, means: Tensor) -> float:
        """NC1 through ``P`` (this rank's states) given the measurement's ``(C, D)`` class ``means``
        (:func:`~lightning_neural_collapse.functional.layers.projected_nc1`); ``nan`` without directions."""
        if self.directions is None:
            return float("nan")
        return projected_nc1(self.square_sum, self.count, means, self.centres, self.directions)

    def values(self, means: Tensor | None) -> tuple[float, float]:
        """``(nc1, ncc_accuracy)`` summed over ranks (a collective on every rank); ``nc1`` is ``nan`` without
        ``means`` or directions."""
        return self.synced(lambda: (self.nc1(means) if means is not None else float("nan"), self.accuracy()))

    def compute(self) -> float:
        """The NCC accuracy summed over ranks."""
        return self.synced(self.accuracy)

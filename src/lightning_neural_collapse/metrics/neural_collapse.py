"""``NeuralCollapse``: streaming, rank-summable per-class statistics of penultimate features."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_neural_collapse.functional.collapse import metrics_from_statistics
from lightning_neural_collapse.functional.gram import add_upper_gram_, symmetric_from_upper
from lightning_neural_collapse.functional.statistics import GLOBAL_MEAN_CHOICES, ClassStatistics, GlobalMean
from lightning_neural_collapse.metrics.base import SumStateMetric, all_reduce_sum

_FLOAT_DTYPES = (torch.float32, torch.float64)


class NeuralCollapse(SumStateMetric):
    r"""Per-class sufficient statistics of features, fed batch by batch, summed over ranks.

    States (all ``dist_reduce_fx="sum"``, fixed shapes): per-class counts ``n_c`` (int64), shifted sums
    ``S_c = sum (h_i - s_c)``, the shifted second moment ``Q = sum (h_i - s_y)(h_i - s_y)^T`` (its upper
    triangle, with the diagonal: the symmetric product costs about half a matrix product per batch) and
    ``q_c = sum ||h_i - s_c||^2``, plus counters of skipped samples. Everything SPEC.md defines except NC4
    follows from them.

    The **shift** ``s_c`` is a per-class reference point near the class mean. It keeps the second moment
    free of catastrophic cancellation when the features sit tightly around large means, which is exactly
    the collapsed regime. :meth:`set_shift` fixes it (for example to the previous epoch's class means); a
    class whose shift was not set takes its first sample as shift, the first time it appears, so even the
    first batch of a fresh metric is accumulated accurately. Under several ranks, shifts taken from the data
    differ between ranks; the states are then converted to a common (zero) shift, in float64, before they are
    summed (``O(C D^2)`` once per sync). Passing identical means to :meth:`set_shift` on every rank avoids it.

    Samples whose label is ``ignore_index`` are dropped silently; samples with a label outside
    ``[0, num_classes)``, a non-finite feature (or one so large that ``||h - s_c||^2`` overflows the
    accumulate dtype: about 1.8e19 in float32) or, when ``finite_logits`` is passed, non-finite logits are
    dropped and counted (:meth:`skipped`). ``update`` never synchronises with the host, and its per-sample work
    besides the symmetric product is a few passes over the ``(B, D)`` batch.

    Args:
        num_classes: number of classes ``C`` (labels ``0..C-1``).
        dim: feature dimension ``D``.
        global_mean: ``"classes"`` (mean of the class means, SPEC.md default) or ``"sample"``.
        ignore_index: a label value to ignore, or ``None``.
        accumulate_dtype: dtype of the per-batch products and of the Gram tiles of ``compute``'s pair metrics:
            ``torch.float64`` (default) or ``torch.float32`` (accurate thanks to the shift, to about 1e-7
            relative in the pair metrics; twice as fast on CPUs, much faster on GPUs). The states add them up
            in ``sum_dtype``.
        sum_dtype: dtype of the sum states; default ``torch.float64``. ``torch.float32`` only for devices
            without float64 (Apple's MPS).
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).

    Example:
        >>> metric = NeuralCollapse(num_classes=2, dim=2)
        >>> metric.update(torch.tensor([[1.0, 0.0], [1.2, 0.0]]), torch.tensor([0, 0]))
        >>> metric.update(torch.tensor([[-1.0, 0.0], [-1.2, 0.0]]), torch.tensor([1, 1]))
        >>> round(metric.compute()["nc1"], 6)
        0.004132
        >>> metric.compute(weight=torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))["nc3_self_duality"]
        0.0
    """

    count: Tensor
    shifted_sum: Tensor
    shifted_gram: Tensor
    shifted_sq: Tensor
    skipped_nonfinite: Tensor
    skipped_labels: Tensor
    shift: Tensor
    shift_set: Tensor
    shift_from_data: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        global_mean: GlobalMean = "classes",
        ignore_index: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        sum_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected argument `num_classes` to be a positive integer, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Expected argument `dim` to be a positive integer, got {dim!r}")
        if global_mean not in GLOBAL_MEAN_CHOICES:
            raise ValueError(f"Expected argument `global_mean` to be one of {GLOBAL_MEAN_CHOICES}, got {global_mean!r}")
        sum_dtype = torch.float64 if sum_dtype is None else sum_dtype
        for name, value in (("accumulate_dtype", accumulate_dtype), ("sum_dtype", sum_dtype)):
            if value not in _FLOAT_DTYPES:
                raise ValueError(f"Expected argument `{name}` to be torch.float32 or torch.float64, got {value}")
        self.num_classes = num_classes
        self.dim = dim
        self.global_mean = global_mean
        self.ignore_index = ignore_index
        self.accumulate_dtype = accumulate_dtype
        self.sum_dtype = sum_dtype
        self.add_state("count", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("shifted_sum", torch.zeros(num_classes, dim, dtype=sum_dtype), dist_reduce_fx="sum")
        self.add_state("shifted_gram", torch.zeros(dim, dim, dtype=sum_dtype), dist_reduce_fx="sum")
        self.add_state("shifted_sq", torch.zeros(num_classes, dtype=sum_dtype), dist_reduce_fx="sum")
        self.add_state("skipped_nonfinite", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("skipped_labels", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # the shift is stored in the product dtype, so that the states are relative to exactly this value
        self.register_buffer("shift", torch.zeros(num_classes, dim, dtype=accumulate_dtype))
        self.register_buffer("shift_set", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("shift_from_data", torch.zeros(num_classes, dtype=torch.bool))
        self._shift_before_sync: Tensor | None = None

    def set_shift(self, means: Tensor, present: Tensor | None = None) -> None:
        """Use ``means`` (``(C, D)``, e.g. the previous epoch's class means) as the per-class shift.

        Rows outside ``present`` (or non-finite rows) are left to be taken from the data. Call it only right
        after :meth:`reset` (or construction): states accumulated against another shift would be wrong. On
        several ranks every rank must pass the same values.
        """
        if self._update_count:
            raise RuntimeError("NeuralCollapse.set_shift() must be called before update(); call reset() first")
        if tuple(means.shape) != (self.num_classes, self.dim):
            raise ValueError(f"shift must have shape {(self.num_classes, self.dim)}, got {tuple(means.shape)}")
        device = self.shift.device
        rows_ok = torch.isfinite(means).all(dim=1).to(device)
        if present is not None:
            rows_ok = rows_ok & present.to(device=device, dtype=torch.bool)
        values = torch.nan_to_num(means.detach().to(device, self.shift.dtype))
        self.shift.copy_(torch.where(rows_ok[:, None], values, torch.zeros_like(values)))
        self.shift_set.copy_(rows_ok)
        self.shift_from_data.zero_()

    def update(self, features: Tensor, labels: Tensor, finite_logits: Tensor | None = None) -> None:
        """Accumulate a batch: ``features`` of shape ``(B, D)`` (any float dtype), integer ``labels`` ``(B,)``,
        and optionally ``finite_logits`` (``(B,)`` bool): samples whose logits are not finite are skipped."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (batch, {self.dim}), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        device = self.count.device
        features = features.detach().to(device)
        labels = labels.detach().to(device, torch.long)
        label_ok = (labels >= 0) & (labels < self.num_classes)
        if self.ignore_index is not None:
            label_ok_or_ignored = label_ok | (labels == self.ignore_index)
            label_ok = label_ok & (labels != self.ignore_index)
        else:
            label_ok_or_ignored = label_ok
        index = torch.where(label_ok, labels, torch.zeros_like(labels))
        self._take_shift_from_data(features, index, label_ok)
        h = features.to(self.accumulate_dtype) - self.shift.index_select(0, index)
        # a NaN/Inf feature makes its row's squared norm non-finite (as does a float32 overflow of ||h - s||^2,
        # which would spoil the sums as well): one (B,) test instead of a (B, D) one
        sq = torch.linalg.vecdot(h, h)
        finite = torch.isfinite(sq)
        if finite_logits is not None:
            finite = finite & finite_logits.to(device=device, dtype=torch.bool)
        valid = label_ok & finite
        h.masked_fill_(~valid[:, None], 0.0)  # h is this update's own tensor
        add_upper_gram_(self.shifted_gram, h)
        if h.dtype != self.sum_dtype and self.num_classes <= index.shape[0]:  # C x D conversion, not B x D
            batch_sums = torch.zeros(self.shifted_sum.shape, dtype=h.dtype, device=device).index_add_(0, index, h)
            self.shifted_sum += batch_sums
        else:
            self.shifted_sum.index_add_(0, index, h.to(self.sum_dtype))
        self.shifted_sq.index_add_(0, index, torch.where(valid, sq, torch.zeros_like(sq)).to(self.sum_dtype))
        self.count.index_add_(0, index, valid.long())
        self.shift_set |= self.count > 0  # a class with samples keeps its shift, wherever it came from
        self.skipped_nonfinite += (label_ok & ~finite).sum()
        self.skipped_labels += (~label_ok_or_ignored).sum()

    def _take_shift_from_data(self, features: Tensor, index: Tensor, labelled: Tensor) -> None:
        """Give each class without a shift its first finite labelled sample of this batch as shift (no host sync;
        deterministic). Besides one pass for the rows' finiteness (a NaN or Inf makes a row's sum non-finite),
        work of size ``min(B, C) x D``: per class when ``C <= B``, per sample otherwise."""
        batch = index.shape[0]
        if batch == 0:
            return
        usable = labelled & torch.isfinite(features.sum(dim=1))
        positions = torch.arange(batch, device=index.device)
        source = torch.where(usable, positions, torch.full_like(positions, batch))
        first = torch.full((self.num_classes,), batch, dtype=torch.long, device=index.device)
        first = first.scatter_reduce(0, index, source, reduce="amin")  # (C,) first labelled sample of each class
        if self.num_classes <= batch:  # per class
            candidate = features.index_select(0, first.clamp(max=batch - 1)).to(self.shift.dtype)
            take = (first < batch) & ~self.shift_set
            self.shift.copy_(torch.where(take[:, None], candidate, self.shift))
            self.shift_from_data |= take
            return
        mine = first.index_select(0, index)  # (B,) per sample: its class's first sample
        candidate = features.index_select(0, mine.clamp(max=batch - 1)).to(self.shift.dtype)
        take = (mine < batch) & ~self.shift_set.index_select(0, index)
        self.shift.index_put_((index,), torch.where(take[:, None], candidate, self.shift.index_select(0, index)))
        self.shift_from_data.index_put_((index,), self.shift_from_data.index_select(0, index) | take)

    # ------------------------------------------------------------------------------------- reading

    def _local_statistics(self) -> ClassStatistics:
        counts = self.count.to(torch.float64)
        safe = counts.clamp(min=1)[:, None]
        offset = self.shifted_sum.to(torch.float64) / safe  # d_c = mu_c - s_c
        here = counts > 0
        means = torch.where(here[:, None], self.shift.to(torch.float64) + offset, torch.zeros_like(offset))
        total = counts.sum().clamp(min=1)
        gram = symmetric_from_upper(self.shifted_gram.to(torch.float64))  # the states hold its upper triangle
        within = (gram - offset.T @ (offset * counts[:, None])) / total
        within = (within + within.T) / 2
        variances = self.shifted_sq.to(torch.float64) / safe[:, 0] - offset.square().sum(dim=1)
        variances = torch.where(here, variances.clamp(min=0), torch.zeros_like(variances))
        return ClassStatistics(counts, means, within, variances)

    def statistics(self) -> ClassStatistics:
        """Per-class statistics of everything seen since the last reset, summed over ranks (a collective).

        Returns:
            A float64 :class:`~lightning_neural_collapse.functional.ClassStatistics` of new tensors: later
            ``update`` calls do not change it.
        """
        return self.synced(self._local_statistics)

    def skipped(self) -> dict[str, int]:
        """Samples dropped since the last reset, summed over ranks (a collective, on these two counters only:
        the ``C x D`` and ``D x D`` states are not sent again).

        Returns:
            ``{"nonfinite": ..., "bad_label": ...}``: samples with NaN/Inf features (or logits, when passed to
            ``update``), and samples whose label was outside ``[0, num_classes)`` (``ignore_index`` excluded).
        """
        counts = torch.stack([self.skipped_nonfinite, self.skipped_labels])
        if not self._is_synced and self.distributed:
            counts = all_reduce_sum(counts, group=self.process_group)[0]
        return {"nonfinite": int(counts[0]), "bad_label": int(counts[1])}

    def compute(self, weight: Tensor | None = None, bias: Tensor | None = None) -> dict[str, float]:
        """Every SPEC.md key but ``nc4_ncc_mismatch`` (see :class:`NCCMismatch` for that one).

        Args:
            weight: optional ``(C, D)`` classifier weight; adds the NC2-weight and NC3 keys.
            bias: accepted for symmetry with the functional API; no key here depends on it.

        Returns:
            A dict from key to float; undefined keys are left out.
        """
        del bias
        stats = self._local_statistics()
        return metrics_from_statistics(stats, weight, global_mean=self.global_mean, dtype=self.accumulate_dtype)

    # ------------------------------------------------------------------------------------- syncing

    def _sync_dist(self, dist_sync_fn: Callable = all_reduce_sum, process_group: Any | None = None) -> None:
        group = process_group or self.process_group
        from_data = self.shift_from_data.any().to(torch.long).reshape(1)
        dist.all_reduce(from_data, op=dist.ReduceOp.SUM, group=group)
        if int(from_data.item()):  # ranks may hold different shifts: move every rank to the zero shift first
            self._shift_before_sync = self.shift.clone()
            self._to_zero_shift()
        super()._sync_dist(dist_sync_fn, process_group)

    def unsync(self, should_unsync: bool = True) -> None:
        super().unsync(should_unsync)
        if self._shift_before_sync is not None:
            self.shift.copy_(self._shift_before_sync)
            self._shift_before_sync = None

    def _to_zero_shift(self) -> None:
        """Rewrite the states (in float64) as if the shift were zero, and zero it (undone by ``unsync``)."""
        s = self.shift.to(torch.float64)
        n = self.count.to(torch.float64)
        sums = self.shifted_sum.to(torch.float64)
        cross = s.T @ sums
        gram = symmetric_from_upper(self.shifted_gram.to(torch.float64)) + cross + cross.T + s.T @ (s * n[:, None])
        sq = self.shifted_sq.to(torch.float64) + 2.0 * (s * sums).sum(dim=1) + n * s.square().sum(dim=1)
        self.shifted_gram = gram.to(self.sum_dtype)
        self.shifted_sum = (sums + s * n[:, None]).to(self.sum_dtype)
        self.shifted_sq = sq.to(self.sum_dtype)
        self.shift.zero_()

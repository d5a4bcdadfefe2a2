"""``NeuralCollapse``: streaming, rank-summable per-class statistics of penultimate features."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_neural_collapse.functional.collapse import metrics_from_statistics
from lightning_neural_collapse.functional.statistics import GLOBAL_MEAN_CHOICES, ClassStatistics, GlobalMean
from lightning_neural_collapse.sync import all_reduce_sum, synced


class NeuralCollapse(Metric):
    r"""Per-class sufficient statistics of features, fed batch by batch, summed over ranks.

    States (all ``dist_reduce_fx="sum"``, float64 by default, fixed shapes): per-class counts ``n_c``,
    shifted sums ``sum (h_i - s_c)``, the shifted second moment ``Q = sum (h_i - s_y)(h_i - s_y)^T`` and
    ``q_c = sum ||h_i - s_c||^2``, plus counters of skipped samples. The shift ``s_c`` (see
    :meth:`set_shift`) is a per-class reference point, for example last epoch's class means; it must be
    identical on every rank. It keeps the second moment free of catastrophic cancellation when the
    features sit tightly around large means, which is exactly the collapsed regime.

    Samples whose label is ``ignore_index`` are dropped silently; samples with a label outside
    ``[0, num_classes)`` or a non-finite feature are dropped and counted (:meth:`skipped`). ``update``
    never synchronises with the host.

    Args:
        num_classes: number of classes ``C`` (labels ``0..C-1``).
        dim: feature dimension ``D``.
        global_mean: ``"classes"`` (mean of the class means, SPEC.md default) or ``"sample"``.
        ignore_index: a label value to ignore, or ``None``.
        accumulate_dtype: dtype of the states; ``torch.float64`` (default) or ``torch.float32`` (safe
            thanks to the shift, faster on GPUs with slow float64).
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

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    count: Tensor
    shifted_sum: Tensor
    shifted_gram: Tensor
    shifted_sq: Tensor
    skipped_nonfinite: Tensor
    skipped_labels: Tensor
    shift: Tensor

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        global_mean: GlobalMean = "classes",
        ignore_index: int | None = None,
        accumulate_dtype: torch.dtype = torch.float64,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_with_cache", False)
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Expected argument `num_classes` to be a positive integer, got {num_classes!r}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Expected argument `dim` to be a positive integer, got {dim!r}")
        if global_mean not in GLOBAL_MEAN_CHOICES:
            raise ValueError(f"Expected argument `global_mean` to be one of {GLOBAL_MEAN_CHOICES}, got {global_mean!r}")
        if accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"Expected argument `accumulate_dtype` to be torch.float32 or torch.float64, "
                             f"got {accumulate_dtype}")
        self.num_classes = num_classes
        self.dim = dim
        self.global_mean = global_mean
        self.ignore_index = ignore_index
        self.accumulate_dtype = accumulate_dtype
        dt = accumulate_dtype
        self.add_state("count", torch.zeros(num_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("shifted_sum", torch.zeros(num_classes, dim, dtype=dt), dist_reduce_fx="sum")
        self.add_state("shifted_gram", torch.zeros(dim, dim, dtype=dt), dist_reduce_fx="sum")
        self.add_state("shifted_sq", torch.zeros(num_classes, dtype=dt), dist_reduce_fx="sum")
        self.add_state("skipped_nonfinite", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("skipped_labels", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.register_buffer("shift", torch.zeros(num_classes, dim, dtype=dt))

    def set_shift(self, means: Tensor, present: Tensor | None = None) -> None:
        """Use ``means`` (``(C, D)``, e.g. the previous epoch's class means) as the per-class shift.

        Rows outside ``present`` (or non-finite rows) become zero. Call it only right after
        :meth:`reset` (or construction): states accumulated against another shift would be wrong.
        On several ranks every rank must pass the same values.
        """
        if self._update_count:
            raise RuntimeError("NeuralCollapse.set_shift() must be called before update(); call reset() first")
        if tuple(means.shape) != (self.num_classes, self.dim):
            raise ValueError(f"shift must have shape {(self.num_classes, self.dim)}, got {tuple(means.shape)}")
        rows_ok = torch.isfinite(means).all(dim=1)
        if present is not None:
            rows_ok = rows_ok & present.to(rows_ok.device)
        new_shift = torch.where(rows_ok[:, None], means, torch.zeros_like(means))
        self.shift.copy_(new_shift.to(self.shift.device, self.shift.dtype))

    def update(self, features: Tensor, labels: Tensor) -> None:
        """Accumulate a batch: ``features`` of shape ``(B, D)`` (any float dtype), integer ``labels`` ``(B,)``."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (batch, {self.dim}), got {tuple(features.shape)}")
        if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
            raise ValueError(f"labels must have shape ({features.shape[0]},), got {tuple(labels.shape)}")
        features = features.detach()
        labels = labels.detach().to(self.count.device, torch.long)
        label_ok = (labels >= 0) & (labels < self.num_classes)
        ignored = labels == self.ignore_index if self.ignore_index is not None else torch.zeros_like(label_ok)
        finite = torch.isfinite(features).all(dim=1).to(label_ok.device)
        valid = label_ok & finite & ~ignored
        index = torch.where(valid, labels, torch.zeros_like(labels))
        h = features.to(self.count.device, self.accumulate_dtype) - self.shift[index]
        h = torch.where(valid[:, None], h, torch.zeros_like(h))
        weight = valid.to(torch.float64)
        self.count.index_add_(0, index, weight)
        self.shifted_sum.index_add_(0, index, h)
        self.shifted_gram.addmm_(h.T, h)
        self.shifted_sq.index_add_(0, index, h.square().sum(dim=1))
        self.skipped_nonfinite += (label_ok & ~ignored & ~finite).sum()
        self.skipped_labels += (~label_ok & ~ignored).sum()

    def _local_statistics(self) -> ClassStatistics:
        counts = self.count
        safe = counts.clamp(min=1)[:, None]
        offset = self.shifted_sum.to(torch.float64) / safe  # d_c = mu_c - s_c
        means = torch.where(counts[:, None] > 0, self.shift.to(torch.float64) + offset, torch.zeros_like(offset))
        total = counts.sum().clamp(min=1)
        weighted = offset * counts[:, None]
        within = (self.shifted_gram.to(torch.float64) - offset.T @ weighted) / total
        within = (within + within.T) / 2
        variances = self.shifted_sq.to(torch.float64) / safe[:, 0] - offset.square().sum(dim=1)
        variances = torch.where(counts > 0, variances.clamp(min=0), torch.zeros_like(variances))
        return ClassStatistics(counts, means, within, variances)

    def statistics(self) -> ClassStatistics:
        """Per-class statistics of everything seen since the last reset, summed over ranks (a collective).

        Returns:
            A float64 :class:`~lightning_neural_collapse.functional.ClassStatistics`.
        """
        return synced(self, self._local_statistics)

    def skipped(self) -> dict[str, int]:
        """Samples dropped since the last reset, summed over ranks (a collective, on these two counters only:
        the ``C x D`` and ``D x D`` states are not sent again).

        Returns:
            ``{"nonfinite": ..., "bad_label": ...}``: samples with NaN/Inf features, and samples whose
            label was outside ``[0, num_classes)`` (``ignore_index`` excluded).
        """
        counts = torch.stack([self.skipped_nonfinite, self.skipped_labels])
        if self._to_sync and not self._is_synced and self.distributed_available_fn():
            sync_fn = self.dist_sync_fn or gather_all_tensors
            counts = torch.stack(sync_fn(counts, group=self.process_group)).sum(dim=0)
        return {"nonfinite": int(counts[0].item()), "bad_label": int(counts[1].item())}

    def compute(self, weight: Tensor | None = None, bias: Tensor | None = None) -> dict[str, float]:
        """Every SPEC.md key but ``nc4_ncc_mismatch`` (see :class:`NCCMismatch` for that one).

        Args:
            weight: optional ``(C, D)`` classifier weight; adds the NC2-weight and NC3 keys.
            bias: accepted for symmetry with the functional API; no key here depends on it.

        Returns:
            A dict from key to float; undefined keys are left out.
        """
        del bias
        return metrics_from_statistics(self._local_statistics(), weight, global_mean=self.global_mean)

"""``NCCMismatch``: the NC4 mismatch between the network and the nearest-class-centre rule, streamed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_neural_collapse.functional.nc4 import NearestClassCentre
from lightning_neural_collapse.metrics.base import SumStateMetric


class NCCMismatch(SumStateMetric):
    """Share of samples where ``argmax`` of the network's logits differs from ``argmin_c ||h - mu_c||``.

    The class means come from a previous pass (:meth:`NeuralCollapse.statistics`), so exact NC4 takes
    two passes over the data; in a training run the means of the previous measurement can serve.
    Samples with a non-finite feature or logit are skipped. The centred means and their norms are computed
    once, here, so ``update`` costs one matrix product per batch and never synchronises with the host.

    Args:
        means: ``(C, D)`` class means.
        present: optional ``(C,)`` mask of the classes the NCC rule may pick (default: all finite rows).
        search_dtype: dtype of the distance products; float32 (default) searches fast and re-ranks a few
            candidates in float64 (see :class:`~lightning_neural_collapse.functional.nc4.NearestClassCentre`).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = NCCMismatch(torch.tensor([[0.0], [4.0]]))
        >>> metric.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        >>> metric.compute()
        0.5
    """

    mismatches: Tensor
    total: Tensor
    label_hits: Tensor

    def __init__(
        self, means: Tensor, present: Tensor | None = None, search_dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (num_classes, dim), got {tuple(means.shape)}")
        self.ncc = NearestClassCentre(means, present, search_dtype=search_dtype)
        self.add_state("mismatches", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("label_hits", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _apply(self, fn: Any, exclude_state: Any = "") -> Any:  # keep the rule on the states' device
        this = super()._apply(fn, exclude_state)
        self.ncc = self.ncc.to(self.mismatches.device)
        return this

    def update(self, features: Tensor, logits: Tensor, counted: Tensor | None = None) -> None:
        """Accumulate a batch of ``(B, D)`` features and the network's ``(B, C)`` logits; ``counted``
        (``(B,)`` bool) may leave samples out (ignored or invalid labels)."""
        if logits.ndim != 2 or logits.shape[0] != features.shape[0]:
            raise ValueError(f"logits must have shape ({features.shape[0]}, num_classes), got {tuple(logits.shape)}")
        logits = logits.detach()
        finite = torch.isfinite(logits.sum(dim=1))  # a NaN or Inf logit makes its row's sum non-finite
        counted = finite if counted is None else counted.to(finite.device) & finite
        self.update_decisions(features, logits.argmax(dim=1), counted)

    def update_decisions(
        self, features: Tensor, predictions: Tensor, counted: Tensor | None = None, labels: Tensor | None = None
    ) -> None:
        """Like :meth:`update`, with the network's ``(B,)`` decisions ``argmax(logits)`` instead of its logits
        (``counted``: which samples to count, for example those with finite logits). With ``(B,)`` integer
        ``labels`` it also counts the samples whose nearest class centre is their label (:meth:`accuracy`)."""
        device = self.mismatches.device
        nearest, valid = self.ncc.nearest(features.detach().to(device))  # valid: the features were finite
        if counted is not None:
            valid = valid & counted.to(device)
        mismatch = predictions.detach().to(device) != nearest
        self.mismatches += (mismatch & valid).sum()
        self.total += valid.sum()
        if labels is not None:
            self.label_hits += ((nearest == labels.detach().to(device)) & valid).sum()

    def compute(self) -> float:
        """The mismatch fraction in ``[0, 1]``; ``nan`` when no sample was seen."""
        return self._fraction()

    def accuracy(self) -> float:
        """The share of counted samples whose nearest class centre is their label (when ``update_decisions``
        got labels), local to this rank; ``nan`` when no sample was seen."""
        hits, total = int(self.label_hits), int(self.total)
        return hits / total if total > 0 else float("nan")

    def fraction(self) -> float:
        """:meth:`compute` summed over ranks (a collective), without torchmetrics' "compute before update"
        warning: under DDP a rank that saw no sample this epoch is normal (uneven shards)."""
        return self.synced(self._fraction)

    def _fraction(self) -> float:
        mismatches, total = int(self.mismatches), int(self.total)
        return mismatches / total if total > 0 else float("nan")

"""``NCCMismatch``: the NC4 mismatch between the network and the nearest-class-centre rule, streamed."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_neural_collapse.functional.nc4 import ncc_predictions
from lightning_neural_collapse.sync import all_reduce_sum, synced


class NCCMismatch(Metric):
    """Share of samples where ``argmax`` of the network's logits differs from ``argmin_c ||h - mu_c||``.

    The class means come from a previous pass (:meth:`NeuralCollapse.statistics`), so exact NC4 takes
    two passes over the data; in a training run the means of the previous measurement can serve.
    Samples with a non-finite feature or logit are skipped.

    Args:
        means: ``(C, D)`` class means.
        present: optional ``(C,)`` mask of the classes the NCC rule may pick (default: all).
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> metric = NCCMismatch(torch.tensor([[0.0], [4.0]]))
        >>> metric.update(torch.tensor([[1.0], [3.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        >>> metric.compute()
        0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    mismatches: Tensor
    total: Tensor
    means: Tensor
    present: Tensor

    def __init__(self, means: Tensor, present: Tensor | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("compute_with_cache", False)
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (num_classes, dim), got {tuple(means.shape)}")
        mask = torch.ones(means.shape[0], dtype=torch.bool) if present is None else present.to(torch.bool)
        mask = mask.cpu() & torch.isfinite(means).all(dim=1).cpu()
        self.register_buffer("means", torch.nan_to_num(means.detach().to(torch.float64)))
        self.register_buffer("present", mask.to(self.means.device))
        self.add_state("mismatches", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: Tensor, logits: Tensor) -> None:
        """Accumulate a batch of ``(B, D)`` features and the network's ``(B, C)`` logits."""
        if logits.ndim != 2 or logits.shape[0] != features.shape[0]:
            raise ValueError(f"logits must have shape ({features.shape[0]}, num_classes), got {tuple(logits.shape)}")
        features = features.detach().to(self.means.device)
        logits = logits.detach().to(self.means.device)
        valid = torch.isfinite(features).all(dim=1) & torch.isfinite(logits).all(dim=1)
        safe = torch.where(valid[:, None], features, torch.zeros_like(features))
        mismatch = logits.argmax(dim=1) != ncc_predictions(safe, self.means, self.present)
        self.mismatches += (mismatch & valid).sum()
        self.total += valid.sum()

    def compute(self) -> float:
        """The mismatch fraction in ``[0, 1]``; ``nan`` when no sample was seen."""
        return self._local_fraction()

    def fraction(self) -> float:
        """:meth:`compute` summed over ranks (a collective), without torchmetrics' "compute before update"
        warning: under DDP a rank that saw no sample this epoch is normal (uneven shards)."""
        return synced(self, self._local_fraction)

    def _local_fraction(self) -> float:
        return float(self.mismatches / self.total) if float(self.total) > 0 else float("nan")

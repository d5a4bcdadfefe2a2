"""``ClassificationError``: the share of misclassified samples, from logits, summed over ranks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_neural_collapse.metrics.base import SumStateMetric


class ClassificationError(SumStateMetric):
    """Fraction of samples with ``argmax(logits) != label``; integer counts, exact across ranks.

    Samples whose label lies outside ``[0, num_classes)`` (``ignore_index`` among them) or whose logits
    are not finite are not counted. ``update`` never synchronises with the host.

    Example:
        >>> err = ClassificationError(num_classes=3)
        >>> err.update(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2]))
        >>> err.compute()
        0.5
    """

    errors: Tensor
    total: Tensor

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.add_state("errors", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor, counted: Tensor | None = None) -> None:
        """Accumulate ``(B, C)`` logits against ``(B,)`` integer labels.

        ``counted`` (``(B,)`` bool) may restrict the samples further (the callback passes its one definition
        of a counted sample, see :func:`~lightning_neural_collapse.pipeline.labels.counted_samples`).
        """
        logits = logits.detach().to(self.errors.device)
        finite = torch.isfinite(logits).all(dim=1)
        self.update_decisions(logits.argmax(dim=1), labels, finite if counted is None else counted & finite)

    def update_decisions(self, predictions: Tensor, labels: Tensor, counted: Tensor | None = None) -> None:
        """Like :meth:`update`, with the network's ``(B,)`` decisions ``argmax(logits)`` instead of its logits."""
        predictions = predictions.detach().to(self.errors.device)
        labels = labels.detach().to(self.errors.device, torch.long)
        valid = (labels >= 0) & (labels < self.num_classes)
        if counted is not None:
            valid = valid & counted.to(valid.device)
        self.errors += ((predictions != labels) & valid).sum()
        self.total += valid.sum()

    def counts(self) -> tuple[int, int]:
        """``(errors, total)`` summed over ranks (a collective)."""
        return self.synced(lambda: (int(self.errors), int(self.total)))

    def compute(self) -> float:
        """The error fraction in ``[0, 1]``; ``nan`` when no sample was counted."""
        errors, total = int(self.errors), int(self.total)
        return errors / total if total > 0 else float("nan")

"""Which epochs are measured.

The training error (and so TPT) is counted in every epoch. Neural Collapse itself is measured in the
epochs ``0, n, 2n, ...`` (``every_n_epochs=n``), in the last epoch of the fit, and, with
``measure="tpt"``, only once TPT has begun. The last epoch is known in advance when only ``max_epochs``
ends the fit. When the fit can end earlier (``max_steps``, ``max_time``, early stopping, an infinite
``max_epochs``), the epochs that are not due are kept on *standby* in online mode: their statistics are
accumulated and measured only if the fit ends after them; in exact mode the last epoch reached is
measured when the fit ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_neural_collapse.pipeline.config import Measure


@dataclass(frozen=True)
class Limits:
    """How the fit ends: ``max_epochs`` (``None`` or negative: no limit) and whether anything else can end it
    earlier (``open_ended``: ``max_steps``, ``max_time``, early stopping)."""

    max_epochs: int | None
    open_ended: bool

    def is_last(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last one ``max_epochs`` allows."""
        return self.max_epochs is not None and self.max_epochs > 0 and epoch == self.max_epochs - 1

    @property
    def known_end(self) -> bool:
        """Whether the last epoch is known in advance."""
        return not self.open_ended and self.max_epochs is not None and self.max_epochs > 0


@dataclass(frozen=True)
class EpochPlan:
    """What the training steps of an epoch accumulate: ``statistics`` (NC is due this epoch) or, on
    ``standby``, statistics measured only if the fit ends with this epoch."""

    statistics: bool
    standby: bool

    @property
    def accumulates(self) -> bool:
        """Whether the steps feed NC statistics at all."""
        return self.statistics or self.standby


class Schedule:
    """The measurement schedule of ``every_n_epochs`` and ``measure``.

    Example:
        >>> schedule = Schedule(every_n_epochs=3, measure="always")
        >>> limits = Limits(max_epochs=8, open_ended=False)
        >>> [epoch for epoch in range(8) if schedule.due(epoch, limits, tpt_started=False)]
        [0, 3, 6, 7]
        >>> schedule.online_plan(1, Limits(max_epochs=8, open_ended=True), tpt_started=False)
        EpochPlan(statistics=False, standby=True)
    """

    def __init__(self, every_n_epochs: int = 1, measure: Measure = "always") -> None:
        self.every_n_epochs = every_n_epochs
        self.measure = measure

    def due(self, epoch: int, limits: Limits, *, tpt_started: bool) -> bool:
        """Whether NC is measured in ``epoch``; ``tpt_started`` says whether TPT has begun by then."""
        if self.measure == "tpt" and not tpt_started:
            return False
        return epoch % self.every_n_epochs == 0 or limits.is_last(epoch)

    def online_plan(self, epoch: int, limits: Limits, *, tpt_started: bool) -> EpochPlan:
        """What online mode accumulates in ``epoch``, decided at its start (``tpt_started``: before it)."""
        due = self.due(epoch, limits, tpt_started=tpt_started)
        allowed = self.measure == "always" or tpt_started
        return EpochPlan(statistics=due, standby=not due and allowed and not limits.known_end)

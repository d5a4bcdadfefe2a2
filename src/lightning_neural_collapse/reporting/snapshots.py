"""When a fit writes its histograms and its figure: a log-spaced schedule that TensorBoard keeps whole.

TensorBoard's server keeps at most 100 histogram steps of a tag by default (its Histograms tab draws 51), chosen
at random: with one histogram per epoch for 600 epochs the epochs before TPT never appear. A
:class:`SnapshotSchedule` writes at most :data:`SNAPSHOTS` of them, log-spaced over the fit (dense early, where
the collapse starts), plus the first measured unit, the unit where TPT begins and the last one.
"""

from __future__ import annotations

import math

SNAPSHOTS = 40
"""Log-spaced snapshots over a fit of known length (first, TPT and last come on top: at most 43 in all)."""
PER_DECADE = 10
"""Snapshots per decade of units when the fit's length is unknown (``max_epochs=-1``)."""


class SnapshotSchedule:
    """Decides, for each measured unit (epoch, or window of steps), whether its snapshot is written.

    Targets are the units ``round(expm1(k * r))``, ``k = 0, 1, ...``, with ``r = log1p(horizon) / (SNAPSHOTS - 1)``
    so that the last target is the horizon (the last unit the fit can reach), or ``r = ln(10) / PER_DECADE`` when it
    is unknown. A measured unit is due when it is the first of the fit, the TPT unit, at or past the horizon, or when
    a target lies after the last unit written and at or before it (so a sparser measurement schedule still gets one
    snapshot per target it passes).

    Args:
        horizon: the last unit the fit can reach (``max_epochs - 1``), or ``None`` when unknown.

    Example:
        >>> schedule = SnapshotSchedule(horizon=599)
        >>> due = [e for e in range(600) if schedule.offer(e, tpt_unit=7)]
        >>> len(due), due[:12], due[-3:]
        (34, [0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 13, 15], [431, 508, 599])
    """

    def __init__(self, horizon: int | None, count: int = SNAPSHOTS) -> None:
        self.horizon = horizon if horizon is not None and horizon >= 1 else None
        self.rate = math.log1p(self.horizon) / (count - 1) if self.horizon is not None else math.log(10) / PER_DECADE
        self.written: int | None = None
        """The last unit whose snapshot was written in this fit."""

    def target_after(self, unit: int) -> int:
        """The first target unit after ``unit``."""
        k = max(0, math.floor(math.log1p(max(unit, 0)) / self.rate) - 1)
        while (target := round(math.expm1(k * self.rate))) <= unit:
            k += 1
        return target

    def due(self, unit: int, tpt_unit: int | None = None) -> bool:
        """Whether the snapshot of measured ``unit`` is written (does not record it: see :meth:`mark`)."""
        if self.written is None or unit == tpt_unit:
            return True
        if self.horizon is not None and unit >= self.horizon:
            return True
        return unit > self.written and self.target_after(self.written) <= unit

    def mark(self, unit: int) -> None:
        """Record that ``unit``'s snapshot was written."""
        self.written = unit if self.written is None else max(self.written, unit)

    def offer(self, unit: int, tpt_unit: int | None = None) -> bool:
        """:meth:`due`, and :meth:`mark` when it is: whether ``unit``'s snapshot is to be written now."""
        if self.due(unit, tpt_unit):
            self.mark(unit)
            return True
        return False

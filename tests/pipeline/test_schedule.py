"""``pipeline.schedule``: which epochs are measured, and which wait on standby."""

from __future__ import annotations

import pytest

from lightning_neural_collapse.pipeline.schedule import EpochPlan, Limits, Schedule


def test_every_n_epochs_and_the_last() -> None:
    schedule = Schedule(every_n_epochs=4)
    limits = Limits(max_epochs=10, open_ended=False)
    assert [e for e in range(10) if schedule.due(e, limits, tpt_started=False)] == [0, 4, 8, 9]
    assert limits.known_end and limits.is_last(9) and not limits.is_last(8)


@pytest.mark.parametrize("max_epochs", [None, -1, 0])
def test_no_epoch_limit_has_no_known_last(max_epochs: int | None) -> None:
    limits = Limits(max_epochs=max_epochs, open_ended=False)
    assert not limits.known_end and not limits.is_last(0)
    assert Schedule(3).online_plan(1, limits, tpt_started=False) == EpochPlan(statistics=False, standby=True)


def test_measure_tpt_waits_for_tpt() -> None:
    schedule = Schedule(every_n_epochs=1, measure="tpt")
    limits = Limits(max_epochs=5, open_ended=True)
    assert not schedule.due(2, limits, tpt_started=False)
    assert schedule.due(2, limits, tpt_started=True)
    assert schedule.online_plan(2, limits, tpt_started=False) == EpochPlan(statistics=False, standby=False)


def test_standby_only_when_the_end_can_come_early() -> None:
    schedule = Schedule(every_n_epochs=5)
    closed, open_ended = Limits(max_epochs=20, open_ended=False), Limits(max_epochs=20, open_ended=True)
    assert schedule.online_plan(3, closed, tpt_started=False) == EpochPlan(statistics=False, standby=False)
    plan = schedule.online_plan(3, open_ended, tpt_started=False)
    assert plan == EpochPlan(statistics=False, standby=True) and plan.accumulates
    assert schedule.online_plan(5, open_ended, tpt_started=False) == EpochPlan(statistics=True, standby=False)
    assert Schedule(1).online_plan(3, open_ended, tpt_started=False).standby is False  # every epoch is due

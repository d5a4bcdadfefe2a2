"""``reporting.snapshots``: at most ~50 log-spaced snapshots, with the first, the TPT and the last."""

from __future__ import annotations

import math

import pytest

from lightning_neural_collapse.reporting.snapshots import PER_DECADE, SNAPSHOTS, SnapshotSchedule


@pytest.mark.parametrize("epochs", [1, 2, 10, 60, 600, 5000, 100_000])
def test_every_epoch_measured_gets_few_log_spaced_snapshots(epochs: int) -> None:
    schedule = SnapshotSchedule(horizon=epochs - 1)
    written = [e for e in range(epochs) if schedule.offer(e, tpt_unit=None)]
    assert written[0] == 0 and written[-1] == epochs - 1
    assert len(written) <= min(epochs, SNAPSHOTS + 2)
    assert written == sorted(set(written))
    if epochs >= 600:  # log-spaced: the first tenth of the fit holds more than half of them
        assert sum(e < epochs / 10 for e in written) > len(written) / 2


def test_the_tpt_epoch_is_always_written() -> None:
    for tpt in (13, 47, 301):
        schedule = SnapshotSchedule(horizon=599)
        assert tpt in [e for e in range(600) if schedule.offer(e, tpt_unit=tpt if e >= tpt else None)]


def test_a_sparse_measurement_schedule_gets_one_snapshot_per_target_it_passes() -> None:
    schedule = SnapshotSchedule(horizon=999)
    measured = range(0, 1000, 25)
    written = [e for e in measured if schedule.offer(e)]
    assert written[:4] == [0, 25, 50, 75]  # the last measured (975) is the reporter's to write at the end
    dense = SnapshotSchedule(horizon=999)
    targets = {e for e in range(1000) if dense.offer(e)}
    for previous, unit in zip(written, written[1:], strict=False):  # each write has a target in (previous, unit]
        assert any(previous < t <= unit for t in targets)


def test_an_open_ended_fit_gets_a_fixed_density_per_decade() -> None:
    schedule = SnapshotSchedule(horizon=None)
    written = [e for e in range(100_000) if schedule.offer(e)]
    assert len(written) <= PER_DECADE * math.log10(100_000) + 3
    assert schedule.due(10**6)  # a target lies ahead, however long the fit


def test_due_does_not_record_and_mark_keeps_the_latest() -> None:
    schedule = SnapshotSchedule(horizon=99)
    assert schedule.due(0) and schedule.due(0)
    schedule.mark(5)
    schedule.mark(3)
    assert schedule.written == 5 and not schedule.due(5)

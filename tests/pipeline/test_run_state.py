"""``pipeline.run_state``: the checkpointed state, the per-epoch record, and what an open epoch brings."""

from __future__ import annotations

import torch

from lightning_neural_collapse.pipeline.accumulate import Accumulator, Reference
from lightning_neural_collapse.pipeline.compute import EpochOutcome
from lightning_neural_collapse.pipeline.run_state import OpenEpoch, SavedState, build_record
from lightning_neural_collapse.pipeline.schedule import EpochPlan

COUNTS = {"errors": 2, "total": 8, "nonfinite": 1, "bad_label": 0, "ncc_mismatches": 1, "ncc_total": 4}


def test_saved_state_round_trip_and_finished_epochs() -> None:
    saved = SavedState(0.0)
    saved.commit({"epoch": 0, "step": 3, "train_error": 0.5})
    saved.tpt.update(1, 0.0)
    saved.commit({"epoch": 1, "step": 7, "train_error": 0.0, "tpt_epoch": 1})
    saved.reference = Reference(torch.ones(2, 3), torch.tensor([True, False]))
    saved.mark_finished(2)  # skipped: no record
    saved.val_history.append({"epoch": 1, "step": 7, "ncc_accuracy": 0.75})
    restored = SavedState(0.0)
    restored.load_state_dict(saved.state_dict())
    assert restored.history == saved.history and restored.tpt.epoch == 1 and restored.restored
    assert restored.finished(2) and restored.finished(0) and not restored.finished(3)
    assert restored.reference is not None and torch.equal(restored.reference.means, torch.ones(2, 3))
    assert restored.record(1) == {"epoch": 1, "step": 7, "train_error": 0.0, "tpt_epoch": 1}
    assert restored.val_history == saved.val_history and restored.val_history[0] is not saved.val_history[0]
    restored.clear()
    assert restored.history == [] and restored.tpt.epoch is None and restored.reference is None
    assert restored.val_history == []


def test_checkpoints_of_0_1_load() -> None:
    old = {
        "history": [{"epoch": 0, "step": 8}, {"epoch": 1, "step": 16}],
        "tpt_epoch": None,
        "tpt_threshold": 0.0,
        "reference_means": None,
        "reference_present": None,
    }
    saved = SavedState(0.0)
    saved.load_state_dict(old)
    assert saved.finished_epoch == 1 and saved.reference is None


def test_records_by_mode() -> None:
    online = build_record(
        EpochOutcome("measured", dict(COUNTS), values={"nc1": 0.5}), 2, 15, exact=False, partial=False
    )
    assert online == {
        "epoch": 2,
        "step": 15,
        "train_error": 0.25,
        "skipped_samples": 1.0,
        "nc1": 0.5,
        "nc4_ncc_mismatch_prev_means": 0.25,
    }
    exact_counts = {"errors": 1, "total": 10, "nonfinite": 0, "bad_label": 2, "ncc_mismatches": 3, "ncc_total": 10}
    outcome = EpochOutcome("measured", dict(COUNTS), exact_counts, values={"nc1": 0.5})
    exact = build_record(outcome, 2, 15, exact=True, partial=False)
    assert exact["train_error"] == 0.25 and exact["train_error_eval"] == 0.1 and exact["nc4_ncc_mismatch"] == 0.3
    assert exact["skipped_samples"] == 1.0 and exact["skipped_samples_eval"] == 2.0
    assert "nc4_ncc_mismatch_prev_means" not in exact
    partial = build_record(outcome, 2, 15, exact=True, partial=True)
    assert "train_error" not in partial and "nc1" in partial  # a resumed epoch: no training-step error
    counted = build_record(EpochOutcome("counted", dict(COUNTS)), 2, 15, exact=False, partial=False)
    assert set(counted) == {"epoch", "step", "train_error", "skipped_samples"}


def test_open_epoch_brings_its_counts_or_its_failure() -> None:
    epoch = OpenEpoch(3, EpochPlan(statistics=True, standby=False))
    local = epoch.local(torch.device("cpu"), statistics=True)
    assert local.failure == "no training batch measured on this rank yet" and local.statistics is None
    epoch.accumulator = Accumulator(2, 1, torch.device("cpu"), statistics=True)
    local = epoch.local(torch.device("cpu"), statistics=True)
    assert local.failure is None and local.statistics is epoch.accumulator.statistics
    assert epoch.local(torch.device("cpu"), statistics=False).statistics is None
    epoch.failure = "KeyError: 'y'"
    assert epoch.local(torch.device("cpu"), statistics=True).failure == "KeyError: 'y'"

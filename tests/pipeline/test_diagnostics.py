"""``pipeline.diagnostics``: the warnings a measurement gives, and the callback's other messages."""

from __future__ import annotations

import torch

from lightning_neural_collapse.functional import ClassStatistics
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline.compute import EpochOutcome


def _stats(counts: list[float]) -> ClassStatistics:
    c = torch.tensor(counts, dtype=torch.float64)
    return ClassStatistics(c, torch.zeros(len(counts), 2, dtype=torch.float64), torch.eye(2), torch.zeros(len(c)))


def test_skipped_samples_absent_classes_and_one_class() -> None:
    outcome = EpochOutcome("measured", {"nonfinite": 2, "bad_label": 1}, {"nonfinite": 1}, _stats([3, 0, 2]))
    found = dict(say.epoch_warnings(outcome, 4, 3, "nc"))
    assert set(found) == {"nonfinite", "bad-label", "absent"}
    assert "3 samples of epoch 4 had NaN/Inf" in found["nonfinite"] and "`nc/skipped_samples`" in found["nonfinite"]
    assert "class(es) [1] had no sample in epoch 4" in found["absent"] and "C = 2 present" in found["absent"]
    one = dict(say.epoch_warnings(EpochOutcome("measured", {}, statistics=_stats([0, 5, 0])), 0, 3, "nc"))
    assert list(one) == ["one-class"] and "only class 1 has samples" in one["one-class"]
    assert say.epoch_warnings(EpochOutcome("counted", {"nonfinite": 0, "bad_label": 0}), 0, 3, "nc") == []


def test_messages_name_what_to_change() -> None:
    assert "`classifier=`" in say.no_forward("fc")
    assert "ran 2 times" in say.several_forwards("fc", 2) and "`label_getter=`" in say.several_forwards("fc", 2)
    assert "`label_getter=`" in say.batch_size_mismatch(4, 8)
    assert "`input_getter=`" in say.exact_failure("exact pass", "TypeError: x", 0)
    assert "`exact_dataloader=`" in say.exact_failure("exact pass", None, 1)
    assert "1 other rank(s)" in say.exact_failure("exact pass", None, 1)
    assert "mode='exact'" in say.partial_epoch(3) and "TPT is not decided" in say.partial_epoch(3)
    assert "every rank skips it" in say.skipped_epoch(2, "exact pass", 1)
    assert "up to 1 samples twice" in say.padded_sampler(301, 2)

"""``pipeline.held_out``: opening, adding to and finishing validation runs with a stand-in trainer (no Trainer),
and the record of one dataloader's outcome. Numbers are checked against the functional metrics in float64."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from stand_ins import Recorder
from torch import Tensor, nn

from lightning_neural_collapse.functional.collapse import geometry
from lightning_neural_collapse.functional.held_out import mean_shift
from lightning_neural_collapse.functional.statistics import class_statistics
from lightning_neural_collapse.pipeline.accumulate import COUNT_KEYS, Reference
from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.compute import EpochOutcome, RankGroup
from lightning_neural_collapse.pipeline.config import Config
from lightning_neural_collapse.pipeline.epoch_end import EpochEnd
from lightning_neural_collapse.pipeline.first_step import Shapes
from lightning_neural_collapse.pipeline.held_out import HeldOut, LoaderSums, held_out_record
from lightning_neural_collapse.pipeline.labels import LabelReader
from lightning_neural_collapse.pipeline.run_state import FitState, SavedState
from lightning_neural_collapse.reporting.reporter import Reporter

C, D = 3, 6


class Model(nn.Sequential):
    device = torch.device("cpu")  # as a LightningModule tells


def stand_in_trainer(loaders: int = 1, sanity: bool = False, step: int = 11) -> Any:
    return SimpleNamespace(
        loggers=[Recorder()],
        callback_metrics={},
        is_global_zero=True,
        current_epoch=2,
        sanity_checking=sanity,
        num_val_batches=[1] * loaders,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step)),
        global_step=step,
    )


def setup(config: Config, reference: bool = True) -> tuple[HeldOut, FitState, Model, SavedState]:
    torch.manual_seed(0)
    model = Model(nn.Linear(4, D), nn.ReLU(), nn.Linear(D, C))
    saved = SavedState(0.0)
    if reference:
        g = torch.Generator().manual_seed(1)
        saved.reference = Reference(
            torch.randn(C, D, generator=g, dtype=torch.float64), torch.ones(C, dtype=torch.bool)
        )
    reporter = Reporter("nc", log_histograms=False, log_figure=False, figure_name="x.png", global_mean="classes")
    end = EpochEnd(config, saved, reporter, lambda *args: None, RankGroup())
    held = HeldOut(
        config, saved, reporter, RankGroup(), lambda fit, device: end.accumulator(fit, device, statistics=True)
    )
    fit = FitState(Binding(model, "2"), shapes=Shapes(C, D), labels=LabelReader(None, C, None))
    return held, fit, model, saved


def forward(model: Model, fit: FitState, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Any]:
    fit.binding.capture.clear()
    with torch.no_grad():
        logits = model(x)
        features = model[1](model[0](x))
    return features.double(), logits.double(), (x, y)


def test_a_validation_run_matches_the_definitions() -> None:
    held, fit, model, saved = setup(Config())
    trainer = stand_in_trainer()
    held.open(trainer, fit)
    assert fit.validation is not None and fit.validation.epoch == 2
    torch.manual_seed(3)
    feats, logits, labels = [], [], []
    for _ in range(3):
        x, y = torch.randn(20, 4), torch.randint(0, C, (20,))
        h, z, batch = forward(model, fit, x, y)
        held.add(trainer, fit, batch, 0)
        feats.append(h), logits.append(z), labels.append(y)
    record = held.finish(trainer, model, fit)
    assert fit.validation is None and record is not None and saved.val_history == [record]
    h, z, y = torch.cat(feats), torch.cat(logits), torch.cat(labels)
    assert record["epoch"] == 2 and record["step"] == 11
    assert record["accuracy"] == (z.argmax(1) == y).double().mean().item()
    ref = saved.reference
    assert ref is not None
    nearest = torch.cdist(h, ref.means).argmin(1)
    assert record["ncc_accuracy"] == (nearest == y).double().mean().item()
    assert record["nc4_ncc_mismatch"] == (nearest != z.argmax(1)).double().mean().item()
    stats = class_statistics(h, y, C)
    expected = geometry(stats, None).values
    for key in ("nc1", "nc1_cdnv", "nc2_equinorm_means", "nc2_equiangular_means", "nc2_maxangle_means"):
        assert record[key] == pytest.approx(expected[key], rel=1e-9), key
    assert record["mean_shift"] == pytest.approx(mean_shift(stats.means, stats.present, ref.means, ref.present))
    assert "nc3_self_duality" not in record and "train_error" not in record
    ((step, logged),) = trainer.loggers[0].calls
    assert step == 11 and logged["nc_val/ncc_accuracy"] == record["ncc_accuracy"]
    assert logged["nc_val/epoch"] == record["epoch"]


def test_several_loaders_get_tags_and_a_loader_without_batches_takes_part() -> None:
    held, fit, model, saved = setup(Config(val_names=("clean", "noisy", "empty")))
    trainer = stand_in_trainer(loaders=3)
    held.open(trainer, fit)
    for loader in (1, 0):
        x, y = torch.randn(12, 4), torch.arange(12) % C
        held.add(trainer, fit, forward(model, fit, x, y)[2], loader)
    record = held.finish(trainer, model, fit)
    assert record is not None
    assert {"clean/accuracy", "noisy/accuracy", "clean/nc1", "noisy/mean_shift"} <= set(record)
    assert not any(key.startswith("empty/") and key != "empty/skipped_samples" for key in record)
    assert record["empty/skipped_samples"] == 0.0


def test_nothing_is_opened_for_sanity_checks_or_when_turned_off() -> None:
    held, fit, model, saved = setup(Config())
    held.open(stand_in_trainer(sanity=True), fit)
    assert fit.validation is None
    off, fit_off, _, _ = setup(Config(measure_val=False))
    off.open(stand_in_trainer(), fit_off)
    assert fit_off.validation is None and off.finish(stand_in_trainer(), model, fit_off) is None
    before = FitState(Binding(model, "2"))  # the shapes are not known yet
    held.open(stand_in_trainer(), before)
    assert before.validation is None


def test_without_training_means_only_the_validation_keys_and_one_message() -> None:
    held, fit, model, saved = setup(Config(), reference=False)
    trainer = stand_in_trainer()
    held.open(trainer, fit)
    held.add(trainer, fit, forward(model, fit, torch.randn(30, 4), torch.arange(30) % C)[2], 0)
    record = held.finish(trainer, model, fit)
    assert record is not None and "nc1" in record and "accuracy" in record
    assert not {"ncc_accuracy", "nc4_ncc_mismatch", "mean_shift"} & set(record)
    assert "no-reference" in fit.warn.given


def test_a_failing_batch_skips_its_loader_only() -> None:
    held, fit, model, saved = setup(Config(val_names=("good", "bad")))
    trainer = stand_in_trainer(loaders=2)
    held.open(trainer, fit)
    x = torch.randn(9, 4)
    held.add(trainer, fit, forward(model, fit, x, torch.arange(9) % C)[2], 0)
    forward(model, fit, x, torch.arange(9) % C)
    with pytest.warns(RuntimeWarning, match="`nc_val/bad` logs nothing"):
        held.add(trainer, fit, {"no labels": x}, 1)  # the labels cannot be read
        record = held.finish(trainer, model, fit)
    assert record is not None and "good/nc1" in record and not any(k.startswith("bad/") for k in record)


def test_loader_sums_without_batches_bring_zeros() -> None:
    local = LoaderSums().local(torch.device("cpu"))
    assert dict(local.counts) == dict.fromkeys(COUNT_KEYS, 0) and local.statistics is None and local.failure is None


def test_held_out_record_leaves_undefined_keys_out() -> None:
    zero = dict.fromkeys(COUNT_KEYS, 0)
    assert held_out_record(EpochOutcome("counted", zero), None) == {"skipped_samples": 0.0}
    counts = {**zero, "total": 10, "errors": 4, "nonfinite": 1, "ncc_total": 10, "ncc_hits": 7, "ncc_mismatches": 2}
    record = held_out_record(EpochOutcome("counted", counts), None, "a")
    assert record == {"a/accuracy": 0.6, "a/skipped_samples": 1.0, "a/ncc_accuracy": 0.7, "a/nc4_ncc_mismatch": 0.2}
    assert all(not math.isnan(v) for v in record.values())


def test_a_validation_step_without_the_classifier_records_nothing() -> None:
    held, fit, model, saved = setup(Config())
    trainer = stand_in_trainer()
    held.open(trainer, fit)
    fit.binding.capture.clear()  # validation_step did not call the classifier
    with pytest.warns(RuntimeWarning, match="did not run in a validation step"):
        held.add(trainer, fit, (torch.randn(4, 4), torch.arange(4) % C), 0)
    assert held.finish(trainer, model, fit) is None and saved.val_history == [] and trainer.loggers[0].calls == []

"""``pipeline.epoch_end``: finishing an online epoch on a plain module, with a stand-in trainer (no Trainer)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from stand_ins import Recorder
from torch import nn

from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.compute import RankGroup
from lightning_neural_collapse.pipeline.config import Config
from lightning_neural_collapse.pipeline.epoch_end import EpochEnd
from lightning_neural_collapse.pipeline.first_step import Shapes
from lightning_neural_collapse.pipeline.labels import LabelReader
from lightning_neural_collapse.pipeline.run_state import FitState, OpenEpoch, SavedState
from lightning_neural_collapse.pipeline.schedule import EpochPlan
from lightning_neural_collapse.reporting.reporter import Reporter


class Model(nn.Sequential):
    device = torch.device("cpu")  # as a LightningModule tells


def setup(errors: bool) -> tuple[EpochEnd, FitState, Any, nn.Module, list[int]]:
    torch.manual_seed(0)
    model = Model(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    config = Config()
    saved = SavedState(0.0)
    started: list[int] = []
    reporter = Reporter("nc", log_histograms=False, log_figure=False, figure_name="x.png", global_mean="classes")
    end = EpochEnd(config, saved, reporter, lambda trainer, module, epoch: started.append(epoch), RankGroup())
    fit = FitState(Binding(model, "2"), shapes=Shapes(3, 6), labels=LabelReader(None, 3, None))
    fit.open = OpenEpoch(0, EpochPlan(statistics=True, standby=False), step=9)
    x = torch.randn(30, 4)
    with torch.no_grad():
        logits = model(x)
    labels = logits.argmax(dim=1) if not errors else (logits.argmax(dim=1) + 1) % 3
    fit.accumulate((x, labels), lambda device, statistics: end.accumulator(fit, device, statistics=statistics))
    trainer = SimpleNamespace(
        loggers=[Recorder()],
        callback_metrics={},
        is_global_zero=True,
        current_epoch=0,
        callbacks=[],
        max_epochs=5,
        max_steps=-1,
    )
    return end, fit, trainer, model, started


def test_an_epoch_without_errors_starts_tpt_and_is_committed_and_reported() -> None:
    end, fit, trainer, model, started = setup(errors=False)
    end.finish(trainer, model, fit)
    record = end.saved.history[-1]
    assert record["epoch"] == 0 and record["step"] == 9 and record["train_error"] == 0.0 and record["tpt_epoch"] == 0
    assert started == [0] and end.saved.tpt.epoch == 0 and end.saved.finished(0)
    assert "nc1" in record and end.last_statistics is not None and end.saved.reference is not None
    ((step, logged),) = trainer.loggers[0].calls
    assert step == 9 and logged["nc/tpt_epoch"] == 0 and "nc/nc1" in trainer.callback_metrics
    assert fit.open is None and fit.last_measured == 0
    end.finish(trainer, model, fit)  # nothing open: nothing happens
    assert len(end.saved.history) == 1


def test_errors_keep_tpt_away() -> None:
    end, fit, trainer, model, started = setup(errors=True)
    end.finish(trainer, model, fit)
    assert end.saved.history[-1]["train_error"] == 1.0 and end.saved.tpt.epoch is None and started == []


def test_a_partial_online_epoch_is_skipped_with_one_warning() -> None:
    end, fit, trainer, model, _ = setup(errors=False)
    assert fit.open is not None
    fit.open.partial = True
    with pytest.warns(RuntimeWarning, match="epoch 0 resumed from a mid-epoch checkpoint"):
        end.finish(trainer, model, fit)
    assert end.saved.history == [] and end.saved.finished(0) and end.saved.tpt.epoch is None


def test_a_failed_batch_skips_the_epoch() -> None:
    end, fit, trainer, model, _ = setup(errors=False)
    assert fit.open is not None
    fit.open.failure = "KeyError: 'y'"
    with pytest.warns(RuntimeWarning, match=r"epoch 0 is not measured: 1 rank\(s\) could not take part"):
        end.finish(trainer, model, fit)
    assert end.saved.history == [] and end.saved.finished(0)

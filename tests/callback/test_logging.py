"""What reaches the loggers, read back from TensorBoard event files: the steps, several instances, the figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import toy
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toy import ToyClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback

QUIET: dict[str, Any] = {key: v for key, v in toy.QUIET.items() if key != "logger"}
SIZES = {"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}

pytestmark = pytest.mark.usefixtures("one_thread")


class EpochLogging(ToyClassifier):
    """Logs its loss with ``on_epoch=True``: Lightning's own epoch-end metric, for the step to compare with."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss


class ManualTwoOptimizers(EpochLogging):
    """Manual optimisation with two optimizers: ``global_step`` counts two steps per batch."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        body, head = self.optimizers()  # type: ignore[misc]
        loss = nn.functional.cross_entropy(self(x), y)
        body.zero_grad()
        head.zero_grad()
        self.manual_backward(loss)
        body.step()
        head.step()
        self.log("loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.body.parameters(), lr=0.1), torch.optim.SGD(self.fc.parameters(), lr=0.1)]


def events(logger: TensorBoardLogger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance=SIZES)
    acc.Reload()
    return acc


def fit(
    model_class: type, callbacks: list[Callback], logger: TensorBoardLogger, epochs: int = 3, **kwargs: Any
) -> L.Trainer:
    """Seeded before the model is built: every run of a test trains the same model on the same batches."""
    L.seed_everything(0, verbose=False)
    model = model_class()
    features, labels = blobs(120)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=logger, log_every_n_steps=1, **{**QUIET, **kwargs}
    )
    trainer.fit(model, DataLoader(TensorDataset(features, labels), batch_size=20, shuffle=True))
    return trainer


@pytest.mark.parametrize("mode", ["online", "exact"])
@pytest.mark.parametrize("model", [EpochLogging, ManualTwoOptimizers], ids=["automatic", "manual, two optimizers"])
def test_scalars_sit_at_the_step_of_lightnings_epoch_metrics(model: type, mode: str, tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    nc = NeuralCollapseCallback(mode=mode)
    trainer = fit(model, [nc], logger)
    acc = events(logger)
    lightning_steps = [e.step for e in acc.Scalars("loss")]
    assert len(lightning_steps) == 3
    for tag in ("nc/train_error", "nc/nc1", "nc/skipped_samples"):
        assert [e.step for e in acc.Scalars(tag)] == lightning_steps, tag
    assert [r["step"] for r in nc.history] == lightning_steps
    assert [e.step for e in acc.Histograms("nc/hist/cosines_means")] == lightning_steps
    if model is ManualTwoOptimizers:
        assert trainer.global_step == 2 * 6 * 3  # two optimizer steps per batch: not the logging step


def test_several_instances_share_one_layout_and_keep_their_own_figure(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path)
    penultimate = NeuralCollapseCallback()
    hidden = NeuralCollapseCallback(features="body.1", prefix="nc/hidden", log_histograms=False)
    fit(ToyClassifier, [penultimate, hidden], logger, epochs=2)
    acc = events(logger)
    (event,) = acc.Tensors("custom_scalars__config__")  # one layout, written once, with both prefixes
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["Neural collapse (nc)", "Neural collapse (nc/hidden)"]
    assert penultimate.figure_path == str(Path(logger.log_dir) / "neural_collapse.png")
    assert hidden.figure_path == str(Path(logger.log_dir) / "neural_collapse_nc_hidden.png")
    assert Path(penultimate.figure_path).is_file() and Path(hidden.figure_path).is_file()
    assert {"nc/figure", "nc/hidden/figure"} <= set(acc.Tags()["images"])
    assert penultimate.history[-1]["nc1"] != hidden.history[-1]["nc1"]  # two layers, two numbers


def test_train_error_has_one_meaning_whatever_is_measured(tmp_path: Path) -> None:
    """``train_error`` is the training steps' error every epoch (it defines TPT), in both modes, whatever
    ``every_n_epochs`` says; the exact pass's own error is ``train_error_eval``, on measured epochs only."""
    runs = {}
    for name, nc in {
        "online": NeuralCollapseCallback(),
        "exact": NeuralCollapseCallback(mode="exact"),
        "exact/3": NeuralCollapseCallback(mode="exact", every_n_epochs=3),
    }.items():
        fit(ToyClassifier, [nc], TensorBoardLogger(tmp_path, name=name.replace("/", "_")), epochs=5)
        runs[name] = nc
    errors = {name: [r["train_error"] for r in nc.history] for name, nc in runs.items()}
    assert errors["online"] == errors["exact"] == errors["exact/3"] and len(errors["online"]) == 5
    assert len({nc.tpt_epoch for nc in runs.values()}) == 1
    assert [r["epoch"] for r in runs["exact/3"].history if "train_error_eval" in r] == [0, 3, 4]
    assert all("train_error_eval" not in r for r in runs["online"].history)

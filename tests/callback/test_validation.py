"""Held-out collapse in a real Trainer: validation batches against the training means, read back from TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lm_toy import LM, VOCAB, Sequences, token_samples
from reference import held_out_reference
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from toy import QUIET, ValidatedClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional.held_out import HELD_OUT_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
COUNT_KEYS = ("accuracy", "ncc_accuracy", "nc4_ncc_mismatch")


def data(seed: int = 0, noise: float = 3.0) -> tuple[TensorDataset, TensorDataset]:
    """Training blobs, and validation blobs around the same centres with more noise (so the keys move)."""
    x, y = blobs(192, 4, 10, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    xv, yv = blobs(96, 4, 10, seed=seed)
    xv = xv + noise * torch.randn(xv.shape, generator=g)
    return TensorDataset(x, y), TensorDataset(xv, yv)


def fit(nc: NeuralCollapseCallback, val: Any, *, epochs: int = 3, seed: int = 0, **kwargs: Any) -> ValidatedClassifier:
    train, _ = data()
    L.seed_everything(seed, verbose=False)
    model = ValidatedClassifier()
    trainer = L.Trainer(max_epochs=epochs, callbacks=[nc, *kwargs.pop("callbacks", [])], **{**QUIET, **kwargs})
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True), val)
    return model


def features(model: ValidatedClassifier, dataset: TensorDataset) -> tuple[Tensor, Tensor, Tensor]:
    """The test's own extraction, model in eval mode: float64 features, labels and logits."""
    x, y = dataset.tensors
    model.eval()
    with torch.no_grad():
        h = model.body(x)
        logits = model.fc(h)
    return h.double(), y, logits.double()


def reference(model: ValidatedClassifier, train: TensorDataset, val: TensorDataset) -> dict[str, float]:
    h, y, _ = features(model, train)
    hv, yv, logits = features(model, val)
    return held_out_reference(h.numpy(), y.numpy(), hv.numpy(), yv.numpy(), logits.numpy(), 4)


def test_exact_mode_with_batch_norm_equals_the_reference_of_the_final_model(tmp_path: Path) -> None:
    """Exact mode: the last epoch's training means come from its eval pass with the final model, so every
    ``nc_val/*`` key of the last validation equals the test's float64 reference from features it extracts."""
    train, val = data()
    logger = TensorBoardLogger(tmp_path)
    nc = NeuralCollapseCallback(mode="exact")
    model = fit(nc, DataLoader(val, batch_size=40), logger=logger)
    expected = reference(model, train, val)
    last = nc.val_history[-1]
    assert set(HELD_OUT_KEYS) <= set(last) and last["epoch"] == 2
    for key, value in expected.items():
        if key in COUNT_KEYS:  # counts: exact
            assert round(last[key] * len(val)) == round(value * len(val)), key
        assert last[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert 0.0 < last["mean_shift"] and 0.0 < last["ncc_accuracy"] < 1.0  # the noise moves the keys

    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    val_loss_steps = [e.step for e in acc.Scalars("val_loss")]
    for key in HELD_OUT_KEYS:
        events = acc.Scalars(f"nc_val/{key}")
        assert [e.step for e in events] == val_loss_steps == [int(r["step"]) for r in nc.val_history], key
        assert events[-1].value == pytest.approx(last[key], rel=1e-6, abs=1e-7), key  # TensorBoard keeps float32


def test_sanity_check_steps_change_nothing() -> None:
    _, val = data()
    runs = []
    for steps in (0, 2):
        nc = NeuralCollapseCallback()
        fit(nc, DataLoader(val, batch_size=16), epochs=2, num_sanity_val_steps=steps)
        runs.append((nc.val_history, nc.history))
    assert runs[0] == runs[1] and len(runs[0][0]) == 2


def test_two_validation_dataloaders_get_their_own_tags(tmp_path: Path) -> None:
    train, val = data()
    _, other = data(seed=0, noise=0.5)
    loaders = [DataLoader(val, batch_size=32), DataLoader(other, batch_size=32)]
    nc = NeuralCollapseCallback(mode="exact")
    logger = TensorBoardLogger(tmp_path)
    model = fit(nc, loaders, epochs=2, logger=logger)
    last = nc.val_history[-1]
    for index, dataset in enumerate((val, other)):
        expected = reference(model, train, dataset)
        for key, value in expected.items():
            assert last[f"dataloader_{index}/{key}"] == pytest.approx(value, rel=1e-6, abs=1e-12), (index, key)
    assert last["dataloader_1/mean_shift"] < last["dataloader_0/mean_shift"]  # less noise, smaller shift
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert (
        "nc_val/dataloader_1/ncc_accuracy" in acc.Tags()["scalars"]
        and "nc_val/ncc_accuracy" not in acc.Tags()["scalars"]
    )
    (event,) = acc.Tensors("custom_scalars__config__")  # the dashboard's train-vs-validation charts
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    held_out = next(category for category in layout.category if category.title == "Held-out collapse (nc)")
    (nc1,) = (chart for chart in held_out.chart if chart.title == "NC1: training vs validation")
    assert list(nc1.multiline.tag) == ["^nc/nc1$", "^nc_val/([^/]+/)?nc1$"]

    named = NeuralCollapseCallback(mode="exact", val_names=["noisy", "clean"])
    fit(named, loaders, epochs=2)
    assert named.val_history[-1]["clean/accuracy"] == last["dataloader_1/accuracy"]


def test_online_mode_logs_finite_values_in_range_and_can_be_monitored(tmp_path: Path) -> None:
    _, val = data()
    nc = NeuralCollapseCallback()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="nc_val/ncc_accuracy", mode="max")
    fit(nc, DataLoader(val, batch_size=32), epochs=3, callbacks=[checkpoint], enable_checkpointing=True)
    assert len(nc.val_history) == 3
    for record in nc.val_history:  # online: the epoch's measurement ends with its last batch, before validation
        assert set(HELD_OUT_KEYS) <= set(record)
        assert all(math.isfinite(v) for v in record.values())
        assert all(0.0 <= record[key] <= 1.0 for key in COUNT_KEYS)
        assert record["nc1"] > 0 and record["mean_shift"] > 0
    assert checkpoint.best_model_score is not None
    assert float(checkpoint.best_model_score) == max(r["ncc_accuracy"] for r in nc.val_history)


def test_measure_val_false_and_a_validation_before_any_training_measurement(
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, val = data()
    off = NeuralCollapseCallback(measure_val=False)
    fit(off, DataLoader(val, batch_size=32), epochs=1)
    assert off.val_history == []

    early = NeuralCollapseCallback()
    with caplog.at_level("INFO"):
        fit(early, DataLoader(val, batch_size=32), epochs=2, val_check_interval=0.5)
    first, *later = early.val_history
    assert len(early.val_history) == 4 and first["epoch"] == 0
    assert "ncc_accuracy" not in first and "mean_shift" not in first and "nc1" in first  # nothing to compare with
    assert all("ncc_accuracy" in record for record in later)
    assert "no training measurement to compare with yet" in caplog.text


def test_language_model_tokens_against_the_windows_means() -> None:
    """Every position is a validation sample; with lr=0 the training means of the latest window are those of
    the model, so the held-out keys equal the token reference."""
    train, val = Sequences(64, seed=0), Sequences(32, seed=5)
    torch.manual_seed(0)
    module = LM(lr=0.0)
    nc = NeuralCollapseCallback(every_n_train_steps=2)
    trainer = L.Trainer(max_epochs=1, callbacks=[nc], **QUIET)
    trainer.fit(module, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))
    # the window that ended last before the validation: steps 3 and 4 (batches 2 and 3 of the epoch)
    last_window = torch.utils.data.Subset(train, range(32, 64))
    h, y, _ = token_samples(module, last_window)
    hv, yv, logits = token_samples(module, val)
    expected = held_out_reference(h.numpy(), y.numpy(), hv.numpy(), yv.numpy(), logits.numpy(), VOCAB)
    last = nc.val_history[-1]
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key

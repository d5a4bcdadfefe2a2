"""The measurement lifecycle in a real Trainer: when an epoch finishes, checkpoints, resumes and early ends.

A checkpoint written at the end of epoch ``e`` (at validation end, at epoch end or at its last batch) holds
epoch ``e``; resuming from it repeats the uninterrupted run; a mid-epoch resume never logs a partial epoch as a
whole one; the last epoch reached is measured whatever ends the fit.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import toy
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from toy import ToyClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback

QUIET = toy.QUIET
STATE_KEY = "NeuralCollapseCallback{'classifier': None, 'features': None, 'prefix': 'nc'}"

pytestmark = pytest.mark.usefixtures("one_thread")


class ValClassifier(ToyClassifier):
    """No dropout (a resumed run repeats the uninterrupted one exactly), and a validation loop."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(dropout=0.0, **kwargs)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def loaders(samples: int = 140, batch_size: int = 20) -> tuple[DataLoader, DataLoader]:
    features, labels = blobs(samples)
    data = TensorDataset(features, labels)
    return DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=70)


def fit(callbacks: list[Callback], *, epochs: int, ckpt_path: Path | None = None, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **{**QUIET, **kwargs})
    train, val = loaders()
    trainer.fit(ValClassifier(), train, val, ckpt_path=str(ckpt_path) if ckpt_path else None)
    return trainer


def saved_history(path: Path) -> list[dict[str, float]]:
    state = torch.load(path, weights_only=False)["callbacks"][STATE_KEY]
    return state["history"]


def nc_warnings(record: list[warnings.WarningMessage], pattern: str) -> int:
    return sum(1 for w in record if re.search(pattern, str(w.message)))


@pytest.mark.parametrize("mode", ["online", "exact"])
def test_a_checkpoint_at_validation_end_holds_its_epoch(mode: str, tmp_path: Path) -> None:
    """check_val_every_n_epoch=2: ModelCheckpoint(monitor="nc/nc1") saves at validation end of epochs 1, 3, 5, and
    scores each file with the NC1 of the epoch it is named after; resuming repeats the uninterrupted run."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", monitor="nc/nc1", save_top_k=-1)
    nc = NeuralCollapseCallback(mode=mode)
    fit([nc, checkpoint], epochs=6, check_val_every_n_epoch=2, enable_checkpointing=True)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["epoch=1.ckpt", "epoch=3.ckpt", "epoch=5.ckpt"]
    for epoch in (1, 3, 5):
        path = tmp_path / f"epoch={epoch}.ckpt"
        assert [r["epoch"] for r in saved_history(path)] == list(range(epoch + 1))  # it holds epoch e
        assert float(checkpoint.best_k_models[str(path)]) == pytest.approx(nc.history[epoch]["nc1"], rel=1e-12)

    resumed = NeuralCollapseCallback(mode=mode)
    fit([resumed], epochs=6, check_val_every_n_epoch=2, ckpt_path=tmp_path / "epoch=1.ckpt")
    assert resumed.tpt_epoch == nc.tpt_epoch
    assert [r["epoch"] for r in resumed.history] == list(range(6))
    for got, expected in zip(resumed.history, nc.history, strict=True):
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (got["epoch"], key)


def test_monitoring_nc_keys_with_mid_epoch_validation(tmp_path: Path) -> None:
    """val_check_interval=0.5: the first validation comes before any measurement. The documented recipe,
    ModelCheckpoint(monitor=..., save_on_train_epoch_end=True), scores each epoch's end."""
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, filename="{epoch}", monitor="nc/nc1", save_top_k=-1, save_on_train_epoch_end=True
    )
    nc = NeuralCollapseCallback()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit([nc, checkpoint], epochs=3, val_check_interval=0.5, enable_checkpointing=True)
    assert nc_warnings(record, "could not find the monitored key") == 0
    for epoch in range(3):
        path = tmp_path / f"epoch={epoch}.ckpt"
        assert float(checkpoint.best_k_models[str(path)]) == pytest.approx(nc.history[epoch]["nc1"], rel=1e-12)


def test_a_checkpoint_at_an_epochs_last_batch_holds_it(tmp_path: Path) -> None:
    """Saved in on_train_batch_end of the last batch (every_n_train_steps = steps per epoch): Lightning calls no
    on_train_epoch_end for that epoch after resuming, so its measurement must already be in the checkpoint."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=7, save_top_k=-1)
    nc = NeuralCollapseCallback()
    fit([nc, checkpoint], epochs=4, enable_checkpointing=True, limit_val_batches=0)
    assert [r["epoch"] for r in saved_history(tmp_path / "step=14.ckpt")] == [0, 1]
    resumed = NeuralCollapseCallback()
    fit([resumed], epochs=4, limit_val_batches=0, ckpt_path=tmp_path / "step=14.ckpt")
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert resumed.history[:2] == nc.history[:2] and resumed.tpt_epoch == nc.tpt_epoch


@pytest.mark.parametrize("mode", ["online", "exact"])
def test_a_mid_epoch_resume_never_logs_a_partial_epoch(mode: str, tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=10, save_top_k=-1)
    fit([NeuralCollapseCallback(mode=mode), checkpoint], epochs=2, enable_checkpointing=True, limit_val_batches=0)
    resumed = NeuralCollapseCallback(mode=mode)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit([resumed], epochs=4, limit_val_batches=0, ckpt_path=tmp_path / "step=10.ckpt")  # epoch 1, batch 3
    epochs = [int(r["epoch"]) for r in resumed.history]
    if mode == "online":  # its first batches' sums are lost: not logged, one warning, the history goes on
        assert epochs == [0, 2, 3]
        assert nc_warnings(record, "epoch 1 resumed from a mid-epoch checkpoint") == 1
    else:  # the exact pass measures the whole training set: NC is logged, the partial training error is not
        assert epochs == [0, 1, 2, 3]
        assert "nc1" in resumed.history[1] and "train_error" not in resumed.history[1]
        assert "train_error_eval" in resumed.history[1]
    assert resumed.tpt_epoch != 1  # TPT is never decided on a partial epoch


@pytest.mark.parametrize("mode", ["online", "exact"])
@pytest.mark.parametrize("end", ["max_steps", "early stopping"])
def test_the_last_epoch_reached_is_measured(mode: str, end: str) -> None:
    """every_n_epochs=100 measures epoch 0 only; the epoch where the fit stops is measured too."""
    nc = NeuralCollapseCallback(mode=mode, every_n_epochs=100)
    callbacks: list[Callback] = [nc]
    kwargs: dict[str, Any] = {"limit_val_batches": 0}
    if end == "max_steps":
        kwargs["max_steps"] = 7 * 3 + 4  # 7 batches per epoch: stops at batch 4 of epoch 3
    else:  # stop at TPT, decided at the end of the epoch from the training error this callback logs
        callbacks.append(
            EarlyStopping(monitor="nc/train_error", stopping_threshold=1e-9, check_on_train_epoch_end=True)
        )
    trainer = fit(callbacks, epochs=50, **kwargs)
    last = nc.history[-1]
    assert [r["epoch"] for r in nc.history] == list(range(int(last["epoch"]) + 1))
    if end == "max_steps":
        assert last["epoch"] == 3 and trainer.global_step == 25
    else:
        assert last["epoch"] == nc.tpt_epoch and last["train_error"] == 0.0 and 0 < last["epoch"] < 50
    measured = [int(r["epoch"]) for r in nc.history if "nc1" in r]
    assert measured == [0, int(last["epoch"])]
    expected_nc4 = "nc4_ncc_mismatch" if mode == "exact" else "nc4_ncc_mismatch_prev_means"
    assert expected_nc4 in last and "nc2_maxangle_weights" in last
    assert trainer.callback_metrics["nc/nc1"] == pytest.approx(last["nc1"])


def test_the_same_instance_continues_a_run_with_a_second_fit() -> None:
    """A second fit on the same Trainer continues (epochs go on); a new Trainer from step 0 is a new run."""
    nc = NeuralCollapseCallback()
    train, _ = loaders()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=2, callbacks=[nc], **QUIET)
    model = ValClassifier()
    trainer.fit(model, train)
    trainer.fit_loop.max_epochs = 4
    trainer.fit(model, train)
    assert [r["epoch"] for r in nc.history] == [0, 1, 2, 3]
    fit([nc], epochs=1)
    assert [r["epoch"] for r in nc.history] == [0]


@pytest.mark.parametrize("mode", ["online", "exact"])
def test_the_callback_pickles_before_and_after_a_fit(mode: str) -> None:
    """``strategy="ddp_spawn"`` pickles the callbacks into every process: no lambda or hook may stay behind."""
    import pickle

    nc = NeuralCollapseCallback(mode=mode, val_names=["clean"])
    clone = pickle.loads(pickle.dumps(nc))
    assert clone.config == nc.config and clone.val_history == []
    x, y = blobs(64, 3, 6, seed=0)
    L.Trainer(max_epochs=1, callbacks=[nc], **toy.QUIET).fit(
        ToyClassifier(6, 3), DataLoader(TensorDataset(x, y), batch_size=16)
    )
    again = pickle.loads(pickle.dumps(nc))
    assert again.history == nc.history and len(again.history) == 1

"""NeuralCollapseCallback in a real Trainer with real loggers, read back from the files they write."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import toy
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from reference import reference_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset
from toy import NoisyDataset, ToyClassifier, ToyData, blobs

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional import ALL_KEYS, NC4_KEY
from lightning_neural_collapse.pipeline.run_state import LAGGED_NC4_KEY

QUIET: dict[str, Any] = {key: v for key, v in toy.QUIET.items() if key not in ("logger", "num_sanity_val_steps")}


class BruteForce(Callback):
    """The test's own measurement: at each epoch end, features of the whole training set in float64; and the
    training steps' own errors, counted from the logits its own hook sees."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels
        self.records: list[tuple[int, dict[str, float]]] = []
        self.step_errors: list[list[int]] = []  # per epoch: [errors, samples] of the training steps
        self._logits: torch.Tensor | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self._logits = output.detach()

        self._handle = pl_module.fc.register_forward_hook(keep)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_errors.append([0, 0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        assert self._logits is not None
        self.step_errors[-1][0] += int((self._logits.argmax(dim=1) != batch[1]).sum())
        self.step_errors[-1][1] += len(batch[1])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle.remove()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model: ToyClassifier = pl_module  # type: ignore[assignment]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            h = model.body(self.features).double()
            logits = model.fc(model.body(self.features))
        model.train(was_training)
        ref = reference_metrics(
            h.numpy(),
            self.labels.numpy(),
            model.fc.weight.detach().double().numpy(),
            model.fc.bias.detach().double().numpy(),
        )
        ref["train_error_eval"] = float((logits.argmax(dim=1) != self.labels).double().mean())
        errors, samples = self.step_errors[-1]
        ref["train_error"] = errors / samples
        # Lightning's epoch-end metrics sit at the last step of the epoch (one optimizer per batch here)
        self.records.append((trainer.global_step - 1, ref))


def _scalars(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _fit(
    callbacks: list[Callback], *, epochs: int, loader: DataLoader, seed: int = 0, **trainer_kw: Any
) -> tuple[ToyClassifier, L.Trainer]:
    L.seed_everything(seed, verbose=False)
    model = ToyClassifier()
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **{**QUIET, **trainer_kw})
    trainer.fit(model, loader)
    return model, trainer


def test_exact_mode_matches_brute_force_epoch_by_epoch(tmp_path: Path) -> None:
    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=32, shuffle=True)
    brute = BruteForce(features, labels)
    nc = NeuralCollapseCallback(mode="exact")
    logger = TensorBoardLogger(tmp_path, name="exact")
    _fit([nc, brute], epochs=8, loader=loader, logger=logger)

    acc = _scalars(logger.log_dir)
    assert len(brute.records) == 8 and len(nc.history) == 8
    for step, ref in brute.records:
        for key in (*ALL_KEYS, "train_error", "train_error_eval"):
            events = {e.step: e.value for e in acc.Scalars(f"nc/{key}")}
            got = events[step]
            if key in ("nc4_ncc_mismatch", "train_error", "train_error_eval"):  # counts: equal up to float32
                assert got == pytest.approx(ref[key], abs=1e-7), (key, step)
            else:
                assert got == pytest.approx(ref[key], rel=1e-3, abs=1e-6), (key, step)

    # TPT: the first epoch whose training steps made no error, whatever the eval-mode error says
    first_zero = next(i for i, (_, ref) in enumerate(brute.records) if ref["train_error"] == 0.0)
    assert nc.tpt_epoch == first_zero
    assert [e.value for e in acc.Scalars("nc/tpt_epoch")] == [first_zero]
    assert nc.history[first_zero]["tpt_epoch"] == first_zero

    hist_tags = acc.Tags()["histograms"]
    for name in ("cosines_means", "cosines_weights", "norms_means", "norms_weights", "cosine_weight_mean"):
        assert f"nc/hist/{name}" in hist_tags
    cos = acc.Histograms("nc/hist/cosines_means")[-1].histogram_value
    assert -1.0 <= cos.min <= cos.max <= 1.0 and cos.num == 4 * 3
    assert "nc/figure" in acc.Tags()["images"]
    assert nc.figure_path is not None and Path(nc.figure_path).is_file()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]


def test_reaches_tpt_and_metrics_in_callback_metrics(tmp_path: Path) -> None:
    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=32, shuffle=True)
    nc = NeuralCollapseCallback()
    _, trainer = _fit([nc], epochs=10, loader=loader, logger=TensorBoardLogger(tmp_path))
    assert nc.tpt_epoch is not None and nc.tpt_epoch < 10
    assert trainer.callback_metrics["nc/tpt_epoch"] == nc.tpt_epoch
    assert "nc/nc1" in trainer.callback_metrics and "nc/train_error" in trainer.callback_metrics
    assert LAGGED_NC4_KEY not in nc.history[0]  # online NC4 needs the previous epoch's means
    assert all(LAGGED_NC4_KEY in record and NC4_KEY not in record for record in nc.history[1:])


def test_online_mode_with_frozen_weights_equals_exact_statistics(tmp_path: Path) -> None:
    """With lr=0 and no dropout the training-time features are those of the model: online == brute force."""
    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=50, shuffle=True)
    L.seed_everything(0, verbose=False)
    model = ToyClassifier(lr=0.0, dropout=0.0)
    nc = NeuralCollapseCallback(mode="online")

    class Frozen(Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            pl_module.eval()

    trainer = L.Trainer(max_epochs=2, callbacks=[Frozen(), nc], logger=False, **{**QUIET})
    trainer.fit(model, loader)
    model.eval()
    with torch.no_grad():
        h = model.body(features).double()
    ref = reference_metrics(
        h.numpy(), labels.numpy(), model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    )
    got = {NC4_KEY if k == LAGGED_NC4_KEY else k: v for k, v in nc.history[-1].items()}  # lr=0: the means stay
    for key in ALL_KEYS:
        assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("mode", ["online", "exact"])
def test_final_weights_bit_identical_with_and_without_callback(mode: str, tmp_path: Path) -> None:
    features, labels = blobs(160)

    def run(with_callback: bool) -> dict[str, torch.Tensor]:
        loader = DataLoader(NoisyDataset(features, labels), batch_size=32, shuffle=True)
        callbacks: list[Callback] = [NeuralCollapseCallback(mode=mode)] if with_callback else []
        model, _ = _fit(callbacks, epochs=4, loader=loader, logger=TensorBoardLogger(tmp_path))
        assert not model.fc._forward_hooks, "hooks must be removed after fit"
        return {k: v.clone() for k, v in model.state_dict().items()}

    with_cb, without_cb = run(True), run(False)
    assert with_cb.keys() == without_cb.keys()
    for key in with_cb:
        assert torch.equal(with_cb[key], without_cb[key]), key


@pytest.mark.parametrize("mode", ["online", "exact"])
def test_resume_from_mid_run_checkpoint_continues_history(mode: str, tmp_path: Path) -> None:
    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=32, shuffle=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    first = NeuralCollapseCallback(mode=mode)
    _fit([first, ckpt], epochs=6, loader=loader, logger=False, enable_checkpointing=True)
    mid = next((tmp_path / "ckpt").glob("epoch=2-*.ckpt"))

    resumed = NeuralCollapseCallback(mode=mode)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=6, callbacks=[resumed], logger=False, **QUIET)
    trainer.fit(ToyClassifier(), loader, ckpt_path=str(mid))
    assert [r["epoch"] for r in resumed.history] == list(range(6))
    assert resumed.history[:3] == first.history[:3]
    if first.tpt_epoch is not None and first.tpt_epoch <= 2:
        assert resumed.tpt_epoch == first.tpt_epoch
    expected_nc4 = NC4_KEY if mode == "exact" else LAGGED_NC4_KEY  # online mode kept the previous means
    assert expected_nc4 in resumed.history[3]


def test_csv_logger_gets_scalars_and_histogram_quantiles(tmp_path: Path) -> None:
    features, labels = blobs(120)
    loader = DataLoader(TensorDataset(features, labels), batch_size=40, shuffle=True)
    logger = CSVLogger(tmp_path, name="csv")
    nc = NeuralCollapseCallback(every_n_epochs=2)
    _fit([nc], epochs=5, loader=loader, logger=logger)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    columns = set(rows[0])
    assert {"nc/nc1", "nc/train_error", "nc/nc3_self_duality", "nc/cosines_means_median"} <= columns
    train_errors = [r["nc/train_error"] for r in rows if r.get("nc/train_error")]
    nc1 = [r["nc/nc1"] for r in rows if r.get("nc/nc1")]
    assert len(train_errors) == 5  # tracked every epoch
    assert len(nc1) == 3  # measured at epochs 0, 2 and the last (4)
    assert all(math.isfinite(float(v)) for v in nc1)
    assert [r["epoch"] for r in nc.history if "nc1" in r] == [0, 2, 4]


def test_no_logger_keeps_history(tmp_path: Path) -> None:
    features, labels = blobs(100)
    loader = DataLoader(TensorDataset(features, labels), batch_size=50)
    nc = NeuralCollapseCallback()
    _fit([nc], epochs=2, loader=loader, logger=False, default_root_dir=tmp_path)
    assert len(nc.history) == 2 and "nc1" in nc.history[-1]
    assert nc.figure_path is None


def test_measure_only_from_tpt_on(tmp_path: Path) -> None:
    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=32, shuffle=True)
    nc = NeuralCollapseCallback(mode="exact", measure="tpt")
    _fit([nc], epochs=8, loader=loader, logger=False)
    assert nc.tpt_epoch is not None
    measured = [r["epoch"] for r in nc.history if "nc1" in r]
    assert measured == list(range(nc.tpt_epoch, 8))
    assert len(nc.history) == 8


def test_tpt_hook_is_called_once(tmp_path: Path) -> None:
    calls: list[int] = []

    class Recording(NeuralCollapseCallback):
        def on_tpt_start(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
            calls.append(epoch)

    features, labels = blobs(200)
    loader = DataLoader(TensorDataset(features, labels), batch_size=32, shuffle=True)
    nc = Recording()
    _fit([nc], epochs=8, loader=loader, logger=False)
    assert calls == [nc.tpt_epoch]


def test_lightning_cli_config_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  callbacks:\n"
        "    - class_path: lightning_neural_collapse.NeuralCollapseCallback\n"
        "      init_args:\n"
        "        mode: exact\n"
        "        every_n_epochs: 2\n"
        "        classifier: fc\n"
        "        label_getter: toy.second_item\n"
    )
    cli = LightningCLI(ToyClassifier, ToyData, run=False, args=["--config", str(config)], save_config_callback=None)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, NeuralCollapseCallback)]
    assert len(callbacks) == 1
    nc = callbacks[0]
    assert (nc.config.mode, nc.config.every_n_epochs, nc.config.classifier) == ("exact", 2, "fc")
    assert nc.config.label_getter is not None and nc.config.label_getter((0, 7)) == 7

    with pytest.raises(SystemExit):
        LightningCLI(
            ToyClassifier,
            ToyData,
            run=False,
            args=["--trainer.callbacks.help", "lightning_neural_collapse.NeuralCollapseCallback"],
        )
    help_text = capsys.readouterr().out
    assert "every_n_epochs" in help_text and "tpt_threshold" in help_text
    assert "measure NC every this many epochs" in " ".join(help_text.split())


def test_ncc_samples_counts_a_seeded_subsample_and_changes_nothing() -> None:
    """``ncc_samples=k``: online NC4 on k samples of each batch, under its own key, the same on every run, and
    the run it observes unchanged (a private generator)."""
    x, y = blobs(160, 4, 10, seed=3)
    runs = []
    for ncc_samples in (8, 8, None):
        torch.manual_seed(0)
        model = ToyClassifier(10, 4)
        nc = NeuralCollapseCallback(ncc_samples=ncc_samples, log_figure=False)
        L.Trainer(max_epochs=3, callbacks=[nc], **toy.QUIET).fit(
            model, DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
        )
        runs.append((nc.history, [p.detach().clone() for p in model.parameters()]))
    (sampled, weights), (again, weights_again), (full, weights_full) = runs
    assert sampled == again  # seeded
    assert all(
        torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(weights, weights_again, weights_full, strict=True)
    )
    for record, plain in zip(sampled[1:], full[1:], strict=True):  # from the second epoch on
        assert LAGGED_NC4_KEY not in record and 0.0 <= record["nc4_ncc_mismatch_prev_means_sampled"] <= 1.0
        assert (
            round(record["nc4_ncc_mismatch_prev_means_sampled"] * 40)
            == record["nc4_ncc_mismatch_prev_means_sampled"] * 40
        )  # 5 batches x 8 samples
        assert LAGGED_NC4_KEY in plain and record["nc1"] == pytest.approx(plain["nc1"], rel=1e-12)

"""Language models in a real Trainer: every position is a sample, Hugging-Face-style batches, windows of steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lm_toy import LM, VOCAB, Sequences, token_samples
from reference import layer_reference, reference_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toy import QUIET

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional import NC4_KEY

pytestmark = pytest.mark.usefixtures("one_thread")
LM_KEYS = (
    "nc1",
    "nc1_cdnv",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_log_energy_means",
    "nc2_etf_distance_means",
    "nc3_self_duality",
    "nc3_cosine",
    "nc3_cosine_cov",
)


def fit(
    module: L.LightningModule, nc: NeuralCollapseCallback, loader: DataLoader, epochs: int = 2, **kwargs: Any
) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, callbacks=[nc], **{**QUIET, **kwargs})
    trainer.fit(module, loader)
    return trainer


def reference(module: LM, data: Any, shift: bool = True) -> dict[str, float]:
    h, labels, logits = token_samples(module, data, shift)
    weight = module.model.lm_head.weight.detach().double().numpy()
    ref = reference_metrics(h.numpy(), labels.numpy(), weight, None, num_classes=VOCAB)
    ref["train_error_eval"] = float((logits.argmax(dim=1) != labels).double().mean())
    return ref


def test_exact_mode_on_hugging_face_batches_equals_the_token_reference(tmp_path: Path) -> None:
    """Padding is -100 in the labels and 0 in the attention mask; the model shifts its labels inside (detected:
    a ``*ForCausalLM``). Every logged key of the last epoch equals the test's own float64 reference."""
    data = Sequences()
    torch.manual_seed(0)
    module = LM()
    logger = TensorBoardLogger(tmp_path)
    nc = NeuralCollapseCallback(mode="exact")
    fit(module, nc, DataLoader(data, batch_size=16, shuffle=True), epochs=3, logger=logger)
    expected = reference(module, data)
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    last = nc.history[-1]
    for key in (*LM_KEYS, NC4_KEY, "train_error_eval"):
        logged = {e.step: e.value for e in acc.Scalars(f"nc/{key}")}[int(last["step"])]
        assert last[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-12), key
        assert logged == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key  # TensorBoard keeps float32
    h, labels, _ = token_samples(module, data)
    assert nc.last_statistics is not None and float(nc.last_statistics.counts.sum()) == len(labels)


def test_windows_of_steps_equal_the_reference_window_by_window() -> None:
    """lr=0 (and no dropout) makes the training steps' features those of the model: each window of 3 steps is
    the reference of its own batches, NC4 against the previous window's class means."""
    data = Sequences(96)
    torch.manual_seed(0)
    module = LM(lr=0.0)
    nc = NeuralCollapseCallback(every_n_train_steps=3)
    loader = DataLoader(data, batch_size=8)  # 12 steps per epoch, in order: windows 0-3 in epoch 0, 4-7 in 1
    fit(module, nc, loader, epochs=2)
    assert [r["window"] for r in nc.history] == list(range(8))
    assert [r["epoch"] for r in nc.history] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [r["step"] for r in nc.history] == [2, 5, 8, 11, 14, 17, 20, 23]
    previous_means: Tensor | None = None
    present = torch.zeros(VOCAB, dtype=torch.bool)
    for record in nc.history:
        window = record["window"] % 4
        part = torch.utils.data.Subset(data, range(window * 24, window * 24 + 24))
        h, labels, logits = token_samples(module, part)
        ref = reference_metrics(
            h.numpy(), labels.numpy(), module.model.lm_head.weight.detach().double().numpy(), None, num_classes=VOCAB
        )
        for key in LM_KEYS:
            assert record[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-12), (record["window"], key)
        assert record["train_error"] == pytest.approx(float((logits.argmax(1) != labels).double().mean()))
        if previous_means is None:
            assert "nc4_ncc_mismatch_prev_means" not in record
        else:
            nearest = torch.cdist(h, previous_means[present]).argmin(dim=1)
            expected = float((logits.argmax(1) != torch.nonzero(present).flatten()[nearest]).double().mean())
            assert record["nc4_ncc_mismatch_prev_means"] == pytest.approx(expected, abs=1e-12)
        counts = torch.bincount(labels, minlength=VOCAB)
        present = counts > 0
        sums = torch.zeros(VOCAB, h.shape[1], dtype=torch.float64).index_add_(0, labels, h)
        previous_means = sums / counts.clamp(min=1)[:, None]


class NanoGPT(L.LightningModule):
    """nanoGPT-style ``(x, y)`` batches, ``y`` already the next tokens; no Hugging Face class: no shift."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = LM(lr=0.0).model  # a plain nn.Module named TinyForCausalLM would trigger the shift
        self.inner.__class__ = type("Decoder", (type(self.inner),), {})

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.inner.lm_head(self.inner.hidden(x))
        return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_aligned_labels_are_not_shifted() -> None:
    data = Sequences(32)
    x = data.ids[:, :-1]
    y = data.ids[:, 1:]
    torch.manual_seed(0)
    module = NanoGPT()
    nc = NeuralCollapseCallback()
    fit(module, nc, DataLoader(TensorDataset(x, y), batch_size=8), epochs=1)
    with torch.no_grad():
        h = module.inner.hidden(x).double().reshape(-1, 16)
    expected = reference_metrics(h.numpy(), y.reshape(-1).numpy(), num_classes=VOCAB)
    assert nc.history[0]["nc1"] == pytest.approx(expected["nc1"], rel=1e-6)
    assert nc.last_statistics is not None and float(nc.last_statistics.counts.sum()) == x.numel()


def test_a_fused_loss_that_never_calls_the_head_is_measured_from_its_weight() -> None:
    data = Sequences(32)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        nc = NeuralCollapseCallback(features="model.norm", classifier="model.lm_head")
        fit(LM(lr=0.0, fused=fused), nc, DataLoader(data, batch_size=8), epochs=2)
        runs.append(nc.history)
    assert runs[0] == runs[1] and "nc4_ncc_mismatch_prev_means" in runs[1][-1]


def test_weight_tying_is_said(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO"):
        fit(LM(tied=True), NeuralCollapseCallback(), DataLoader(Sequences(16), batch_size=8), epochs=1)
    text = caplog.text
    assert "weight of `model.lm_head` is tied to `model.embed`" in text
    assert "every position is a sample (a token). shift_labels=True (automatic: `TinyForCausalLM`" in text


@pytest.mark.parametrize(
    ("classes", "classes_from"),
    [(6, "random"), ([1, 2, 3, 5], "frequent"), (6, "frequent")],
    ids=["random", "listed", "frequent"],
)
def test_a_subset_of_the_classes(classes: Any, classes_from: str) -> None:
    data = Sequences(48)
    torch.manual_seed(0)
    nc = NeuralCollapseCallback(classes=classes, classes_from=classes_from)  # type: ignore[arg-type]
    fit(LM(lr=0.0), nc, DataLoader(data, batch_size=8), epochs=3)
    measured = [r["classes_measured"] for r in nc.history]
    k = classes if isinstance(classes, int) else len(classes)
    if classes_from == "frequent" and isinstance(classes, int):
        assert measured[0] > k and measured[1:] == [k, k]  # all at first, then the k most frequent of it
    else:
        assert all(m <= k for m in measured)
    assert nc.last_statistics is not None and int(nc.last_statistics.present.sum()) == measured[-1]
    if isinstance(classes, list):
        assert set(torch.nonzero(nc.last_statistics.present).flatten().tolist()) <= set(classes)


def test_layers_of_a_language_model_are_measured_per_token() -> None:
    """``layers=`` on a sequence model: each layer's (B, T, D) output gives one row per position, with the same
    shifted labels and padding as the classifier's; the final norm's rows are the features themselves."""
    data = Sequences()
    torch.manual_seed(0)
    module = LM()
    nc = NeuralCollapseCallback(mode="exact", layers=["model.mix", "model.norm"], log_figure=False)
    fit(module, nc, DataLoader(data, batch_size=16, shuffle=True), epochs=2)
    h, labels, _ = token_samples(module, data)
    last = nc.history[-1]
    assert last["layers/model.norm/nc1"] == pytest.approx(last["nc1"], rel=1e-9)
    expected = layer_reference(h.numpy(), labels.numpy(), VOCAB)
    for key in ("nc1_trace_ratio", "nc1_cdnv", "nc2_equinorm_means", "nc2_etf_distance_means"):
        assert last[f"layers/model.norm/{key}"] == pytest.approx(expected[key], rel=1e-6), key
    assert last["layers/model.norm/ncc_accuracy"] == expected["ncc_accuracy"]
    assert 0.0 <= last["layers/model.mix/ncc_accuracy"] <= 1.0 and last["layers/model.mix/nc1"] > 0

"""Exact mode under the user's control: its data, its batch limit, how the model is called, and its errors."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
import toy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import reference_metrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from toy import NoisyDataset, ToyClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional import ALL_KEYS

QUIET = toy.QUIET

pytestmark = pytest.mark.usefixtures("one_thread")


def fit(
    model: L.LightningModule, nc: NeuralCollapseCallback, loader: DataLoader, epochs: int = 2, **kwargs: Any
) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, callbacks=[nc], **{**QUIET, **kwargs})
    trainer.fit(model, loader)
    return trainer


def brute_force(model: ToyClassifier, features: Tensor, labels: Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        h = model.body(features).double()
    return reference_metrics(
        h.numpy(), labels.numpy(), model.fc.weight.detach().double().numpy(), model.fc.bias.detach().double().numpy()
    )


@pytest.mark.parametrize("as_function", [False, True], ids=["loader", "function"])
def test_exact_dataloader_measures_clean_data_while_training_augments(as_function: bool) -> None:
    features, labels = blobs(160)
    clean = DataLoader(TensorDataset(features, labels), batch_size=64)
    nc = NeuralCollapseCallback(mode="exact", exact_dataloader=(lambda: clean) if as_function else clean)
    L.seed_everything(0, verbose=False)
    model = ToyClassifier()
    fit(model, nc, DataLoader(NoisyDataset(features, labels, noise=0.5), batch_size=32, shuffle=True))
    expected = brute_force(model, features, labels)
    for key in ALL_KEYS:
        assert nc.history[-1][key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key


def test_limit_train_batches_limits_the_exact_pass() -> None:
    features, labels = blobs(160)
    nc = NeuralCollapseCallback(mode="exact")
    L.seed_everything(0, verbose=False)
    model = ToyClassifier()
    fit(model, nc, DataLoader(TensorDataset(features, labels), batch_size=20, shuffle=True), limit_train_batches=0.5)
    assert nc.last_statistics is not None and float(nc.last_statistics.counts.sum()) == 80  # 4 of the 8 batches
    expected = brute_force(model, features[:80], labels[:80])  # the first batches of the ordered loader
    assert nc.history[-1]["nc1"] == pytest.approx(expected["nc1"], rel=1e-6)


class Tokens(Dataset):
    """Hugging-Face-style dict batches: ``input_ids``, ``attention_mask`` and one ``labels`` per sequence."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(64) % 3
        self.ids = (self.labels[:, None] * 5 + torch.randint(0, 5, (64, 6), generator=g)) % 15

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        mask = torch.ones(6, dtype=torch.long)
        mask[4 + index % 2 :] = 0
        return {"input_ids": self.ids[index], "attention_mask": mask, "labels": self.labels[index]}


class BagOfTokens(L.LightningModule):
    """``forward(input_ids, attention_mask)``: a masked mean of embeddings, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(15, 8)
        self.fc = nn.Linear(8, 3)
        self.calls: list[tuple[str, ...]] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        self.calls.append(("input_ids", "attention_mask"))
        mask = attention_mask[..., None].float()
        return self.fc((self.embed(input_ids) * mask).sum(1) / mask.sum(1))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        logits = self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_dict_batches_with_input_ids_call_the_model_by_keyword() -> None:
    nc = NeuralCollapseCallback(mode="exact")
    model = BagOfTokens()
    fit(model, nc, DataLoader(Tokens(), batch_size=16))
    assert len(nc.history) == 2 and "nc1" in nc.history[-1] and nc.history[-1]["skipped_samples_eval"] == 0


class TwoArguments(ToyClassifier):
    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:  # type: ignore[override]
        return self.fc(self.body(x) * (1.0 if scale is None else scale))


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_input_getter_may_return_arguments(kind: str) -> None:
    features, labels = blobs(96)
    getter = {"tuple": lambda b: (b[0], torch.tensor(2.0)), "dict": lambda b: {"x": b[0], "scale": torch.tensor(2.0)}}
    nc = NeuralCollapseCallback(mode="exact", input_getter=getter[kind])
    L.seed_everything(0, verbose=False)
    model = TwoArguments()
    fit(model, nc, DataLoader(TensorDataset(features, labels), batch_size=32))
    model.eval()
    with torch.no_grad():
        h = model.body(features).double() * 2.0
    expected = reference_metrics(h.numpy(), labels.numpy())
    assert nc.history[-1]["nc1"] == pytest.approx(expected["nc1"], rel=1e-6)


def test_a_failing_forward_at_the_first_measured_epoch_names_the_cause_and_the_options() -> None:
    features, labels = blobs(64)
    nc = NeuralCollapseCallback(mode="exact", input_getter=lambda b: {"inputs": b[0]})  # no such argument
    with pytest.raises(
        MisconfigurationException,
        match=r"exact pass of the first measured epoch failed: TypeError.*"
        r"`input_getter=`.*`exact_dataloader=`.*mode='online'",
    ):
        fit(ToyClassifier(), nc, DataLoader(TensorDataset(features, labels), batch_size=32))
    assert nc._fit is None  # hooks removed: the model is left as it was

"""What the capture accepts in a real Trainer: one logit row per sample, one forward per step, finite logits,
and float32 statistics that are accurate from the first measurement on."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import pytest
import torch
import toy
from reference import reference_metrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toy import ToyClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.pipeline.samples import CaptureShapeError

QUIET = toy.QUIET

pytestmark = pytest.mark.usefixtures("one_thread")


def loader(samples: int = 64, batch_size: int = 16) -> DataLoader:
    return DataLoader(TensorDataset(*blobs(samples)), batch_size=batch_size)


def fit(
    model: L.LightningModule, nc: NeuralCollapseCallback, epochs: int = 2, data: DataLoader | None = None
) -> L.Trainer:
    trainer = L.Trainer(max_epochs=epochs, callbacks=[nc], **QUIET)
    trainer.fit(model, data or loader())
    return trainer


class ConvHeadBeforePooling(L.LightningModule):
    """A 1x1-conv head applied to a feature map, then pooled: the head's output holds scores per position."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Unflatten(1, (10, 1, 1)), nn.Upsample(scale_factor=4), nn.Conv2d(10, 8, 1))
        self.head = nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.head(self.body(x))).flatten(1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_scores_per_position_are_an_error_before_the_first_optimizer_step() -> None:
    model = ConvHeadBeforePooling()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback(classifier="head")], **QUIET)
    with pytest.raises(CaptureShapeError, match=r"`head` outputs.*\(16, 4, 4, 4\).*`classifier=`.*`features=`"):
        trainer.fit(model, loader())
    assert trainer.global_step == 0 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.head._forward_hooks


class SharpnessAware(ToyClassifier):
    """SAM-style: two forwards and two backward passes per step (manual optimisation)."""

    def __init__(self) -> None:
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        optimizer = self.optimizers()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.01 * p.grad.sign() if p.grad is not None else 0)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        optimizer.step()  # type: ignore[union-attr]
        optimizer.zero_grad()  # type: ignore[union-attr]
        return loss


def test_several_classifier_forwards_per_step_are_said_once() -> None:
    nc = NeuralCollapseCallback()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(SharpnessAware(), nc)
    found = [w for w in record if "ran 2 times in one training step" in str(w.message)]
    assert len(found) == 1 and "SAM" in str(found[0].message)
    assert len(nc.history) == 2 and "nc1" in nc.history[-1]


class InfLinear(nn.Linear):
    """A classifier whose output is infinite for the samples whose first feature is above ``threshold``."""

    threshold = 0.0

    def forward(self, h: Tensor) -> Tensor:
        logits = super().forward(h)
        return torch.where(h[:, :1] > self.threshold, torch.full_like(logits, float("inf")), logits)


class InfiniteLogits(ToyClassifier):
    """Finite features, infinite logits for some samples (the loss skips them); frozen."""

    def __init__(self) -> None:
        super().__init__(lr=0.0, dropout=0.0)
        self.body = nn.Sequential(nn.Linear(10, 32), nn.ReLU())  # no BatchNorm: features do not depend on the batch
        self.fc = InfLinear(32, 4)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        keep = torch.isfinite(logits).all(dim=1)
        return nn.functional.cross_entropy(logits[keep], y[keep])


def test_non_finite_logits_are_counted_in_skipped_samples() -> None:
    features, labels = blobs(64)
    torch.manual_seed(0)
    model = InfiniteLogits()
    model.train()
    with torch.no_grad():
        first = model.body(features)[:, 0]
    model.fc.threshold = float(first.quantile(0.75))
    infinite = int((first > model.fc.threshold).sum())
    assert 0 < infinite < 64
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=rf"{infinite} samples of epoch 0 had NaN/Inf features or logits"):
        fit(model, nc, data=DataLoader(TensorDataset(features, labels), batch_size=16))
    assert [r["skipped_samples"] for r in nc.history] == [infinite, infinite]
    assert nc.last_statistics is not None and float(nc.last_statistics.counts.sum()) == 64 - infinite


class Offset(ToyClassifier):
    """Frozen; penultimate features far from the origin and tightly around their class means."""

    def __init__(self) -> None:
        super().__init__(lr=0.0, dropout=0.0)
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(10, 32))
        with torch.no_grad():
            self.body[0].weight.mul_(1e-3)
            self.body[0].bias.fill_(1000.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


def test_float32_statistics_are_accurate_at_the_first_measurement() -> None:
    """No previous class means exist at epoch 0: each class's first sample is its shift."""
    features, labels = blobs(128)
    model = Offset()
    nc32, nc64 = NeuralCollapseCallback(accumulate_dtype="float32"), NeuralCollapseCallback()
    data = DataLoader(TensorDataset(features, labels), batch_size=32)
    fit(model, nc32, epochs=1, data=data)
    fit(model, nc64, epochs=1, data=data)
    with torch.no_grad():
        h = model.body(features).double()
    expected = reference_metrics(h.numpy(), labels.numpy())
    for key in ("nc1", "nc1_cdnv", "nc2_equinorm_means", "nc2_equiangular_means"):
        assert nc32.history[0][key] == pytest.approx(expected[key], rel=1e-5), key
        assert nc64.history[0][key] == pytest.approx(expected[key], rel=1e-9), key

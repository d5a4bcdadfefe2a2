"""Reliability: every bad input gets a clear message, no run is lost, no number is silently wrong.

Every case runs a real ``Trainer`` on the CPU with tiny generated data. "Warn" means one ``RuntimeWarning``
per run that names the cause and the option to change; "error" means an exception before the first
optimizer step whose message names the option to set. Once training runs, a measurement problem never
alters or stops it: the callback skips what it cannot measure, says so, and logs nothing rather than a
wrong number.
"""

from __future__ import annotations

import csv
import gc
import math
import os
import re
import signal
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import toy
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import reference_metrics
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset
from toy import blobs

import lightning_neural_collapse.reporting.reporter as reporter_module
from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional import ALL_KEYS, NC4_KEY
from lightning_neural_collapse.pipeline.capture import ClassifierNotFoundError
from lightning_neural_collapse.pipeline.labels import BatchFormatError
from lightning_neural_collapse.pipeline.run_state import LAGGED_NC4_KEY

QUIET = toy.QUIET


pytestmark = pytest.mark.usefixtures("one_thread")


BOOK_KEYS = ("epoch", "step", "train_error", "skipped_samples", "tpt_epoch", "train_error_eval", "skipped_samples_eval")
"""History entries that are not Neural Collapse metrics."""


# --------------------------------------------------------------------------------------------------------
# models, data and helpers
# --------------------------------------------------------------------------------------------------------


def _pair(batch: Any) -> tuple[Tensor, Tensor]:
    return batch[0], batch[1]


def mlp(in_dim: int = 8, width: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


class Net(L.LightningModule):
    """``head(body(x))``; no BatchNorm or Dropout, so with ``lr=0`` training features are the model's.

    The loss ignores labels the callback must skip (out of range, negative), so that the run itself goes on.
    ``fail_at`` raises ``fail_with`` from the training step of that (global) batch.
    """

    def __init__(
        self,
        body: nn.Module | None = None,
        head: nn.Module | None = None,
        *,
        num_classes: int = 4,
        width: int = 16,
        lr: float = 0.05,
        unpack: Callable[[Any], tuple[Tensor, Tensor]] = _pair,
        fail_at: int | None = None,
        fail_with: type[BaseException] = RuntimeError,
        autocast: torch.dtype | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)  # the same weights whatever ran before
        self.body = body if body is not None else mlp(8, width)
        self.head = head if head is not None else nn.Linear(width, num_classes)
        self.lr, self.unpack, self.fail_at, self.fail_with, self.autocast = (
            lr,
            unpack,
            fail_at,
            fail_with,
            autocast,
        )
        self.batches = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.fail_at is not None and self.batches == self.fail_at:
            raise self.fail_with("boom")
        self.batches += 1
        x, y = self.unpack(batch)
        if self.autocast is not None:
            with torch.autocast("cpu", dtype=self.autocast):
                logits = self(x)
            return self.loss(logits.float(), y)
        return self.loss(self(x), y)

    @staticmethod
    def loss(logits: Tensor, y: Tensor) -> Tensor:
        if y.is_floating_point():
            return F.cross_entropy(logits, y) if y.shape == logits.shape else logits.sum() * 0.0
        keep = (y >= 0) & (y < logits.shape[1]) & torch.isfinite(logits).all(dim=1)
        return F.cross_entropy(logits[keep], y[keep]) if bool(keep.any()) else logits.sum() * 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(num_samples: int = 64, num_classes: int = 4, dim: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    return blobs(num_samples, num_classes, dim, seed)


def loader(*tensors: Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


def fit(
    callbacks: list[Callback], model: L.LightningModule, train: Any, *, epochs: int = 2, **trainer_kw: Any
) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=callbacks, **{**QUIET, **trainer_kw})
    trainer.fit(model, train)
    return trainer


def brute_force(
    model: Net,
    x: Tensor,
    y: Tensor,
    *,
    features: Callable[[Tensor], Tensor] | None = None,
    num_classes: int | None = None,
) -> dict[str, float]:
    """Every key in float64 from the whole data set, plus the training error of the valid samples."""
    with torch.no_grad():
        h = (features or model.body)(x).flatten(1).double()
        logits = model(x).flatten(1)
    head = model.head
    num_classes = num_classes or logits.shape[1]
    weight = head.weight.detach().double().reshape(num_classes, -1).numpy()
    bias = head.bias.detach().double().numpy() if getattr(head, "bias", None) is not None else None
    keep = torch.isfinite(h).all(dim=1) & (y >= 0) & (y < num_classes)
    ref = reference_metrics(h[keep].numpy(), y[keep].numpy(), weight, bias, num_classes=num_classes)
    ref["train_error"] = float((logits[keep].argmax(dim=1) != y[keep]).double().mean())
    return ref


def lagged_as_nc4(record: dict[str, float]) -> dict[str, float]:
    """Online NC4 against the previous measurement's means equals NC4 with the current ones when lr=0 (the means
    do not move): these tests compare it with the brute-force NC4 under the canonical key."""
    return {NC4_KEY if k == LAGGED_NC4_KEY else k: v for k, v in record.items()}


def assert_matches(record: dict[str, float], ref: dict[str, float], rel: float = 1e-6) -> None:
    record = lagged_as_nc4(record)
    assert {k for k in record if k not in BOOK_KEYS} == {k for k in ref if k != "train_error"}
    for key, value in ref.items():
        tol = 1e-12 if key in ("train_error", NC4_KEY) else 1e-9
        assert record[key] == pytest.approx(value, rel=rel, abs=tol), key


def metric_keys(record: dict[str, float]) -> set[str]:
    return {k for k in lagged_as_nc4(record) if k not in BOOK_KEYS}


def nc_metrics(trainer: L.Trainer, prefix: str = "nc/") -> dict[str, float]:
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}


def count(record: Any, pattern: str) -> int:
    return sum(1 for w in record if re.search(pattern, str(w.message)))


def our_warnings(record: Any) -> list[str]:
    return [
        str(w.message) for w in record if re.match(r"NeuralCollapseCallback|lightning_neural_collapse", str(w.message))
    ]


@contextmanager
def recorded() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, Tensor], trainer: L.Trainer) -> None:
    """The error came before the first optimizer step, and the hooks are gone."""
    assert trainer.global_step == 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())
    assert not torch.nn.modules.module._global_forward_hooks  # the first-step probe is gone too


class Counts(Callback):
    """After the NC callback (listed later): per-class sample counts of each epoch's online statistics."""

    def __init__(self, nc: NeuralCollapseCallback) -> None:
        self.nc, self.counts = nc, []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = self.nc.last_statistics
        self.counts.append(stats.counts.tolist() if stats is not None else None)


# --------------------------------------------------------------------------------------------------------
# non-finite features
# --------------------------------------------------------------------------------------------------------


class NonFiniteNet(Net):
    """Samples marked 1 get NaN features, marked 2 Inf; the classifier is frozen: no NaN gradient."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.head.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, marker = batch
        h = self.body(x)
        h = torch.where(marker[:, None] == 1, float("nan"), h)
        h = torch.where(marker[:, None] == 2, float("inf"), h)
        return self.loss(self.head(h), y)


def test_nonfinite_features_are_skipped_counted_and_never_reach_the_statistics(tmp_path: Path) -> None:
    x, y = data(64)
    marker = torch.zeros(64, dtype=torch.long)
    marker[[20, 21]] = 1  # batch 1
    marker[40] = 2  # batch 2
    model = NonFiniteNet(lr=0.0)
    nc = NeuralCollapseCallback()
    logger = CSVLogger(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"3 samples .* NaN/Inf features") as record:
        trainer = fit([nc], model, loader(x, y, marker), epochs=3, logger=logger)
    assert count(record, "NaN/Inf") == 1  # once per run, not per epoch
    assert [r["skipped_samples"] for r in nc.history] == [3, 3, 3]
    assert float(trainer.callback_metrics["nc/skipped_samples"]) == 3
    assert all(math.isfinite(v) for r in nc.history for v in r.values())
    keep = marker == 0
    assert_matches(nc.history[-1], brute_force(model, x[keep], y[keep]))
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(v) for row in rows for k, v in row.items() if k.startswith("nc/") and v]
    assert logged and all(math.isfinite(v) for v in logged)


# --------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------


def _soft(y: Tensor, num_classes: int = 4) -> Tensor:
    return F.one_hot(y, num_classes).float()


@pytest.mark.parametrize(
    ("make_labels", "kwargs", "match"),
    [
        pytest.param(
            lambda y: torch.where(torch.arange(len(y)) == 3, 7, y),
            {},
            r"label 7 is out of range.*classifier=",
            id="out-of-range",
        ),
        pytest.param(
            lambda y: torch.where(torch.arange(len(y)) == 3, 7, y),
            {"num_classes": 4},
            r"label 7 is out of range.*`num_classes=`",
            id="out-of-range-declared",
        ),
        pytest.param(
            lambda y: torch.where(torch.arange(len(y)) == 3, -3, y),
            {"ignore_index": -100},
            r"label -3 is negative; set `ignore_index=-3`",
            id="negative",
        ),
        pytest.param(
            lambda y: 2 * torch.rand(len(y), 4),
            {},
            r"one-hot or class probabilities.*label_getter=",
            id="float-not-probabilities",
        ),
        pytest.param(lambda y: _soft(y) + _soft((y + 1) % 4), {}, r"multi-label.*label_getter=", id="multi-label"),
        pytest.param(lambda y: y.float(), {}, r"float labels of shape \(16,\).*label_getter=", id="float-1d"),
        pytest.param(lambda y: _soft(y, 5), {}, r"5 columns but the classifier has 4 classes", id="soft-5-columns"),
        pytest.param(lambda y: y[:, None], {}, r"shape \(batch,\).*label_getter=", id="column-labels"),
    ],
)
def test_bad_labels_in_the_first_batch_raise_before_training(
    make_labels: Callable[[Tensor], Tensor], kwargs: dict[str, Any], match: str
) -> None:
    x, y = data(32)
    model = Net()
    before = weights(model)
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback(**kwargs)], **QUIET)
    with pytest.raises(BatchFormatError, match=match):
        trainer.fit(model, loader(x, make_labels(y)))
    assert_untouched(model, before, trainer)


def test_bad_labels_found_mid_run_warn_once_and_are_skipped() -> None:
    """Later batches are not checked on the host (no sync): invalid targets are counted and left out."""
    x, y = data(64)
    bad = y.clone()
    bad[[20, 37]] = torch.tensor([9, -5])  # batches 1 and 2: out of range, negative
    model = Net(lr=0.0)
    nc = NeuralCollapseCallback(ignore_index=-100)
    with pytest.warns(RuntimeWarning, match=r"2 samples .* invalid labels.*`ignore_index=`") as record:
        fit([nc], model, loader(x, bad), epochs=2)
    assert count(record, "invalid labels") == 1
    assert [r["skipped_samples"] for r in nc.history] == [2, 2]
    keep = torch.ones(64, dtype=torch.bool)
    keep[[20, 37]] = False
    assert_matches(nc.history[-1], brute_force(model, x[keep], y[keep]))

    soft = _soft(y)
    soft[40] = soft[40] + soft[41]  # a multi-label row in batch 2
    soft[50] = torch.tensor([0.5, 0.2, 0.2, 0.0])  # not a probability vector
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"2 samples .* invalid labels") as record:
        fit([nc], Net(lr=0.0), loader(x, soft), epochs=1)
    assert count(record, "invalid labels") == 1 and nc.history[0]["skipped_samples"] == 2


def test_ignore_index_drops_samples_and_gives_the_numbers_without_them() -> None:
    x, y = data(64)
    extra_x, extra_y = data(24, seed=1)
    x_all = torch.cat([x, extra_x])[torch.randperm(88, generator=torch.Generator().manual_seed(0))]
    y_all = torch.cat([y, torch.full_like(extra_y, -100)])[
        torch.randperm(88, generator=torch.Generator().manual_seed(0))
    ]
    with_ignored, without = NeuralCollapseCallback(ignore_index=-100), NeuralCollapseCallback()
    with recorded() as record:
        fit([with_ignored], Net(lr=0.0), loader(x_all, y_all, batch_size=22), epochs=2)
        fit([without], Net(lr=0.0), loader(x, y), epochs=2)
    assert not our_warnings(record)
    assert [r["skipped_samples"] for r in with_ignored.history] == [0, 0]
    for got, ref in zip(map(lagged_as_nc4, with_ignored.history), map(lagged_as_nc4, without.history), strict=True):
        assert got.keys() == ref.keys()
        for key in metric_keys(ref) | {"train_error"}:
            assert got[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_num_classes_smaller_than_the_labels() -> None:
    x, y = data(32)
    # declared below the classifier's outputs: refused at fit start
    with pytest.raises(MisconfigurationException, match=r"`num_classes=3` but the classifier `head` has 4 outputs"):
        fit([NeuralCollapseCallback(num_classes=3)], Net(), loader(x, y), epochs=1)
    # a head without `out_features` and a label above `num_classes`: refused in the first batch
    model = Net(head=CosineHead(16, 3))
    before = weights(model)
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback(classifier="head", num_classes=3)], **QUIET)
    with pytest.raises(BatchFormatError, match=r"label 3 is out of range for 3 classes; set `num_classes=`"):
        trainer.fit(model, loader(x, y))
    assert_untouched(model, before, trainer)
    # no `num_classes` and no `out_features`: the classes come from the first logits, checked before backward
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback(classifier="head")], **QUIET)
    with pytest.raises(BatchFormatError, match=r"3 classes from the outputs of `head`\): label 3 is out of range"):
        trainer.fit(model, loader(x, y))
    assert_untouched(model, before, trainer)
    # the label appears only later (a 3-class model): warned, skipped, counted; never a wrong class count
    x, y = data(64)
    y3 = y % 3
    y3[45] = 3
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"2 samples .* invalid labels \(outside \[0, 3\)"):
        fit([nc], Net(num_classes=3, lr=0.0), loader(x.repeat(2, 1), y3.repeat(2)), epochs=1)
    assert nc.history[0]["skipped_samples"] == 2


# --------------------------------------------------------------------------------------------------------
# class coverage
# --------------------------------------------------------------------------------------------------------


def test_absent_class_is_left_out_and_said_once() -> None:
    x, y = data(64, num_classes=3)
    model = Net(num_classes=4, lr=0.0)
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"class\(es\) \[3\] had no sample.*C = 3 present") as record:
        fit([nc], model, loader(x, y), epochs=2)
    assert count(record, "had no sample") == 1
    assert metric_keys(nc.history[-1]) == set(ALL_KEYS)
    assert_matches(nc.history[-1], brute_force(model, x, y))


def test_one_class_logs_only_what_is_defined(tmp_path: Path) -> None:
    """With one class, NC1, NC2 of the means and NC3 are undefined; empty ETF histograms are skipped."""
    x, _ = data(32)
    y = torch.zeros(32, dtype=torch.long)
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"only class 0 has samples") as record:
        trainer = fit([nc], Net(lr=0.0), loader(x, y), epochs=2, logger=TensorBoardLogger(tmp_path))
    assert count(record, "only class 0") == 1
    assert not our_warnings([w for w in record if "only class 0" not in str(w.message)])
    assert metric_keys(nc.history[0]) == {"nc2_equinorm_weights"}
    assert metric_keys(nc.history[1]) == {"nc2_equinorm_weights", NC4_KEY}
    assert set(nc_metrics(trainer)) - {"nc/tpt_epoch"} == {
        "nc/train_error",
        "nc/skipped_samples",
        "nc/nc2_equinorm_weights",
        f"nc/{LAGGED_NC4_KEY}",
    }
    assert all(math.isfinite(v) for v in nc_metrics(trainer).values())


@pytest.mark.parametrize(("num_classes", "width"), [(2, 16), (6, 2)], ids=["C=2", "D<C-1"])
def test_two_classes_and_fewer_dimensions_than_an_etf_needs(num_classes: int, width: int) -> None:
    x, y = data(60, num_classes=num_classes)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, width))  # no ReLU: no dead feature
    model = Net(body, num_classes=num_classes, width=width, lr=0.0)
    nc = NeuralCollapseCallback()
    with recorded() as record:
        trainer = fit([nc], model, loader(x, y, batch_size=20), epochs=2)
    assert not our_warnings(record)
    assert metric_keys(nc.history[-1]) == set(ALL_KEYS)
    assert all(math.isfinite(v) for v in nc_metrics(trainer).values())
    assert_matches(nc.history[-1], brute_force(model, x, y))


# --------------------------------------------------------------------------------------------------------
# finding the classifier
# --------------------------------------------------------------------------------------------------------


def conv_body(linear: bool) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Unflatten(1, (2, 2, 2)),
        nn.Conv2d(2, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    ]
    if linear:  # an embedding Linear before the real head: the last nn.Linear is not the classifier
        layers += [nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Unflatten(1, (8, 1, 1))]
    return nn.Sequential(*layers)


class CosineHead(nn.Module):
    """A custom classifier: logits from layer-normalised features and its own weight (no ``nn.Linear``)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.weight = nn.Parameter(0.5 * torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(0)))
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.norm(h), self.weight, self.bias)


def _flat_conv_head(model: Net, x: Tensor) -> Tensor:
    return model.head(model.body(x)).flatten(1)


def test_no_linear_layer_needs_classifier_and_a_conv_head_works() -> None:
    x, y = data(48)
    model = Net(
        body=conv_body(linear=False),
        head=nn.Sequential(OrderedDict(conv=nn.Conv2d(8, 4, 1), flat=nn.Flatten())),
    )
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback()], **QUIET)
    before = weights(model)
    with pytest.raises(ClassifierNotFoundError, match=r"no `nn.Linear`.*Set `classifier=`.*`features=`"):
        trainer.fit(model, loader(x, y))
    assert_untouched(model, before, trainer)

    model = Net(body=conv_body(linear=False), head=nn.Conv2d(8, 4, 1), lr=0.0)
    model.forward = _flat_conv_head.__get__(model)  # type: ignore[method-assign]
    nc = NeuralCollapseCallback(classifier="head")
    with recorded() as record:
        fit([nc], model, loader(x, y), epochs=2)
    assert not our_warnings(record)
    assert_matches(nc.history[-1], brute_force(model, x, y))  # NC3 uses the (C, D, 1, 1) conv weight


def test_linear_before_a_conv_head_is_detected_in_the_first_step() -> None:
    x, y = data(48)
    model = Net(body=conv_body(linear=True), head=nn.Conv2d(8, 4, 1), lr=0.0)
    model.forward = _flat_conv_head.__get__(model)  # type: ignore[method-assign]
    before = weights(model)
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback()], **QUIET)
    with pytest.raises(
        MisconfigurationException,
        match=r"found `body.5` \(Linear\).*`head` runs on its output.*Set `classifier='head'`",
    ):
        trainer.fit(model, loader(x, y))
    assert_untouched(model, before, trainer)

    nc = NeuralCollapseCallback(classifier="head")
    fit([nc], model, loader(x, y), epochs=2)
    assert_matches(nc.history[-1], brute_force(model, x, y))


def test_custom_head_needs_classifier_and_features() -> None:
    x, y = data(48)
    model = Net(head=CosineHead(16, 4), lr=0.0)
    before = weights(model)
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback()], **QUIET)
    with pytest.raises(MisconfigurationException, match=r"found `body.2`.*Set `classifier='head'`.*`features=`"):
        trainer.fit(model, loader(x, y))
    assert_untouched(model, before, trainer)

    nc = NeuralCollapseCallback(classifier="head", features="head.norm")
    with recorded() as record:
        fit([nc], model, loader(x, y), epochs=2)
    assert not our_warnings(record)
    assert_matches(nc.history[-1], brute_force(model, x, y, features=lambda v: model.head.norm(model.body(v))))
    # an explicit classifier is trusted: no first-step check, and a wrong one gives a clear error
    with pytest.raises(MisconfigurationException, match=r"`num_classes=4` but the classifier `body.2` has 16 outputs"):
        fit([NeuralCollapseCallback(classifier="body.2", num_classes=4)], Net(), loader(x, y), epochs=1)


class TwoHeads(Net):
    """A main head and an auxiliary head ``aux`` on the same features; ``aux`` is registered last."""

    def __init__(self, aux_classes: int = 4) -> None:
        super().__init__()
        self.aux = nn.Linear(16, aux_classes)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = self.body(x)
        return self.loss(self.head(h), y) + 0.1 * self.aux(h).square().mean()


class FeatureRegularized(Net):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = self.body(x)
        return self.loss(self.head(h), y) + 1e-3 * h.square().mean()


class TwoHeadsMSE(Net):
    """Two heads and no softmax: nothing in the loss tells the classifier from the auxiliary head."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(16, 4)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        h = self.body(x)
        target = F.one_hot(y, 4).float()
        return F.mse_loss(self.head(h), target) + 0.1 * self.aux(h).square().mean()


def test_an_auxiliary_head_after_the_classifier_is_told_apart() -> None:
    """The last nn.Linear (`aux`) does not feed the cross-entropy: `head` is measured, as if named."""
    x, y = data(32)
    auto, named = NeuralCollapseCallback(), NeuralCollapseCallback(classifier="head")
    with recorded() as record:
        fit([auto], TwoHeads(), loader(x, y), epochs=2)
        fit([named], TwoHeads(), loader(x, y), epochs=2)
    assert not our_warnings(record)
    assert auto.history == named.history
    assert auto.last_statistics is not None and auto.last_statistics.means.shape == (4, 16)
    # an auxiliary head with another number of outputs: its 3 outputs do not refuse the labels of the real head
    other = NeuralCollapseCallback()
    fit([other], TwoHeads(aux_classes=3), loader(x, y), epochs=1)
    assert other.history[0]["skipped_samples"] == 0 and other.last_statistics is not None
    assert other.last_statistics.counts.shape == (4,)


def test_two_heads_without_softmax_make_the_fallback_ambiguous_and_say_so() -> None:
    x, y = data(32)
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"took `aux` as the classifier.*`head` also feed\(s\) the loss") as rec:
        fit([nc], TwoHeadsMSE(), loader(x, y), epochs=2)
    assert count(rec, "also feed") == 1
    with recorded() as record:  # explicit: trusted, no warning; a loss term on the features is no other head
        fit([NeuralCollapseCallback(classifier="head")], TwoHeadsMSE(), loader(x, y), epochs=1)
        fit([NeuralCollapseCallback(classifier="aux")], TwoHeadsMSE(), loader(x, y), epochs=1)
        fit([NeuralCollapseCallback()], FeatureRegularized(), loader(x, y), epochs=1)
    assert not our_warnings(record)


# --------------------------------------------------------------------------------------------------------
# batches the callback cannot read
# --------------------------------------------------------------------------------------------------------


class Sample:
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y


class ObjectDataset(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]


def _collate_object(items: list[tuple[Tensor, Tensor]]) -> Sample:
    return Sample(torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]))


def _collate_nested(items: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    return {
        "inputs": {"pixels": torch.stack([i[0] for i in items])},
        "meta": {"cls": torch.stack([i[1] for i in items])},
    }


def _collate_img(items: list[tuple[Tensor, Tensor]]) -> dict[str, Any]:
    return {"img": torch.stack([i[0] for i in items]), "y": torch.stack([i[1] for i in items])}


@pytest.mark.parametrize(
    ("collate", "unpack", "mode", "match", "getters"),
    [
        pytest.param(
            _collate_object,
            lambda b: (b.x, b.y),
            "online",
            r"batch of type Sample.*`label_getter=`",
            {"label_getter": lambda b: b.y},
            id="custom-object",
        ),
        pytest.param(
            _collate_nested,
            lambda b: (b["inputs"]["pixels"], b["meta"]["cls"]),
            "online",
            r"batch dict with keys \['inputs', 'meta'\].*`label_getter=`",
            {"label_getter": lambda b: b["meta"]["cls"]},
            id="nested-dict",
        ),
        pytest.param(
            _collate_img,
            lambda b: (b["img"], b["y"]),
            "exact",
            r"model input.*\['img', 'y'\].*`input_getter=`",
            {"input_getter": lambda b: b["img"]},
            id="exact-input",
        ),
    ],
)
def test_unreadable_batches_name_the_getter(
    collate: Callable[..., Any], unpack: Callable[[Any], Any], mode: str, match: str, getters: dict[str, Any]
) -> None:
    x, y = data(32)
    train = DataLoader(ObjectDataset(x, y), batch_size=16, collate_fn=collate)
    model = Net(unpack=unpack)
    before = weights(model)
    trainer = L.Trainer(max_epochs=1, callbacks=[NeuralCollapseCallback(mode=mode)], **QUIET)  # type: ignore[arg-type]
    with pytest.raises(BatchFormatError, match=match):
        trainer.fit(model, train)
    assert_untouched(model, before, trainer)
    nc = NeuralCollapseCallback(mode=mode, **getters)  # type: ignore[arg-type]
    fit([nc], Net(unpack=unpack), train, epochs=1)
    assert "nc1" in nc.history[0]


def test_batch_format_change_mid_run_skips_the_epoch_without_stopping() -> None:
    x, y = data(64)

    class Flaky:
        calls = 0

        def __call__(self, batch: Any) -> Tensor:
            self.calls += 1
            if self.calls == 6:  # epoch 1, second batch
                raise KeyError("labels")
            return batch[1]

    nc = NeuralCollapseCallback(label_getter=Flaky())
    with pytest.warns(RuntimeWarning, match=r"batch of epoch 1 could not be measured \(KeyError.*`label_getter=`"):
        trainer = fit([nc], Net(), loader(x, y), epochs=3)
    assert [r["epoch"] for r in nc.history] == [0, 2]  # epoch 1: nothing rather than a partial number
    assert trainer.current_epoch == 3


# --------------------------------------------------------------------------------------------------------
# runs that do not train
# --------------------------------------------------------------------------------------------------------


class ValNet(Net):
    """Counts the evaluation steps, which run the classifier (its hooks fire) without any training step."""

    evaluated = 0

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluated += 1
        self.log("val_loss", self.loss(self(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.evaluated += 1
        self.log("test_loss", self.loss(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.evaluated += 1
        return self(batch[0])


@pytest.mark.parametrize(
    "how",
    [
        "limit_train_batches=0",
        "fast_dev_run",
        "sanity_check_only",
        "validate",
        "test",
        "predict",
        "max_epochs=0",
    ],
)
def test_runs_without_training_measure_nothing(how: str, tmp_path: Path) -> None:
    x, y = data(32)
    train = loader(x, y)
    model = ValNet()
    nc = NeuralCollapseCallback()
    logger = CSVLogger(tmp_path)
    kw: dict[str, Any] = {**QUIET, "logger": logger, "max_epochs": 2, "callbacks": [nc]}
    if how == "limit_train_batches=0":
        trainer = L.Trainer(**kw, limit_train_batches=0)
        trainer.fit(model, train)
    elif how == "fast_dev_run":
        trainer = L.Trainer(**{**kw, "logger": True}, fast_dev_run=True)
        trainer.fit(model, train, train)
    elif how == "sanity_check_only":
        trainer = L.Trainer(**{**kw, "num_sanity_val_steps": 2}, limit_train_batches=0)
        trainer.fit(model, train, train)
    elif how == "validate":
        trainer = L.Trainer(**kw)
        trainer.validate(model, train)
    elif how == "test":
        trainer = L.Trainer(**kw)
        trainer.test(model, train)
    elif how == "predict":
        trainer = L.Trainer(**kw)
        trainer.predict(model, train)
    else:
        trainer = L.Trainer(**{**kw, "max_epochs": 0})
        trainer.fit(model, train)
    assert nc.history == [] and nc_metrics(trainer) == {}
    assert all(not m._forward_hooks for m in model.modules())
    if how in ("sanity_check_only", "validate", "test", "predict", "fast_dev_run"):
        assert model.evaluated > 0  # the model ran, the callback measured nothing
    metrics = Path(logger.log_dir) / "metrics.csv"
    if metrics.exists():
        with open(metrics) as f:
            header = next(csv.reader(f), [])
        assert not [k for k in header if k.startswith("nc/")]


# --------------------------------------------------------------------------------------------------------
# training variants: accumulation, compile, mixed precision, activation checkpointing
# --------------------------------------------------------------------------------------------------------


def test_gradient_accumulation_counts_every_micro_batch_once() -> None:
    x, y = data(53)
    model = Net(lr=0.0)
    nc = NeuralCollapseCallback()
    counts = Counts(nc)
    fit([nc, counts], model, loader(x, y, batch_size=10), epochs=2, accumulate_grad_batches=3)
    expected = torch.bincount(y, minlength=4).double().tolist()
    assert counts.counts == [expected, expected] and sum(expected) == 53
    assert_matches(nc.history[-1], brute_force(model, x, y))


@pytest.mark.parametrize("backend", ["eager"])
def test_torch_compile(backend: str) -> None:
    x, y = data(48)
    model = Net(lr=0.0)
    nc = NeuralCollapseCallback()
    counts = Counts(nc)
    torch._dynamo.reset()
    fit([nc, counts], torch.compile(model, backend=backend), loader(x, y), epochs=2)  # type: ignore[arg-type]
    assert counts.counts[-1] == torch.bincount(y, minlength=4).double().tolist()
    assert_matches(nc.history[-1], brute_force(model, x, y))
    assert not model.head._forward_hooks


@pytest.mark.skipif(not os.environ.get("LNC_SLOW"), reason="inductor compiles for ~30 s on a small CPU; LNC_SLOW=1")
def test_torch_compile_inductor() -> None:
    test_torch_compile("inductor")


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "fp16-autocast"])
def test_mixed_precision(precision: str) -> None:
    x, y = data(48)
    reference = Net(lr=0.0)
    model = Net(lr=0.0, autocast=torch.float16 if precision == "fp16-autocast" else None)
    model.load_state_dict(reference.state_dict())
    nc = NeuralCollapseCallback()
    counts = Counts(nc)
    kw = {} if precision == "fp16-autocast" else {"precision": precision}
    with recorded() as record:
        trainer = fit([nc, counts], model, loader(x, y), epochs=2, **kw)
    if precision == "16-mixed":
        assert trainer.precision == "bf16-mixed"
        assert any("AMP with fp16 is not supported on CPU" in str(w.message) for w in record)
        pytest.skip(
            "Lightning runs precision='16-mixed' on the CPU as bf16-mixed (checked above); fp16 is "
            "covered by the fp16-autocast case"
        )
    assert counts.counts[-1] == torch.bincount(y, minlength=4).double().tolist()
    ref = brute_force(reference, x, y)
    record_ = nc.history[-1]
    assert metric_keys(record_) == set(ALL_KEYS)
    assert all(math.isfinite(v) for v in record_.values())
    for key in ("nc1", "nc2_equinorm_means", "nc3_self_duality"):  # half-precision features, same model
        assert record_[key] == pytest.approx(ref[key], rel=0.05, abs=1e-3), key


class CheckpointedNet(Net):
    """The block holding the classifier runs under reentrant checkpointing: hooks fire twice."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(body=nn.Sequential(nn.Linear(8, 16), nn.ReLU()), **kw)
        self.block = nn.Sequential(OrderedDict(hidden=nn.Linear(16, 16), act=nn.ReLU(), fc=nn.Linear(16, 4)))
        del self.head
        self.fires = 0
        self.block.fc.register_forward_hook(self._count)

    def _count(self, *args: Any) -> None:
        self.fires += 1

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        if self.training:
            return checkpoint(self.block, h, use_reentrant=True)
        return self.block(h)


def test_activation_checkpointing_does_not_double_count() -> None:
    x, y = data(48)
    model = CheckpointedNet(lr=0.0)
    nc = NeuralCollapseCallback()
    counts = Counts(nc)
    fit([nc, counts], model, loader(x, y), epochs=2)
    assert model.fires == 2 * 2 * 3  # forward + recompute, 3 batches, 2 epochs
    assert counts.counts == [torch.bincount(y, minlength=4).double().tolist()] * 2
    model.head = model.block.fc
    h = model.block.act(model.block.hidden(model.body(x)))
    model.eval()
    assert_matches(nc.history[-1], brute_force(model, x, y, features=lambda _: h.detach()))


# --------------------------------------------------------------------------------------------------------
# interrupted runs, several fits, several instances
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_exception_mid_fit_removes_hooks_keeps_history_and_allows_a_second_fit(
    error: type[BaseException],
) -> None:
    x, y = data(64)
    model = Net(fail_at=6, fail_with=error)  # epoch 1, batch 2
    nc = NeuralCollapseCallback()
    trainer = L.Trainer(max_epochs=3, callbacks=[nc], **QUIET)
    handler = signal.getsignal(signal.SIGINT)
    try:
        # Lightning turns a KeyboardInterrupt into a graceful shutdown that ends with sys.exit(1)
        with pytest.raises(SystemExit if error is KeyboardInterrupt else RuntimeError):
            trainer.fit(model, loader(x, y))
    finally:
        signal.signal(signal.SIGINT, handler)
    assert all(not m._forward_hooks for m in model.modules())
    assert [r["epoch"] for r in nc.history] == [0]
    assert nc._fit is None

    model.fail_at = None
    trainer.fit(model, loader(x, y))  # the same Trainer continues the interrupted run
    assert [r["epoch"] for r in nc.history] == [0, 1, 2]
    assert all(not m._forward_hooks for m in model.modules())

    fresh = Net(lr=0.0)
    fit([nc], fresh, loader(x, y), epochs=2)  # a new Trainer from step 0: a new run
    assert [r["epoch"] for r in nc.history] == [0, 1]
    assert_matches(nc.history[-1], brute_force(fresh, x, y))


def test_same_instance_for_two_runs_starts_fresh_each_time() -> None:
    x, y = data(64)
    nc = NeuralCollapseCallback()
    fit([nc], Net(lr=0.3), loader(x, y), epochs=6)
    first_tpt = nc.tpt_epoch
    assert first_tpt is not None
    frozen = Net(lr=0.0)
    with pytest.warns(RuntimeWarning, match="had no sample") as record:
        fit([nc], frozen, loader(x[y < 3], y[y < 3]), epochs=2)
    assert count(record, "had no sample") == 1
    assert [r["epoch"] for r in nc.history] == [0, 1]
    assert nc.tpt_epoch is None or nc.tpt_epoch <= 1  # decided by this run, not carried over
    assert_matches(nc.history[-1], brute_force(frozen, x[y < 3], y[y < 3], num_classes=4))
    with pytest.warns(RuntimeWarning, match="had no sample") as record:  # said again, once, in the next run
        fit([nc], Net(lr=0.0), loader(x[y < 3], y[y < 3]), epochs=2)
    assert count(record, "had no sample") == 1


def test_two_instances_on_two_layers() -> None:
    x, y = data(64)
    model = Net(lr=0.0)
    last = NeuralCollapseCallback()
    first = NeuralCollapseCallback(features="body.1", prefix="nc/layer1")
    exact = NeuralCollapseCallback(mode="exact", classifier="head", prefix="nc_exact")
    trainer = fit([last, first, exact], model, loader(x, y), epochs=2)
    metrics = nc_metrics(trainer)
    assert {"nc/nc1", "nc/layer1/nc1"} <= set(metrics) and metrics["nc/nc1"] != metrics["nc/layer1/nc1"]
    assert_matches(last.history[-1], brute_force(model, x, y))
    assert_matches(exact.history[-1], brute_force(model, x, y))
    assert nc_metrics(trainer, "nc_exact/")["nc_exact/nc1"] == pytest.approx(metrics["nc/nc1"], rel=1e-9)
    ref = brute_force(model, x, y, features=lambda v: model.body[:2](v))
    assert first.history[-1]["nc1"] == pytest.approx(ref["nc1"], rel=1e-6)
    assert all(not m._forward_hooks for m in model.modules())


def test_two_instances_with_one_prefix_are_refused() -> None:
    x, y = data(32)
    model = Net()
    callbacks = [NeuralCollapseCallback(), NeuralCollapseCallback(features="body.1")]
    with pytest.raises(
        MisconfigurationException,
        match=r"2 NeuralCollapseCallback instances .* `prefix='nc'`.*"
        r"give each its own `prefix=`",
    ):
        fit(callbacks, model, loader(x, y), epochs=1)
    assert all(not m._forward_hooks for m in model.modules())
    # identical settings are refused by Lightning itself, when the Trainer is built (same checkpoint key)
    with pytest.raises(RuntimeError, match=r"more than one stateful callback of type `NeuralCollapseCallback`"):
        L.Trainer(callbacks=[NeuralCollapseCallback(), NeuralCollapseCallback()], **QUIET)


# --------------------------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------------------------


def _tensors_with_graph(root: Any) -> list[str]:
    """Paths of the tensors with a ``grad_fn`` reachable from ``root`` through attributes and containers."""
    found: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [("callback", root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, Tensor):
            if obj.grad_fn is not None:
                found.append(path)
            continue
        if isinstance(obj, (L.Trainer, L.LightningModule)):
            continue  # the callback keeps neither; the classifier module is walked (leaf parameters)
        if isinstance(obj, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in (
            "lightning_neural_collapse",
            "torchmetrics",
            "torch",
            "tests",
            "test_reliability",
        ):
            stack.extend((f"{path}.{k}", v) for k, v in vars(obj).items())
    return found


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), Tensor))  # type(): no proxy __class__


class MemoryProbe(Callback):
    def __init__(self, nc: NeuralCollapseCallback) -> None:
        self.nc, self.live, self.graphs = nc, {}, []

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if trainer.current_epoch in (0, 50, 199):  # mid-step: the capture holds this step's tensors
            assert self.nc._fit is not None and self.nc._fit.binding.capture.peek() is not None
            self.graphs += _tensors_with_graph(self.nc)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch in (50, 199):
            self.live[trainer.current_epoch] = _live_tensors()
            self.graphs += _tensors_with_graph(self.nc)


def test_memory_stays_flat_over_200_epochs() -> None:
    x, y = data(32)
    nc = NeuralCollapseCallback()
    probe = MemoryProbe(nc)
    start = time.perf_counter()
    fit([nc, probe], Net(lr=0.3), loader(x, y, batch_size=32), epochs=200)
    assert time.perf_counter() - start < 30
    assert len(nc.history) == 200
    assert nc.tpt_epoch is not None and nc.tpt_epoch < 50  # its one-off `nc/tpt_epoch` key is in both counts
    assert probe.graphs == [] and _tensors_with_graph(nc) == []
    assert _tensors_with_graph({"kept": [torch.ones(1, requires_grad=True) * 2]}) == ["callback['kept'][0]"]
    assert probe.live[199] <= probe.live[50], probe.live


# --------------------------------------------------------------------------------------------------------
# reporting failures
# --------------------------------------------------------------------------------------------------------


class BrokenExperiment:
    """A TensorBoard-like writer whose every call fails (a full disk, a closed writer)."""

    def add_histogram_raw(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("histogram: disk full")

    def add_figure(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("figure: disk full")

    def add_custom_scalars(self, *args: Any, **kwargs: Any) -> None:
        raise OSError("layout: disk full")


class MemoryLogger(Logger):
    """Keeps the scalars; ``experiment`` and ``save_dir`` are configurable."""

    def __init__(self, experiment: Any = None, save_dir: str | None = None) -> None:
        super().__init__()
        self._experiment, self._save_dir = experiment, save_dir
        self.metrics: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> str:
        return "0"

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def experiment(self) -> Any:
        return self._experiment

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def test_reporting_failures_warn_and_the_scalars_go_on(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    broken = MemoryLogger(BrokenExperiment(), save_dir=str(not_a_dir / "logs"))  # unwritable directory
    plain = MemoryLogger()  # no experiment at all: quantile scalars, no figure, no warning
    x, y = data(64)
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning) as record:
        trainer = fit([nc], Net(), loader(x, y), epochs=3, logger=[broken, plain])
    for kind in ("histograms", "figures", "the custom-scalars dashboard", "a figure file"):
        assert count(record, rf"could not log {kind}") == 1, kind
    assert trainer.current_epoch == 3 and len(nc.history) == 3 and nc.figure_path is None
    for logger in (broken, plain):
        steps = [step for step, m in logger.metrics if "nc/nc1" in m]
        assert len(steps) == 3
        assert any("nc/cosines_means_median" in m for _, m in logger.metrics)


def test_figure_failure_does_not_fail_a_finished_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def broken_plot(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no usable font")

    monkeypatch.setattr(reporter_module, "plot_history", broken_plot)
    x, y = data(32)
    nc = NeuralCollapseCallback()
    with pytest.warns(RuntimeWarning, match=r"no figure \(ValueError: no usable font\).*`log_figure=False`"):
        trainer = fit([nc], Net(), loader(x, y), epochs=2, logger=TensorBoardLogger(tmp_path))
    assert len(nc.history) == 2 and "nc/nc1" in trainer.callback_metrics

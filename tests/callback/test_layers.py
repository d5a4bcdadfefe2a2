"""Per-layer collapse (``layers=``) in a real Trainer: every key against the test's own float64 reference of the
layer outputs it extracts itself, read back from TensorBoard; globs, pooling, errors, validation, bounded memory."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from reference import layer_reference
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from toy import QUIET

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional.layers import STATISTICS_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")
STATISTICS = STATISTICS_KEYS  # the keys of one pass's per-class means and variances
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "wide_layer.py"


class SmallCNN(L.LightningModule):
    """Two conv blocks (BatchNorm in the first), global pooling and a linear classifier ``fc``."""

    def __init__(self, lr: float = 0.05, batch_norm: bool = True) -> None:
        super().__init__()
        norm: nn.Module = nn.BatchNorm2d(4) if batch_norm else nn.Identity()
        self.block1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.block2(self.block1(x))).flatten(1))

    def outputs(self, x: Tensor) -> dict[str, Tensor]:
        """The test's own extraction of every layer's output, in eval mode."""
        self.eval()
        with torch.no_grad():
            h1 = self.block1(x)
            h2 = self.block2(h1)
            return {"block1": h1, "block2": h2, "pool": self.pool(h2)}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ValidatedCNN(SmallCNN):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def images(num: int = 96, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num) % 3
    x = torch.randn(num, 1, 8, 8, generator=g) + y[:, None, None, None].float()
    return TensorDataset(x, y)


def fit(nc: NeuralCollapseCallback, model: SmallCNN, *, epochs: int = 3, val: Any = None, **kwargs: Any) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_epochs=epochs, callbacks=[nc], **{**QUIET, **kwargs})
    trainer.fit(model, DataLoader(images(), batch_size=32, shuffle=True), val)
    return trainer


def scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_exact_mode_every_layer_key_equals_the_float64_reference(tmp_path: Path) -> None:
    nc = NeuralCollapseCallback(mode="exact", layers=["block*", "pool"], log_figure=False)
    model = SmallCNN()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit(nc, model, logger=logger)
    x, y = images().tensors
    logged = scalars(logger.log_dir)
    last = nc.history[-1]
    for name, output in model.outputs(x).items():
        expected = layer_reference(output.flatten(1).double().numpy(), y.numpy(), 3)
        for key in (*STATISTICS, "nc1"):
            got = last[f"layers/{name}/{key}"]
            assert got == pytest.approx(expected[key], rel=1e-6), (name, key)
        assert last[f"layers/{name}/ncc_accuracy"] == expected["ncc_accuracy"], name  # counts: exact
        tb_step, tb_value = logged[f"nc/layers/{name}/nc1"][-1]
        assert tb_step == last["step"] and tb_value == pytest.approx(last[f"layers/{name}/nc1"], rel=1e-6)
    # the pooled layer is the classifier's input: the same NC1 as the classifier's own, two routes
    assert last["layers/pool/nc1"] == pytest.approx(last["nc1"], rel=1e-9)
    assert len(logged["nc/layers/block1/nc1"]) == 3  # every epoch
    # He & Su's fit: least squares of log NC1 on the layer index, and its Pearson r
    logs = np.log([last[f"layers/{name}/nc1"] for name in ("block1", "block2", "pool")])
    slope = np.polyfit(np.arange(3.0), logs, 1)[0]
    assert last["layers/nc1_depth_slope"] == pytest.approx(slope, rel=1e-9)
    assert last["layers/nc1_depth_ratio"] == pytest.approx(math.exp(slope), rel=1e-9)
    assert last["layers/nc1_depth_pearson_r"] == pytest.approx(np.corrcoef(np.arange(3.0), logs)[0, 1], rel=1e-9)


def test_online_mode_with_a_fixed_model_equals_the_reference_against_the_previous_means() -> None:
    """lr=0 and no BatchNorm: the model never changes, so the previous epoch's means and P are this epoch's."""
    nc = NeuralCollapseCallback(layers=["block1", "block2"], log_figure=False)
    model = SmallCNN(lr=0.0, batch_norm=False)
    fit(nc, model, epochs=2)
    x, y = images().tensors
    first, second = nc.history
    assert "layers/block1/nc1_prev_means" not in first  # no previous means yet
    for name, output in model.outputs(x).items():
        if name == "pool":
            continue
        expected = layer_reference(output.flatten(1).double().numpy(), y.numpy(), 3)
        for key in STATISTICS:
            assert second[f"layers/{name}/{key}"] == pytest.approx(expected[key], rel=1e-6), (name, key)
        assert second[f"layers/{name}/nc1_prev_means"] == pytest.approx(expected["nc1"], rel=1e-6), name
        assert second[f"layers/{name}/ncc_accuracy_prev_means"] == expected["ncc_accuracy"], name


def test_avgpool_pools_the_feature_maps_and_says_so_in_the_tag() -> None:
    nc = NeuralCollapseCallback(mode="exact", layers=["block2"], layer_reduce="avgpool", log_figure=False)
    model = SmallCNN()
    fit(nc, model, epochs=1)
    x, y = images().tensors
    pooled = model.outputs(x)["block2"].mean(dim=(2, 3))
    expected = layer_reference(pooled.double().numpy(), y.numpy(), 3)
    record = nc.history[-1]
    assert not any(key.startswith("layers/block2/") for key in record)
    assert record["layers/block2@avgpool/nc1"] == pytest.approx(expected["nc1"], rel=1e-6)
    assert record["layers/block2@avgpool/nc1_trace_ratio"] == pytest.approx(expected["nc1_trace_ratio"], rel=1e-6)


def test_globs_select_by_dotted_part_in_depth_order() -> None:
    nc = NeuralCollapseCallback(layers=["block*.0", "pool"], log_figure=False)
    fit(nc, SmallCNN(), epochs=1)
    names = {key.split("/")[1] for key in nc.history[-1] if key.startswith("layers/") and key.count("/") == 2}
    assert names == {"block1.0", "block2.0", "pool"}


def test_a_bad_layer_name_lists_candidates() -> None:
    nc = NeuralCollapseCallback(layers=["blok1"], log_figure=False)
    with pytest.raises(MisconfigurationException, match=r"'blok1'.*candidates.*block1"):
        fit(nc, SmallCNN(), epochs=1)


def test_bad_layer_options_are_refused_at_construction() -> None:
    with pytest.raises(MisconfigurationException, match="layer_reduce"):
        NeuralCollapseCallback(layers=["block1"], layer_reduce="maxpool")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="`layers`"):
        NeuralCollapseCallback(layers="block1")  # type: ignore[arg-type]


def test_validation_measures_each_layers_ncc_accuracy_against_the_training_means() -> None:
    val = DataLoader(images(48, seed=5), batch_size=16)
    nc = NeuralCollapseCallback(mode="exact", layers=["block1", "block2"], log_figure=False)
    model = ValidatedCNN()
    fit(nc, model, epochs=2, val=val)
    x, y = images().tensors
    xv, yv = images(48, seed=5).tensors
    train, held_out = model.outputs(x), model.outputs(xv)
    record = nc.val_history[-1]
    for name in ("block1", "block2"):
        h, hv = train[name].flatten(1).double(), held_out[name].flatten(1).double()
        means = torch.stack([h[y == c].mean(dim=0) for c in range(3)])
        nearest = torch.cdist(hv, means).argmin(dim=1)
        assert record[f"layers/{name}/ncc_accuracy"] == float((nearest == yv).double().mean()), name


def test_layer_references_survive_a_checkpoint(tmp_path: Path) -> None:
    nc = NeuralCollapseCallback(layers=["block1"], log_figure=False)
    fit(nc, SmallCNN(), epochs=1)
    state = nc.state_dict()
    restored = NeuralCollapseCallback(layers=["block1"], log_figure=False)
    restored.load_state_dict(state)
    reference = restored._saved.layer_references["block1"]
    assert reference.means.shape == (3, 4 * 8 * 8) and bool(reference.present.all())
    assert reference.directions.shape == (2, 4 * 8 * 8)  # C - 1 directions of P


@pytest.mark.skipif(sys.platform != "linux", reason="peak RSS from /proc and ru_maxrss in kilobytes: Linux")
def test_a_layer_of_32768_values_per_sample_runs_in_bounded_memory(tmp_path: Path) -> None:
    """Its D x D float64 matrix alone would be 8.6 GB: the run must stay far below even an eighth of that."""
    out = tmp_path / "memory.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, env=env, timeout=600)
    result = json.loads(out.read_text())
    dim = result["dim"]
    assert dim == 32_768
    dense = dim * dim * 8
    assert result["peak_growth_bytes"] < dense / 8, result  # measured: about 0.1 GB
    assert result["nc1"] > 0 and math.isfinite(result["nc1"])


def test_the_progressive_collapse_figure_and_the_dashboard_hold_every_layer(tmp_path: Path) -> None:
    val = DataLoader(images(48, seed=5), batch_size=16)
    nc = NeuralCollapseCallback(layers=["block1", "block2", "pool"])
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fit(nc, ValidatedCNN(), epochs=3, val=val, logger=logger)
    assert nc.depth_figure_path == str(Path(logger.log_dir) / "progressive_collapse.png")
    assert Path(nc.depth_figure_path).stat().st_size > 10_000
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    assert {"nc/figure", "nc/progressive_collapse"} <= set(events.Tags()["images"])
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    category = next(c for c in layout.category if c.title == "Per-layer collapse (nc)")
    tags = events.Tags()["scalars"]
    for chart in category.chart:
        matched = [tag for tag in tags if any(re.match(regex, tag) for regex in chart.multiline.tag)]
        expected = 1 if "Depth fit" in chart.title else 3  # one line per layer; the fit: slope, ratio, r
        assert len(matched) >= expected, (chart.title, matched)

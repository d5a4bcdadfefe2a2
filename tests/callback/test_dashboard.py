"""What a fit shows in TensorBoard, read back with TensorBoard's own loader: the snapshot schedule of the histograms
and the figure, every tag documented in the README, and the custom-scalars layout."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import toy
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from toy import ToyClassifier, ToyData

from lightning_neural_collapse import NeuralCollapseCallback

QUIET: dict[str, Any] = {key: v for key, v in toy.QUIET.items() if key != "logger"}
README = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
EPOCHS = 70

pytestmark = pytest.mark.usefixtures("one_thread")


def _documented() -> list[re.Pattern[str]]:
    tokens = set(re.findall(r"`([^`\s]+)`", README))
    tokens |= {m.group(1) + "_weights" for m in re.finditer(r"`([a-z0-9_]+)_means` / `_weights`", README)}
    tokens |= {f"{m.group(1)}{m.group(2)}" for m in re.finditer(r"`(nc/<hist name>)_min`, (?:`(_\w+)`)", README)}
    patterns = []
    for token in tokens:
        regex = re.escape(token).replace(r"\*", r"[a-z0-9_]*").replace(re.escape("<hist name>"), "[a-z_]+")
        patterns.append(re.compile(f"^{regex}$"))
    return patterns


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[EventAccumulator, NeuralCollapseCallback]:
    L.seed_everything(0)
    callback = NeuralCollapseCallback(mode="exact")
    logger = TensorBoardLogger(tmp_path_factory.mktemp("tb"), name="toy")
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[callback], logger=logger, **QUIET)
    trainer.fit(ToyClassifier(lr=0.05, dropout=0.0), datamodule=ToyData())
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    accumulator.Reload()
    return accumulator, callback


def test_histograms_and_figure_follow_the_snapshot_schedule(fitted: Any) -> None:
    acc, callback = fitted
    steps = {int(row["epoch"]): int(row["step"]) for row in callback.history}
    written = [event.step for event in acc.Histograms("nc/hist/cosines_means")]
    assert len(written) <= 43 and written == sorted(set(written))
    assert steps[0] in written and steps[EPOCHS - 1] in written  # the first and the last epoch
    assert callback.tpt_epoch is not None and steps[callback.tpt_epoch] in written
    assert set(written) <= set(steps.values())
    early = [e for e, step in steps.items() if step in written and e < EPOCHS // 10]
    assert len(early) >= 5  # log-spaced: dense where the collapse starts
    for name in ("norms_means", "cosines_weights", "norms_weights", "cosine_weight_mean"):
        assert [event.step for event in acc.Histograms(f"nc/hist/{name}")] == written
    images = [event.step for event in acc.Images("nc/figure")]
    assert 2 <= len(images) <= 10 and set(images) <= set(written) and images[-1] == steps[EPOCHS - 1]
    assert steps[callback.tpt_epoch] in images


def test_every_tag_is_documented_and_none_duplicates_another(fitted: Any) -> None:
    acc, _ = fitted
    tags = acc.Tags()
    ours = [t for kind in ("scalars", "histograms", "images") for t in tags[kind] if t.startswith("nc")]
    patterns = _documented()
    missing = []
    for tag in ours:
        key = tag.split("/", 1)[1]
        if not any(p.match(tag) or p.match(key) for p in patterns):
            missing.append(tag)
    assert not missing, f"tags not in the README: {missing}"
    assert not [t for t in tags["scalars"] if t.endswith("_gap")]
    series = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"] if t.startswith("nc/")}
    full = {t: s for t, s in series.items() if "/tpt_onset/" not in t and len({v for _, v in s}) > 1}  # not flat
    same = [(a, b) for a in full for b in full if a < b and full[a] == full[b]]
    assert not same, f"tags with identical series: {same}"


def test_the_onset_chart_stops_after_twice_the_tpt_epoch(fitted: Any) -> None:
    acc, callback = fitted
    tpt = callback.tpt_epoch
    steps = {int(row["epoch"]): int(row["step"]) for row in callback.history}
    onset = [event.step for event in acc.Scalars("nc/tpt_onset/train_error")]
    assert onset == [steps[e] for e in sorted(steps) if e <= tpt + max(tpt, 10)]
    assert [e.step for e in acc.Scalars("nc/epoch")] == [steps[e] for e in sorted(steps)]


def test_layout_one_quantity_per_chart_and_every_tag_it_names_exists(fitted: Any) -> None:
    acc, _ = fitted
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (category,) = layout.category
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    nc3 = [title for title in charts if title.startswith("NC3")]
    assert len(nc3) == 2 and charts[nc3[0]] != charts[nc3[1]]
    scalars = acc.Tags()["scalars"]
    for title, regexes in charts.items():
        matched = [t for t in scalars if any(re.match(r, t) for r in regexes)]
        assert matched or "sampled" in title, title
    assert any(re.match(r, "nc/tpt_onset/train_error") for r in charts["TPT onset: training error"])

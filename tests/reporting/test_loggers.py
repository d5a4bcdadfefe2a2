"""Tests for ``lightning_neural_collapse.reporting``: real TensorBoard/CSV loggers read back from disk."""

from __future__ import annotations

import csv
import math
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_neural_collapse.functional.etf_deviation import NORM_EDGES, Binned, cosine_edges
from lightning_neural_collapse.reporting import (
    can_log_figure,
    dashboard_layout,
    histogram_kind,
    log_dashboard,
    log_figure,
    log_histograms,
    log_scalars,
    plot_history,
    run_dir,
    save_figure,
)
from lightning_neural_collapse.reporting._common import reset_warnings

SIZES = {"histograms": 0, "scalars": 0, "images": 0, "tensors": 0}


@pytest.fixture(autouse=True)
def _fresh_warnings() -> None:
    reset_warnings()


def _read_tb(logger: TensorBoardLogger) -> EventAccumulator:
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance=SIZES)
    acc.Reload()
    return acc


def _binned(values: list[float], edges: torch.Tensor | None = None) -> Binned:
    binned = Binned.count(torch.tensor(values), cosine_edges(10) if edges is None else edges)
    assert binned is not None
    return binned


def _read_csv(logger: CSVLogger) -> list[dict[str, str]]:
    logger.save()
    with open(Path(logger.log_dir) / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _history(epochs: int = 20) -> list[dict[str, float]]:
    rows: list[dict[str, float]] = []
    for epoch in range(epochs):
        decay = math.exp(-0.3 * epoch)
        row: dict[str, float] = {
            "epoch": epoch,
            "train_error": max(0.0, 0.5 - 0.05 * epoch),
            "nc1": 3.0 * decay,
            "nc2_equinorm_means": 0.4 * decay,
            "nc2_equinorm_weights": 0.2 * decay,
            "nc2_equiangular_means": 0.3 * decay,
            "nc2_equiangular_weights": 0.25 * decay,
            "nc2_maxangle_means": 0.5 * decay,
            "nc2_maxangle_weights": 0.4 * decay,
            "nc3_self_duality": 0.8 * decay,
            "nc4_ncc_mismatch": 0.1 * decay,
        }
        if epoch % 3:  # CDNV and NC4 measured every third epoch only
            del row["nc4_ncc_mismatch"]
        else:
            row["nc1_cdnv"] = decay
        if epoch == 5:
            row["nc1"] = float("nan")
        rows.append(row)
    return rows


class _NoMethods:
    """A logger-like object with an experiment that cannot take anything and no ``log_metrics``."""

    experiment = object()


class _Raising:
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        raise RuntimeError("backend down")


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], int | None]] = []

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.calls.append((dict(metrics), step))


def test_scalars_reach_tensorboard_and_csv(tmp_path: Path) -> None:
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    log_scalars([tb, csv_logger], {"nc/nc1": 0.25, "nc/train_error": torch.tensor(0.5)}, step=3)
    log_scalars([tb, csv_logger], {"nc/nc1": 0.125, "nc/nc3_cosine": float("nan")}, step=7)
    events = _read_tb(tb).Scalars("nc/nc1")
    assert [(e.step, e.value) for e in events] == [(3, 0.25), (7, 0.125)]
    assert "nc/nc3_cosine" not in _read_tb(tb).Tags()["scalars"]
    rows = _read_csv(csv_logger)
    assert [(r["step"], float(r["nc/nc1"])) for r in rows] == [("3", 0.25), ("7", 0.125)]
    assert float(rows[0]["nc/train_error"]) == 0.5


@pytest.mark.parametrize("bad", [_NoMethods(), _Raising()], ids=["no-methods", "log-metrics-raises"])
def test_broken_logger_warns_once_and_continues(tmp_path: Path, bad: object) -> None:
    recorder = _Recorder()
    loggers: list[Any] = [bad, recorder]
    figure = plot_history([], None)
    with pytest.warns(RuntimeWarning) as record:
        for step in range(3):
            log_histograms(loggers, {"cosines_means": _binned([-0.5, -0.4])}, step=step)
            log_scalars(loggers, {"nc/nc1": 1.0}, step=step)
            log_figure(loggers, figure, step=step)
            log_dashboard(loggers)
    runtime = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1, [str(w.message) for w in runtime]
    assert type(bad).__name__ in str(runtime[0].message)
    assert len(recorder.calls) == 6  # the healthy logger got every call


def test_broken_tensorboard_writer_falls_back_to_quantiles() -> None:
    class Writer:
        def add_histogram_raw(self, *args: Any, **kwargs: Any) -> None:
            raise ValueError("disk full")

    class BrokenTB(_Recorder):
        experiment = Writer()

    logger = BrokenTB()
    with pytest.warns(RuntimeWarning, match="disk full"):
        log_histograms([logger], {"norms_means": _binned([0.5, 1.5], NORM_EDGES)}, step=4)
    ((metrics, step),) = logger.calls
    assert step == 4 and metrics["nc/norms_means_median"] == pytest.approx(0.5, abs=0.003)


def test_dashboard_layout_written(tmp_path: Path) -> None:
    layout = dashboard_layout("nc")
    (charts,) = layout.values()
    assert list(charts) == [
        "NC1: Tr(Sigma_W Sigma_B^+) / C",
        "NC1: CDNV",
        "NC2: equinorm (std / mean of norms)",
        "NC2: equiangularity (std of cosines)",
        "NC2: max-angle (mean |cos + 1/(C-1)|)",
        "NC2: ETF distance",
        "NC3: self-duality (falls to 0)",
        "NC3: cos(w_c, mu_c) (rises to 1)",
        "NC4: NCC mismatch",
        "Training error",
        "TPT onset: training error",
        "TPT onset: NC4 NCC mismatch",
    ]
    assert charts["NC2: equinorm (std / mean of norms)"] == [
        "Multiline",
        ["^nc/nc2_equinorm_means$", "^nc/nc2_equinorm_weights$"],
    ]
    assert charts["NC3: self-duality (falls to 0)"][1] == ["^nc/nc3_self_duality$"]
    assert charts["Training error"][1] == ["^nc/train_error$", "^nc/train_error_eval$"]
    onset = charts["TPT onset: NC4 NCC mismatch"][1]
    tags = ["nc/tpt_onset/nc4_ncc_mismatch", "nc/tpt_onset/nc4_ncc_mismatch_prev_means", "nc/nc4_ncc_mismatch"]
    assert [tag for tag in tags if any(re.match(regex, tag) for regex in onset)] == tags[:2]
    assert not any(title.endswith("gaps") for title in charts)
    assert len(dashboard_layout(["nc", "nc_val"])) == 2
    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    log_dashboard([tb, csv_logger])
    acc = _read_tb(tb)
    assert "custom_scalars__config__" in acc.PluginTagToContent("custom_scalars")
    (event,) = acc.Tensors("custom_scalars__config__")
    written = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    (category,) = written.category
    assert category.title == "Neural collapse (nc)"
    nc1 = next(chart for chart in category.chart if chart.title.startswith("NC1: Tr"))
    assert list(nc1.multiline.tag) == ["^nc/nc1$"]


def test_held_out_charts_match_every_validation_loader() -> None:
    layout = dashboard_layout(["nc", "nc_layer3"], held_out=["nc"])
    assert set(layout) == {"Neural collapse (nc)", "Neural collapse (nc_layer3)", "Held-out collapse (nc)"}
    charts = layout["Held-out collapse (nc)"]
    nc1 = charts["NC1: training vs validation"][1]
    tags = ["nc/nc1", "nc_val/nc1", "nc_val/dataloader_1/nc1", "nc_val/a/b/nc1", "nc_val/nc1_cdnv", "nc/val/nc1"]
    assert [tag for tag in tags if any(re.match(regex, tag) for regex in nc1)] == tags[:3]
    accuracy = charts["Validation accuracy: network vs nearest training mean"][1]
    assert [
        tag for tag in ("nc_val/accuracy", "nc_val/ncc_accuracy", "nc_val/clean/accuracy") if re.match(accuracy[0], tag)
    ] == [
        "nc_val/accuracy",
        "nc_val/clean/accuracy",
    ]
    assert charts["NC4: training vs validation"][1] == [
        "^nc/nc4_ncc_mismatch$",
        "^nc/nc4_ncc_mismatch_prev_means$",
        "^nc_val/([^/]+/)?nc4_ncc_mismatch$",
    ]


def test_plot_history_save_and_log(tmp_path: Path) -> None:
    figure = plot_history(_history(), tpt_epoch=10, title="synthetic run")
    assert len(figure.axes) >= 7
    nc1_axis = figure.axes[0]
    assert nc1_axis.get_yscale() == "log" and nc1_axis.get_xlabel() == "epoch"
    assert figure.axes[-1].get_yscale() == "symlog"  # training error reaches 0: linear below its smallest value
    assert all(any(t.get_text().strip() == "TPT" for t in ax.texts) for ax in figure.axes)
    path = save_figure(figure, tmp_path / "plots" / "history.png")
    assert path is not None and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(path).stat().st_size < 200_000

    tb, csv_logger = TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")
    assert can_log_figure(tb) and not can_log_figure(csv_logger)
    assert run_dir(tb) == tb.log_dir and run_dir(csv_logger) == csv_logger.log_dir and run_dir(object()) is None
    log_figure([tb, csv_logger], figure, step=9, tag="nc/summary")
    (image,) = _read_tb(tb).Images("nc/summary")
    assert image.step == 9 and image.width == 1300 and image.height == 620


def test_save_figure_unwritable_path_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    figure = plot_history([{"epoch": 0, "nc1": 1.0}], None)
    with pytest.warns(RuntimeWarning, match="save_figure"):
        assert save_figure(figure, blocker / "sub" / "history.png") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert save_figure(figure, blocker / "history.png") is None


def test_plot_history_draws_the_validation_lines() -> None:
    val = [
        {"epoch": e, "step": 8 * e + 7, "clean/nc1": 1.0 / (e + 1), "clean/accuracy": 0.5 + e / 40, "noisy/nc1": 2.0}
        for e in range(0, 20, 2)
    ]
    val[3]["clean/ncc_accuracy"] = 0.8
    figure = plot_history(_history(), tpt_epoch=10, val_history=val)
    assert {line.get_label() for line in figure.axes[0].get_lines()} >= {"training", "validation"}
    nc1_axis = figure.axes[0]
    dotted = [line for line in nc1_axis.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and list(dotted[0].get_ydata()) == [1.0 / (e + 1) for e in range(0, 20, 2)]
    error_axis = figure.axes[-1]
    (val_error,) = [line for line in error_axis.get_lines() if line.get_label() == "validation"]
    assert list(val_error.get_ydata()) == pytest.approx([0.5 - e / 40 for e in range(0, 20, 2)])
    (ncc_error,) = [line for line in error_axis.get_lines() if line.get_label() == "validation, NCC rule"]
    assert list(ncc_error.get_xdata()) == [6] and list(ncc_error.get_ydata()) == pytest.approx([0.2])
    untagged = plot_history(_history(), None, val_history=[{"epoch": 3, "step": 9, "nc1": 0.5, "accuracy": 0.9}])
    assert any(line.get_linestyle() == ":" for line in untagged.axes[0].get_lines())


def test_plot_history_edge_cases() -> None:
    figure = plot_history([], tpt_epoch=None)
    assert len(figure.axes) == 8
    assert all(any(t.get_text() == "no data" for t in ax.texts) for ax in figure.axes)


def test_wandb_like_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    class Histogram:
        def __init__(self, np_histogram: tuple[Any, Any]) -> None:
            self.counts, self.edges = np_histogram

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Histogram=Histogram))

    class WandbLogger(_Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.images: list[tuple[str, list[Any], int | None]] = []

        def log_image(self, key: str, images: list[Any], step: int | None = None) -> None:
            self.images.append((key, images, step))

    logger = WandbLogger()
    assert histogram_kind(logger) == "wandb" and can_log_figure(logger)
    log_histograms([logger], {"cosines_means": _binned([-0.5, -0.45, -0.2])}, step=3)
    ((metrics, step),) = logger.calls  # the histograms in one call
    hist = metrics.pop("nc/hist/cosines_means")
    assert step == 3 and hist.counts.sum() == 3 and len(hist.edges) == len(hist.counts) + 1 <= 513
    assert hist.edges[0] <= -0.5 and hist.edges[-1] >= -0.2 and metrics == {}
    log_figure([logger], plot_history([], None, title="w&b"), step=4)
    ((key, (image,), image_step),) = logger.images
    assert key == "nc/figure" and image_step == 4 and image.shape == (620, 1300, 3)

"""``reporting.reporter``: steps, ``callback_metrics``, and where each instance's figure goes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from stand_ins import Recorder

from lightning_neural_collapse.reporting.reporter import Reporter

HISTORY = [{"epoch": 0, "step": 3, "nc1": 2.0, "train_error": 0.5}, {"epoch": 1, "step": 7, "nc1": 0.5}]


def trainer(*loggers: Any, stepped: int | None = 8, global_step: int = 16) -> Any:
    epoch_loop = SimpleNamespace(_batches_that_stepped=stepped) if stepped is not None else SimpleNamespace()
    return SimpleNamespace(
        fit_loop=SimpleNamespace(epoch_loop=epoch_loop),
        global_step=global_step,
        loggers=list(loggers),
        callback_metrics={},
        is_global_zero=True,
    )


def reporter(prefix: str = "nc") -> Reporter:
    name = "neural_collapse.png" if prefix == "nc" else f"neural_collapse_{prefix}.png"
    return Reporter(prefix, log_histograms=True, log_figure=True, figure_name=name, global_mean="classes")


def test_scalars_go_to_every_logger_and_to_callback_metrics() -> None:
    logger, fake = Recorder(), trainer()
    fake.loggers = [logger]
    reporter("nc_val").scalars(fake, {"epoch": 1, "step": 7, "nc1": 0.25, "train_error": float("nan")})
    assert logger.calls == [(7, {"nc_val/nc1": 0.25, "nc_val/epoch": 1.0})]  # NaN is not logged; epoch: the x axis
    assert set(fake.callback_metrics) == {"nc_val/nc1", "nc_val/train_error"}
    assert isinstance(fake.callback_metrics["nc_val/nc1"], torch.Tensor)


def test_one_figure_file_per_prefix_in_the_runs_own_directory(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path, name="tb")
    fake = trainer(tb, CSVLogger(tmp_path, name="csv"))
    first = reporter("nc").final_figure(fake, HISTORY, 1, "title")
    second = reporter("nc_layer3").final_figure(fake, HISTORY, 1, "title")
    assert first == str(Path(tb.log_dir) / "neural_collapse.png") and Path(first).is_file()
    assert second == str(Path(tb.log_dir) / "neural_collapse_nc_layer3.png") and Path(second).is_file()
    assert reporter().final_figure(trainer(), HISTORY, 1, "title") is None  # no logger: no file
    assert reporter().final_figure(fake, [], None, "title") is None  # no history


class WandbLogger:  # named like W&B's, as the duck typing sees it
    def __init__(self, run_dir: Path, save_dir: Path) -> None:
        self.experiment = SimpleNamespace(dir=str(run_dir))
        self.save_dir = str(save_dir)
        self.images: list[tuple[str, int]] = []

    def log_image(self, key: str, images: list[Any], step: int) -> None:
        self.images.append((key, step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


class MLFlowLogger:
    def __init__(self, save_dir: Path) -> None:
        self.run_id, self.save_dir = "run-1", str(save_dir)
        self.artifacts: list[tuple[str, str]] = []
        outer = self

        class Client:
            def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
                outer.artifacts.append((run_id, artifact_file))

        self.experiment = Client()


def test_wandb_and_mlflow_figures_stay_inside_their_run(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    wandb, mlflow = WandbLogger(tmp_path / "wandb-run", shared), MLFlowLogger(shared)
    (tmp_path / "wandb-run").mkdir()
    path = reporter("nc").final_figure(trainer(mlflow, wandb), HISTORY, None, "title")
    assert mlflow.artifacts == [("run-1", "nc/figure.png")]  # into the MLflow run's artifacts
    assert wandb.images == [("nc/figure", 7)]  # at the step of the last record
    assert path == str(tmp_path / "wandb-run" / "neural_collapse.png") and Path(path).is_file()
    assert list(shared.iterdir()) == []  # nothing in the folder the runs share


def test_a_failing_figure_is_one_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import lightning_neural_collapse.reporting.reporter as module

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no usable font")

    monkeypatch.setattr(module, "plot_history", broken)
    with pytest.warns(RuntimeWarning, match=r"no figure \(ValueError: no usable font\).*`log_figure=False`"):
        assert reporter().final_figure(trainer(TensorBoardLogger(tmp_path)), HISTORY, None, "t") is None


def test_onset_repeats_the_errors_until_twice_the_tpt_epoch() -> None:
    logger, fake = Recorder(), trainer()
    fake.loggers = [logger]
    report = reporter()
    for epoch, tpt in ((3, None), (7, 7), (17, 7), (18, 7)):
        record = {"epoch": epoch, "step": epoch, "train_error": 0.1, "nc4_ncc_mismatch": 0.2, "nc1": 1.0}
        report.scalars(fake, record, onset=(epoch, tpt))
    onset = [(step, sorted(k for k in calls if "tpt_onset" in k)) for step, calls in logger.calls]
    expected = ["nc/tpt_onset/nc4_ncc_mismatch", "nc/tpt_onset/train_error"]
    assert onset == [(3, expected), (7, expected), (17, expected), (18, [])]


def test_snapshots_follow_the_schedule_and_the_last_is_written_at_the_end(tmp_path: Path) -> None:
    from lightning_neural_collapse.functional import class_statistics
    from lightning_neural_collapse.reporting.reporter import Measured

    tb = TensorBoardLogger(tmp_path, name="tb")
    fake = trainer(tb)
    report = reporter()
    report.start_fit(horizon=99)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(60, 5, generator=generator, dtype=torch.float64)
    stats = class_statistics(features, torch.arange(60) % 4)
    weight = torch.randn(4, 5, generator=generator)
    history: list[dict[str, float]] = []
    written = []
    for epoch in range(57):  # the fit stops early (an EarlyStopping, say) at epoch 56
        history.append({"epoch": epoch, "step": 10 * epoch + 9, "nc1": 1.0 / (epoch + 1), "train_error": 0.0})
        measured = Measured(epoch, 10 * epoch + 9, stats, weight)
        if report.snapshot(fake, measured, history, tpt=30):
            written.append(epoch)
    assert written[:9] == list(range(9)) and 30 in written and 56 not in written and len(written) < 30
    report.final_figure(fake, history, 30)
    tb.experiment.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    assert set(acc.Tags()["histograms"]) == {
        f"nc/hist/{name}"
        for name in ("cosines_means", "norms_means", "cosines_weights", "norms_weights", "cosine_weight_mean")
    }
    steps = [event.step for event in acc.Histograms("nc/hist/cosines_means")]
    assert steps == [10 * e + 9 for e in written] + [569]  # the last measurement, at the end
    images = [event.step for event in acc.Images("nc/figure")]
    assert set(images) <= {10 * e + 9 for e in written} | {569} and images[-1] == 569 and len(images) <= 10
    assert 309 in images  # the TPT epoch

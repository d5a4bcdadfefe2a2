"""``Reporter``: one callback instance's way out to the loggers, at the steps Lightning uses.

Scalars of an epoch go to every logger at the step of Lightning's own epoch-end metrics (the one
``self.log(..., on_epoch=True)`` and ``LearningRateMonitor`` use, counted in batches that stepped, so also
right under manual optimisation with several optimizers), and into ``trainer.callback_metrics`` on every
rank, so that ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them. Histograms, the dashboard and
the figure are written on global rank 0 only, the histograms and the figure at the snapshots of a
:class:`~lightning_neural_collapse.reporting.snapshots.SnapshotSchedule` (and the last measurement's at the
end). The figure goes to each logger that shows images, as ``<prefix>/figure`` (MLflow: into the run's
artifacts), and is saved as a file in the run's own directory (TensorBoard's or CSV's version folder, the
W&B run folder), one file per prefix, never into a folder that other runs share. Nothing here raises: a
failure is one warning and the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_neural_collapse.functional.collapse import Geometry
from lightning_neural_collapse.functional.etf_deviation import Binned, etf_deviation
from lightning_neural_collapse.functional.statistics import ClassStatistics, GlobalMean
from lightning_neural_collapse.reporting._common import warn_once
from lightning_neural_collapse.reporting.capabilities import can_log_figure, run_dir
from lightning_neural_collapse.reporting.dashboard import log_dashboard
from lightning_neural_collapse.reporting.depth_figure import plot_depth
from lightning_neural_collapse.reporting.figures import log_figure, plot_history, save_figure
from lightning_neural_collapse.reporting.histograms import log_histograms
from lightning_neural_collapse.reporting.scalars import log_scalars
from lightning_neural_collapse.reporting.snapshots import SnapshotSchedule

_NOT_SCALARS = ("epoch", "step", "window")


ONSET_KEYS = ("train_error", "nc4_")
"""Record keys (prefixes) repeated under ``<prefix>/tpt_onset/``: they fall to 0 at TPT, so over a whole run
TensorBoard's outlier clipping draws them as a flat 0."""


def in_onset(unit: int, tpt_unit: int | None) -> bool:
    """Whether ``unit`` lies in the onset of TPT: every unit until TPT begins, then up to ``tpt + max(tpt, 10)``.

    Example:
        >>> in_onset(12, None), in_onset(17, 7), in_onset(18, 7), in_onset(40, 30)
        (True, True, False, True)
    """
    return tpt_unit is None or unit <= tpt_unit + max(tpt_unit, 10)


FIGURE_SNAPSHOTS = 4
"""Log-spaced figure snapshots (first, TPT and last on top: at most 7; TensorBoard keeps 10 images per tag)."""


class Reporter:
    """Reports one callback instance's numbers (see the module docstring).

    Args:
        prefix: first part of every tag.
        log_histograms: write the ETF-deviation histograms.
        log_figure: log the figure at the snapshots and at the end of the fit, and save it then.
        figure_name: the figure's file name (one per prefix).
        global_mean: see :func:`~lightning_neural_collapse.functional.etf_deviation`.
        title: the figure's title.
    """

    def __init__(
        self,
        prefix: str,
        *,
        log_histograms: bool,
        log_figure: bool,
        figure_name: str,
        global_mean: GlobalMean,
        title: str = "Neural Collapse",
    ) -> None:
        self.prefix = prefix
        self.histograms = log_histograms
        self.figure = log_figure
        self.figure_name = figure_name
        self.global_mean = global_mean
        self.title = title
        self.depth_figure_path: str | None = None
        """Where the progressive-collapse figure (``layers=``) was saved at the end of the last fit, or ``None``."""
        self.schedule = SnapshotSchedule(None)
        """When the histograms are written during the fit (set by :meth:`start_fit`)."""
        self.figures = SnapshotSchedule(None, FIGURE_SNAPSHOTS)
        """Which of those snapshots also log the figure (drawing it takes about a second)."""
        self._pending: tuple[dict[str, Binned], int] | None = None  # the latest measurement's, not yet written
        self._figure_step: int | None = None  # the step of the latest figure logged

    def start_fit(self, horizon: int | None) -> None:
        """A new fit: snapshots log-spaced up to ``horizon``, the last unit it can reach (``None``: unknown)."""
        self.schedule = SnapshotSchedule(horizon)
        self.figures = SnapshotSchedule(horizon, FIGURE_SNAPSHOTS)
        self._pending, self._figure_step = None, None

    def dashboard(
        self, trainer: Any, prefixes: Sequence[str], held_out: Sequence[str] = (), layers: Sequence[str] = ()
    ) -> None:
        """Write one custom-scalars layout holding every prefix, with the train-vs-validation charts of those in
        ``held_out`` and the per-layer charts of those in ``layers`` (rank 0; call it from one instance only)."""
        if trainer.is_global_zero:
            log_dashboard(trainer.loggers, list(prefixes), list(held_out), list(layers))

    def scalars(
        self,
        trainer: Any,
        record: Mapping[str, float],
        prefix: str | None = None,
        onset: tuple[int, int | None] | None = None,
    ) -> None:
        """``record``'s values as ``<prefix>/<key>`` at ``record["step"]`` (its ``epoch`` too: the report's x axis),
        and into ``callback_metrics`` (``prefix``: another first part, for example the held-out ``nc_val``).
        ``onset``: ``(unit, TPT unit or None)``; within :func:`in_onset`, the training errors and NC4 also go to the
        loggers as ``<prefix>/tpt_onset/<key>`` (a chart TensorBoard scales to the phase where they change)."""
        head = self.prefix if prefix is None else prefix
        scalars = {f"{head}/{key}": float(value) for key, value in record.items() if key not in _NOT_SCALARS}
        metrics = {key: torch.tensor(value, dtype=torch.float64) for key, value in scalars.items()}
        trainer.callback_metrics.update(metrics)  # float64: monitors score the logged value itself
        if "epoch" in record:
            scalars[f"{head}/epoch"] = float(record["epoch"])
        if onset is not None and in_onset(*onset):
            scalars.update(
                {f"{head}/tpt_onset/{key}": float(v) for key, v in record.items() if key.startswith(ONSET_KEYS)}
            )
        log_scalars(trainer.loggers, scalars, int(record["step"]))

    def snapshot(
        self,
        trainer: Any,
        measured: Measured,
        history: Sequence[Mapping[str, float]],
        tpt: int | None,
        val_history: Sequence[Mapping[str, float]] = (),
    ) -> bool:
        """A measurement's histograms when the snapshot schedule says so, and at some of those snapshots
        (:attr:`figures`) the figure of ``history`` so far (rank 0); otherwise its histograms wait for
        :meth:`final_figure` in case it stays the last one. ``tpt``: the TPT unit (epoch, or window) for the
        schedule; the figure marks it as :meth:`final_figure` does.

        Returns:
            Whether the snapshot was written.
        """
        if measured.statistics is None or not trainer.is_global_zero:
            return False
        values = self._values(measured)
        if not self.schedule.offer(measured.unit, tpt):
            self._pending = (values, measured.step)
            return False
        self._pending = None
        if values:
            log_histograms(trainer.loggers, values, measured.step, prefix=self.prefix)
        shows = any(can_log_figure(logger) for logger in trainer.loggers)  # no drawing for CSV or no logger
        if self.figure and history and shows and self.figures.offer(measured.unit, tpt):
            try:
                self._log_figure(trainer, history, measured.step, measured.figure_tpt, val_history)
            except Exception as err:  # a figure must not stop training
                warn_once(self.prefix, "the figure snapshot", err)
        return True

    def _values(self, measured: Measured) -> dict[str, Binned]:
        if not self.histograms or measured.statistics is None:
            return {}
        return etf_deviation(
            measured.statistics, measured.weight, global_mean=self.global_mean, geometry=measured.geometry
        )

    def _log_figure(
        self,
        trainer: Any,
        history: Sequence[Mapping[str, float]],
        step: int,
        tpt: int | None,
        val_history: Sequence[Mapping[str, float]],
    ) -> None:
        figure = plot_history(history, tpt, title=self.title, val_history=val_history)
        log_figure(trainer.loggers, figure, step=step, tag=f"{self.prefix}/figure")
        self._figure_step = step

    def final_figure(
        self,
        trainer: Any,
        history: Sequence[Mapping[str, float]],
        tpt_epoch: int | None,
        title: str | None = None,
        val_history: Sequence[Mapping[str, float]] = (),
        depth_tpt: int | None = None,
    ) -> str | None:
        """At the end of the fit (rank 0): the last measurement's histograms if its snapshot was not written; the
        history drawn, logged as ``<prefix>/figure`` (unless a snapshot logged it at that step) and saved in the
        run's directory; with layer keys also the progressive-collapse figure (``<prefix>/progressive_collapse``,
        ``progressive_collapse*.png``, its path in :attr:`depth_figure_path`; ``depth_tpt``: the TPT epoch it marks).

        Returns:
            The path of the saved file, or ``None`` (no figure asked for, no history, no logger with a
            directory of its own, or a failure, which gives one warning).
        """
        self.depth_figure_path = None
        if trainer.is_global_zero and self._pending is not None:
            values, step = self._pending
            self._pending = None
            if values:
                log_histograms(trainer.loggers, values, step, prefix=self.prefix)
        if not (self.figure and trainer.is_global_zero and trainer.loggers and history):
            return None
        try:
            title = title or self.title
            step = int(history[-1].get("step", trainer.global_step))
            figure = plot_history(history, tpt_epoch, title=title, val_history=val_history)
            if self._figure_step != step:
                log_figure(trainer.loggers, figure, step=step, tag=f"{self.prefix}/figure")
                self._figure_step = step
            # not `trainer.log_dir`: it broadcasts (a collective) and only rank 0 gets here
            directory = next((d for d in map(run_dir, trainer.loggers) if d), None)
            depth = plot_depth(history, depth_tpt, title=f"Progressive collapse through depth ({title})")
            if depth is not None:
                log_figure(trainer.loggers, depth, step=step, tag=f"{self.prefix}/progressive_collapse")
                name = self.figure_name.replace("neural_collapse", "progressive_collapse", 1)
                self.depth_figure_path = save_figure(depth, os.path.join(directory, name)) if directory else None
            return save_figure(figure, os.path.join(directory, self.figure_name)) if directory else None
        except Exception as err:  # a lost figure must not fail a finished run
            rank_zero_warn(
                f"NeuralCollapseCallback: no figure ({type(err).__name__}: {err}); set `log_figure=False` to skip it. "
                "The scalars and `history` are complete.",
                category=RuntimeWarning,
            )
            return None


@dataclass(frozen=True)
class Measured:
    """What :meth:`Reporter.snapshot` needs of one measurement.

    Attributes:
        unit: the epoch (or window) measured; step: its logging step; statistics, weight: the reduced statistics and
        the classifier rows; geometry: the measurement's pair pass (its cosine histograms); figure_tpt: the TPT mark
        of the figure (the epoch, or with windows the step), or ``None``.
    """

    unit: int
    step: int
    statistics: ClassStatistics | None
    weight: Tensor | None = None
    geometry: Geometry | None = None
    figure_tpt: int | None = None

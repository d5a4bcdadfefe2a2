"""``Reporter``: one callback instance's way out to the loggers, at the steps Lightning uses.

Scalars of an epoch go to every logger at the step of Lightning's own epoch-end metrics (the one
``self.log(..., on_epoch=True)`` and ``LearningRateMonitor`` use, counted in batches that stepped, so also
right under manual optimisation with several optimizers), and into ``trainer.callback_metrics`` on every
rank, so that ``ModelCheckpoint`` and ``EarlyStopping`` can monitor them. Histograms, the dashboard and
the figure are written on global rank 0 only. The figure goes to each logger that shows images, as
``<prefix>/figure`` (MLflow: into the run's artifacts), and is saved as a file in the run's own
directory (TensorBoard's or CSV's version folder, the W&B run folder), one file per prefix, never into a
folder that other runs share. Nothing here raises: a failure is one warning and the run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_neural_collapse.functional.collapse import Geometry
from lightning_neural_collapse.functional.etf_deviation import etf_deviation, ideal_values
from lightning_neural_collapse.functional.statistics import ClassStatistics, GlobalMean
from lightning_neural_collapse.reporting.capabilities import run_dir
from lightning_neural_collapse.reporting.dashboard import log_dashboard
from lightning_neural_collapse.reporting.depth_figure import plot_depth
from lightning_neural_collapse.reporting.figures import log_figure, plot_history, save_figure
from lightning_neural_collapse.reporting.histograms import log_histograms
from lightning_neural_collapse.reporting.scalars import log_scalars

_NOT_SCALARS = ("epoch", "step", "window")


class Reporter:
    """Reports one callback instance's numbers (see the module docstring).

    Args:
        prefix: first part of every tag.
        log_histograms: write the ETF-deviation histograms.
        log_figure: log and save the figure at the end of the fit.
        figure_name: the figure's file name (one per prefix).
        global_mean: see :func:`~lightning_neural_collapse.functional.etf_deviation`.
    """

    def __init__(
        self, prefix: str, *, log_histograms: bool, log_figure: bool, figure_name: str, global_mean: GlobalMean
    ) -> None:
        self.prefix = prefix
        self.histograms = log_histograms
        self.figure = log_figure
        self.figure_name = figure_name
        self.global_mean = global_mean
        self.depth_figure_path: str | None = None
        """Where the progressive-collapse figure (``layers=``) was saved at the end of the last fit, or ``None``."""

    def dashboard(
        self, trainer: Any, prefixes: Sequence[str], held_out: Sequence[str] = (), layers: Sequence[str] = ()
    ) -> None:
        """Write one custom-scalars layout holding every prefix, with the train-vs-validation charts of those in
        ``held_out`` and the per-layer charts of those in ``layers`` (rank 0; call it from one instance only)."""
        if trainer.is_global_zero:
            log_dashboard(trainer.loggers, list(prefixes), list(held_out), list(layers))

    def scalars(self, trainer: Any, record: Mapping[str, float], prefix: str | None = None) -> None:
        """``record``'s values as ``<prefix>/<key>`` at ``record["step"]``, and into ``callback_metrics``
        (``prefix``: another first part, for example the held-out ``nc_val``)."""
        head = self.prefix if prefix is None else prefix
        scalars = {f"{head}/{key}": float(value) for key, value in record.items() if key not in _NOT_SCALARS}
        metrics = {key: torch.tensor(value, dtype=torch.float64) for key, value in scalars.items()}
        trainer.callback_metrics.update(metrics)  # float64: monitors score the logged value itself
        log_scalars(trainer.loggers, scalars, int(record["step"]))

    def distributions(
        self,
        trainer: Any,
        stats: ClassStatistics | None,
        weight: Tensor | None,
        step: int,
        geometry: Geometry | None = None,
    ) -> None:
        """The ETF-deviation histograms of a measurement (rank 0); ``geometry`` holds the cosine histograms of the
        measurement's own pair pass, when it counted them."""
        if stats is None or not self.histograms or not trainer.is_global_zero:
            return
        values = etf_deviation(stats, weight, global_mean=self.global_mean, geometry=geometry)
        ideal = ideal_values(int(stats.present.sum()))
        log_histograms(trainer.loggers, values, step, prefix=self.prefix, ideal=ideal)

    def final_figure(
        self,
        trainer: Any,
        history: Sequence[Mapping[str, float]],
        tpt_epoch: int | None,
        title: str,
        val_history: Sequence[Mapping[str, float]] = (),
        depth_tpt: int | None = None,
    ) -> str | None:
        """Draw the history, log it as ``<prefix>/figure`` and save it in the run's directory (rank 0); with layer
        keys also the progressive-collapse figure (``<prefix>/progressive_collapse``, ``progressive_collapse*.png``,
        its path in :attr:`depth_figure_path`; ``depth_tpt``: the TPT epoch it marks).

        Returns:
            The path of the saved file, or ``None`` (no figure asked for, no history, no logger with a
            directory of its own, or a failure, which gives one warning).
        """
        self.depth_figure_path = None
        if not (self.figure and trainer.is_global_zero and trainer.loggers and history):
            return None
        try:
            figure = plot_history(history, tpt_epoch, title=title, val_history=val_history)
            step = int(history[-1].get("step", trainer.global_step))
            log_figure(trainer.loggers, figure, step=step, tag=f"{self.prefix}/figure")
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

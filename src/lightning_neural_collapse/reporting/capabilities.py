"""What a logger can show, detected by duck typing so ``pytorch_lightning`` loggers work as well."""

from __future__ import annotations

import os
from typing import Any, Literal

HistogramKind = Literal["tensorboard", "wandb", None]
FigureKind = Literal["tensorboard", "wandb", "mlflow", None]


def experiment_of(logger: Any) -> Any:
    """``logger.experiment``, or ``None`` when the logger has none or creating it fails.

    Accessing it creates the writer of a ``TensorBoardLogger`` (and its directory), which is intended.
    """
    try:
        return getattr(logger, "experiment", None)
    except Exception:
        return None


def _is_wandb(logger: Any, experiment: Any = None) -> bool:
    if "wandb" in type(logger).__name__.lower():
        return True
    return experiment is not None and type(experiment).__module__.split(".")[0] == "wandb"


def histogram_kind(logger: Any) -> HistogramKind:
    """How ``logger`` takes histograms: ``"tensorboard"`` (its experiment has ``add_histogram_raw``), ``"wandb"``
    (a W&B logger, by class name or run type) or ``None`` (log summary scalars instead).

    Example:
        >>> class Writer:
        ...     def add_histogram_raw(self, *args, **kwargs): ...
        >>> class Fake:
        ...     experiment = Writer()
        >>> histogram_kind(Fake()), histogram_kind(object())
        ('tensorboard', None)
    """
    if _is_wandb(logger):  # checked first: no need to start a W&B run to know
        return "wandb"
    experiment = experiment_of(logger)
    if callable(getattr(experiment, "add_histogram_raw", None)):
        return "tensorboard"
    if _is_wandb(logger, experiment):
        return "wandb"
    return None


def _is_mlflow(logger: Any) -> bool:
    return "mlflow" in type(logger).__name__.lower() or getattr(logger, "run_id", None) is not None


def figure_kind(logger: Any) -> FigureKind:
    """How ``logger`` takes a matplotlib figure: ``"tensorboard"`` (``experiment.add_figure``), ``"wandb"``
    (``logger.log_image``), ``"mlflow"`` (``experiment.log_figure`` into the run's artifacts) or ``None``.

    Example:
        >>> class Client:
        ...     def log_figure(self, run_id, figure, artifact_file): ...
        >>> class FakeMLflow:
        ...     run_id, experiment = "abc", Client()
        >>> figure_kind(FakeMLflow()), figure_kind(object())
        ('mlflow', None)
    """
    if _is_wandb(logger) and callable(getattr(logger, "log_image", None)):
        return "wandb"
    experiment = experiment_of(logger)
    if callable(getattr(experiment, "add_figure", None)):
        return "tensorboard"
    if _is_wandb(logger, experiment) and callable(getattr(logger, "log_image", None)):
        return "wandb"
    if _is_mlflow(logger) and callable(getattr(experiment, "log_figure", None)):
        return "mlflow"
    return None


def can_log_figure(logger: Any) -> bool:
    """``True`` when :func:`~lightning_neural_collapse.reporting.log_figure` can show a figure on it."""
    return figure_kind(logger) is not None


def run_dir(logger: Any) -> str | None:
    """The local directory that belongs to ``logger``'s run alone, or ``None``.

    ``log_dir`` where the logger has one (TensorBoard's and CSV's version folders), the W&B run's files
    folder, else ``save_dir/name/version``, the folder ``ModelCheckpoint`` uses for such a logger; never a bare
    ``save_dir``, which many runs share. ``None`` for MLflow, whose figures go to the run's artifacts instead.

    Example:
        >>> class Versioned:
        ...     log_dir, save_dir = "/logs/v3", "/logs"
        >>> class Custom:
        ...     save_dir, name, version = "/logs", "exp", 4
        >>> run_dir(Versioned()), run_dir(Custom()), run_dir(object())
        ('/logs/v3', '/logs/exp/version_4', None)
    """
    if _is_wandb(logger):
        directory = getattr(experiment_of(logger), "dir", None)
        return str(directory) if isinstance(directory, str) and directory else None
    if _is_mlflow(logger):
        return None
    try:
        value = getattr(logger, "log_dir", None)
        if value is not None and not callable(value):
            return str(value)
        save_dir = getattr(logger, "save_dir", None)
        if save_dir is None or callable(save_dir):
            return None
        name, version = getattr(logger, "name", None), getattr(logger, "version", None)
        parts = [str(name)] if isinstance(name, str) else []
        if version is not None:  # as ModelCheckpoint names it
            parts.append(version if isinstance(version, str) else f"version_{version}")
        return os.path.join(str(save_dir), *parts)
    except Exception:
        return None

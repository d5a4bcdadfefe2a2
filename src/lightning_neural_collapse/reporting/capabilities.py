"""What a logger can show, detected by duck typing so ``pytorch_lightning`` loggers work as well."""

from __future__ import annotations

from typing import Any, Literal

HistogramKind = Literal["tensorboard", "wandb", None]


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
    """How ``logger`` takes histograms: ``"tensorboard"`` (its experiment has ``add_histogram``), ``"wandb"``
    (a W&B logger, by class name or run type) or ``None`` (log summary scalars instead).

    Example:
        >>> class Writer:
        ...     def add_histogram(self, *args, **kwargs): ...
        >>> class Fake:
        ...     experiment = Writer()
        >>> histogram_kind(Fake()), histogram_kind(object())
        ('tensorboard', None)
    """
    if _is_wandb(logger):  # checked first: no need to start a W&B run to know
        return "wandb"
    experiment = experiment_of(logger)
    if callable(getattr(experiment, "add_histogram", None)):
        return "tensorboard"
    if _is_wandb(logger, experiment):
        return "wandb"
    return None


def figure_kind(logger: Any) -> HistogramKind:
    """How ``logger`` takes a matplotlib figure: ``"tensorboard"`` (``experiment.add_figure``), ``"wandb"``
    (``logger.log_image``) or ``None``."""
    if _is_wandb(logger) and callable(getattr(logger, "log_image", None)):
        return "wandb"
    experiment = experiment_of(logger)
    if callable(getattr(experiment, "add_figure", None)):
        return "tensorboard"
    if _is_wandb(logger, experiment) and callable(getattr(logger, "log_image", None)):
        return "wandb"
    return None


def can_log_figure(logger: Any) -> bool:
    """``True`` when :func:`~lightning_neural_collapse.reporting.log_figure` can show a figure on it."""
    return figure_kind(logger) is not None


def log_dir(logger: Any) -> str | None:
    """The local directory of ``logger``'s run (``log_dir``, else ``save_dir``), or ``None`` if it has none.

    Example:
        >>> class Fake:
        ...     save_dir = "/tmp/logs"
        >>> log_dir(Fake()), log_dir(object())
        ('/tmp/logs', None)
    """
    for attribute in ("log_dir", "save_dir"):
        try:
            value = getattr(logger, attribute, None)
        except Exception:
            value = None
        if value is not None and not callable(value):
            return str(value)
    return None

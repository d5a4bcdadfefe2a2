"""Scalars to every logger through ``Logger.log_metrics``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_neural_collapse.reporting._common import finite_float, warn_once


@rank_zero_only
def log_scalars(loggers: Sequence[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Log the finite entries of ``metrics`` at ``step`` to each logger; returns nothing.

    Values may be floats, ints or one-element tensors; NaN/inf (and non-numbers) are skipped, and nothing
    is sent when no value is left. A logger that fails gets one ``RuntimeWarning`` per logger type and is
    skipped. Runs on global rank 0 only (a no-op elsewhere), like ``Logger.log_metrics`` itself.

    Example:
        >>> class Printer:
        ...     def log_metrics(self, metrics, step):
        ...         print(step, metrics)
        >>> log_scalars([Printer()], {"nc/nc1": 0.5, "nc/nc3_cosine": float("nan")}, step=3)
        3 {'nc/nc1': 0.5}
    """
    clean = {key: number for key, value in metrics.items() if (number := finite_float(value)) is not None}
    if not clean:
        return
    for logger in loggers:
        try:
            logger.log_metrics(dict(clean), step=step)
        except Exception as err:  # a logging failure must never stop training
            warn_once(logger, "scalars", err)

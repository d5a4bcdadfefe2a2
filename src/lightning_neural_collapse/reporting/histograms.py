"""Histograms of the ETF deviation (pairwise cosines, relative norms) for any logger."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from lightning_neural_collapse.functional.etf_deviation import Binned
from lightning_neural_collapse.reporting._common import finite_array, finite_float, warn_once
from lightning_neural_collapse.reporting.capabilities import experiment_of, histogram_kind

_COSINE_EDGES = np.linspace(-1.0, 1.0, 41)
_QUANTILES = (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0))


def bin_edges(name: str, values: np.ndarray) -> np.ndarray:
    """Fixed linear bin edges for ``values`` (finite, non-empty): 41 edges on ``[-1, 1]`` when ``name``
    contains ``"cosine"``, otherwise 31 edges over the data range (widened around a constant).

    Example:
        >>> bin_edges("cosines_means", np.array([0.1]))[[0, 1, -1]].tolist()
        [-1.0, -0.95, 1.0]
        >>> bin_edges("norms_means", np.array([1.0, 1.0]))[[0, -1]].tolist()
        [0.95, 1.05]
    """
    if "cosine" in name:
        return _COSINE_EDGES
    low, high = float(values.min()), float(values.max())
    scale = max(1.0, abs(low), abs(high))
    if high - low <= 1e-9 * scale:
        centre, pad = (low + high) / 2, 0.05 * max(abs(low), 1.0)
        low, high = centre - pad, centre + pad
    return np.linspace(low, high, 31)


def _binned(name: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    edges = bin_edges(name, values)
    clipped = np.clip(values, edges[0], edges[-1])  # cosines may overshoot +-1 by rounding
    return clipped, edges


def _quantiles(prefix: str, name: str, values: np.ndarray | Binned) -> dict[str, float]:
    if isinstance(values, Binned):  # from the cumulative counts: to the resolution of a bin
        counts = values.counts.detach().cpu().to(torch.float64).numpy()
        edges = values.edges.detach().cpu().to(torch.float64).numpy()
        cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / max(float(counts.sum()), 1.0)
        levels = np.interp([q for _, q in _QUANTILES], cumulative, edges)
        levels[0], levels[-1] = values.min, values.max
    else:
        levels = np.quantile(values, [q for _, q in _QUANTILES])
    return {f"{prefix}/{name}_{label}": float(v) for (label, _), v in zip(_QUANTILES, levels, strict=True)}


def _add_tensorboard(logger: Any, arrays: dict[str, np.ndarray | Binned], prefix: str, step: int) -> None:
    experiment = experiment_of(logger)
    for name, values in arrays.items():
        tag = f"{prefix}/hist/{name}"
        if isinstance(values, Binned):
            experiment.add_histogram_raw(
                tag,
                min=values.min,
                max=values.max,
                num=values.total,
                sum=values.sum,
                sum_squares=values.sum_sq,
                bucket_limits=values.edges[1:].tolist(),
                bucket_counts=values.counts.tolist(),
                global_step=step,
            )
        else:
            clipped, edges = _binned(name, values)
            experiment.add_histogram(tag, clipped, global_step=step, bins=edges)


def _wandb_histograms(arrays: dict[str, np.ndarray | Binned], prefix: str) -> dict[str, Any]:
    import wandb  # lazily: an optional dependency

    histograms = {}
    for name, values in arrays.items():
        if isinstance(values, Binned):
            counts, edges = values.counts.cpu().numpy(), values.edges.cpu().numpy()
        else:
            counts, edges = np.histogram(*_binned(name, values))
        histograms[f"{prefix}/hist/{name}"] = wandb.Histogram(np_histogram=(counts, edges))
    return histograms


@rank_zero_only
def log_histograms(
    loggers: Sequence[Logger],
    values: Mapping[str, Tensor | Binned],
    step: int,
    prefix: str = "nc",
    ideal: Mapping[str, float] | None = None,
) -> None:
    """Log each entry of ``values`` as a histogram tagged ``f"{prefix}/hist/{name}"``; returns nothing.

    An entry is a tensor of values, or :class:`~lightning_neural_collapse.functional.etf_deviation.Binned` counts
    (the pairwise cosines, already binned; their quantile scalars are read off the bins, and they get no
    ``_gap``, which is ``nc2_maxangle_*`` exactly).

    TensorBoard gets ``add_histogram`` with fixed linear bins (see :func:`bin_edges`), W&B a
    ``wandb.Histogram``. Loggers without histograms (CSV, MLflow, ...) get the scalars
    ``f"{prefix}/{name}_min"``, ``_q25``, ``_median``, ``_q75`` and ``_max`` instead. When ``ideal`` holds
    ``name``, every logger also gets ``f"{prefix}/{name}_gap"``, the mean ``|value - ideal|``.
    Non-finite entries are dropped and empty tensors skipped. Failures give one ``RuntimeWarning`` per
    (logger type, kind) and never raise. Runs on global rank 0 only.

    Example:
        >>> import torch
        >>> class Keep:
        ...     def log_metrics(self, metrics, step):
        ...         self.metrics = metrics
        >>> csv_like = Keep()
        >>> values = {"cosines_means": torch.tensor([-0.4, -0.6, float("nan")]), "empty": torch.tensor([])}
        >>> log_histograms([csv_like], values, step=7, ideal={"cosines_means": -0.5})
        >>> {key: round(v, 3) for key, v in csv_like.metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'nc/cosines_means_gap': 0.1, 'nc/cosines_means_min': -0.6, 'nc/cosines_means_q25': -0.55,
         'nc/cosines_means_median': -0.5, 'nc/cosines_means_q75': -0.45, 'nc/cosines_means_max': -0.4}
    """
    arrays: dict[str, np.ndarray | Binned] = {
        name: value for name, value in values.items() if isinstance(value, Binned) and value.total > 0
    }
    arrays.update(
        {
            name: array
            for name, tensor in values.items()
            if not isinstance(tensor, Binned)
            if (array := finite_array(tensor)).size
        }
    )
    if not arrays:
        return
    gaps: dict[str, float] = {}
    for name, entry in arrays.items():
        target = finite_float(ideal.get(name)) if ideal is not None else None
        if target is not None and not isinstance(entry, Binned):
            gaps[f"{prefix}/{name}_gap"] = float(np.abs(entry - target).mean())
    for logger in loggers:
        scalars: dict[str, Any] = dict(gaps)
        kind = histogram_kind(logger)
        if kind is not None:
            try:
                if kind == "tensorboard":
                    _add_tensorboard(logger, arrays, prefix, step)
                else:  # W&B: the histograms travel with the scalars, in one call
                    scalars.update(_wandb_histograms(arrays, prefix))
            except Exception as err:  # never stop training over a histogram; fall back to quantiles
                warn_once(logger, "histograms", err)
                kind = None
        if kind is None:
            for name, entry in arrays.items():
                scalars.update(_quantiles(prefix, name, entry))
        if scalars:
            try:
                logger.log_metrics(scalars, step=step)
            except Exception as err:
                warn_once(logger, "scalars", err)

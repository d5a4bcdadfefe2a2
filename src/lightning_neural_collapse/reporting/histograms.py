"""Histograms of the ETF deviation (pairwise cosines, relative norms) for any logger."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_neural_collapse.functional.etf_deviation import Binned
from lightning_neural_collapse.reporting._common import warn_once
from lightning_neural_collapse.reporting.capabilities import experiment_of, histogram_kind

_QUANTILES = (("min", 0.0), ("q25", 0.25), ("median", 0.5), ("q75", 0.75), ("max", 1.0))
_WANDB_MAX_BINS = 512  # wandb.Histogram refuses more


def occupied(binned: Binned, max_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(counts, edges)`` of ``binned`` from the bin holding its minimum to the one holding its maximum (the empty
    bins outside left out), neighbours merged in groups until at most ``max_bins`` remain.

    Example:
        >>> import torch
        >>> binned = Binned.count(torch.tensor([0.3, 0.35, 0.6]), torch.linspace(0, 1, 11))
        >>> counts, edges = occupied(binned)
        >>> counts.tolist(), [round(e, 2) for e in edges.tolist()]
        ([2, 0, 0, 1], [0.3, 0.4, 0.5, 0.6, 0.7])
        >>> occupied(binned, max_bins=2)[0].tolist()
        [2, 1]
    """
    counts = binned.counts.detach().cpu().numpy().astype(np.int64)
    edges = binned.edges.detach().cpu().to(torch.float64).numpy()
    bins = len(counts)
    width = (edges[-1] - edges[0]) / bins
    first, last = (int(np.clip(np.floor((v - edges[0]) / width), 0, bins - 1)) for v in (binned.min, binned.max))
    counts, edges = counts[first : last + 1], edges[first : last + 2]
    if max_bins is not None and len(counts) > max_bins:
        group = -(-len(counts) // max_bins)
        pad = -len(counts) % group
        counts = np.concatenate([counts, np.zeros(pad, dtype=np.int64)]).reshape(-1, group).sum(axis=1)
        edges = np.concatenate([edges[::group], [edges[0] + width * group * len(counts)]])[: len(counts) + 1]
    return counts, edges


def _quantiles(prefix: str, name: str, values: Binned) -> dict[str, float]:
    counts = values.counts.detach().cpu().to(torch.float64).numpy()
    edges = values.edges.detach().cpu().to(torch.float64).numpy()
    cumulative = np.concatenate([[0.0], np.cumsum(counts)]) / max(float(counts.sum()), 1.0)
    levels = np.empty(len(_QUANTILES))
    for i, (_, q) in enumerate(_QUANTILES):  # inside the first bin that reaches q: to the resolution of a bin
        index = max(int(np.searchsorted(cumulative, q, side="left")), 1)
        below, above = cumulative[index - 1], cumulative[index]
        fraction = (q - below) / (above - below) if above > below else 1.0
        levels[i] = edges[index - 1] + fraction * (edges[index] - edges[index - 1])
    levels[0], levels[-1] = values.min, values.max
    levels = np.clip(levels, values.min, values.max)
    return {f"{prefix}/{name}_{label}": float(v) for (label, _), v in zip(_QUANTILES, levels, strict=True)}


def _add_tensorboard(logger: Any, arrays: Mapping[str, Binned], prefix: str, step: int) -> None:
    experiment = experiment_of(logger)
    for name, values in arrays.items():
        counts, edges = occupied(values)
        # TensorBoard draws bucket i over [limit[i-1], limit[i]], the first from `min` and the last to `max`; all in
        # one bin (a perfect ETF): that bin's own edges, not a zero-width bucket
        low, high = (values.min, values.max) if values.min < values.max else (float(edges[0]), float(edges[-1]))
        experiment.add_histogram_raw(
            f"{prefix}/hist/{name}",
            min=low,
            max=high,
            num=values.total,
            sum=values.sum,
            sum_squares=values.sum_sq,
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts.tolist(),
            global_step=step,
        )


def _wandb_histograms(arrays: Mapping[str, Binned], prefix: str) -> dict[str, Any]:
    import wandb  # lazily: an optional dependency

    return {
        f"{prefix}/hist/{name}": wandb.Histogram(np_histogram=occupied(values, _WANDB_MAX_BINS))
        for name, values in arrays.items()
    }


@rank_zero_only
def log_histograms(loggers: Sequence[Logger], values: Mapping[str, Binned], step: int, prefix: str = "nc") -> None:
    """Log each entry of ``values`` (:class:`~lightning_neural_collapse.functional.etf_deviation.Binned` counts, as
    :func:`~lightning_neural_collapse.functional.etf_deviation.etf_deviation` returns them) as a histogram tagged
    ``f"{prefix}/hist/{name}"``; returns nothing.

    TensorBoard gets ``add_histogram_raw`` with the fixed bins from the one holding the minimum to the one holding
    the maximum (:func:`occupied`), W&B a ``wandb.Histogram`` of the same (at most 512 bins). Loggers without
    histograms (CSV, MLflow, ...) get the scalars ``f"{prefix}/{name}_min"``, ``_q25``, ``_median``, ``_q75`` and
    ``_max`` instead (the quartiles to the resolution of a bin). Failures give one ``RuntimeWarning`` per
    (logger type, kind) and never raise. Runs on global rank 0 only.

    Example:
        >>> import torch
        >>> from lightning_neural_collapse.functional.etf_deviation import NORM_EDGES
        >>> class Keep:
        ...     def log_metrics(self, metrics, step):
        ...         self.metrics = metrics
        >>> csv_like = Keep()
        >>> log_histograms([csv_like], {"norms_means": Binned.count(torch.tensor([0.9, 1.0, 1.1]), NORM_EDGES)}, 7)
        >>> {key: round(v, 2) for key, v in csv_like.metrics.items()}  # doctest: +NORMALIZE_WHITESPACE
        {'nc/norms_means_min': 0.9, 'nc/norms_means_q25': 0.9, 'nc/norms_means_median': 1.0,
         'nc/norms_means_q75': 1.1, 'nc/norms_means_max': 1.1}
    """
    arrays = {name: value for name, value in values.items() if value.total > 0}
    if not arrays:
        return
    for logger in loggers:
        scalars: dict[str, Any] = {}
        kind = histogram_kind(logger)
        if kind is not None:
            try:
                if kind == "tensorboard":
                    _add_tensorboard(logger, arrays, prefix, step)
                else:  # W&B: the histograms travel in one call
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

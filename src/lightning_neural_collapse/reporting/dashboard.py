"""A TensorBoard custom-scalars dashboard that groups the NC scalars like the paper's figures."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_neural_collapse.reporting._common import warn_once
from lightning_neural_collapse.reporting.capabilities import experiment_of

_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NC1", ("nc1", "nc1_cdnv")),
    ("NC2 equinorm", ("nc2_equinorm_means", "nc2_equinorm_weights")),
    ("NC2 equiangularity", ("nc2_equiangular_means", "nc2_equiangular_weights")),
    ("NC2 max-angle", ("nc2_maxangle_means", "nc2_maxangle_weights")),
    ("NC2 ETF distance", ("nc2_etf_distance_means", "nc2_etf_distance_weights")),
    ("NC3", ("nc3_self_duality", "nc3_cosine")),
    ("NC4", ("nc4_ncc_mismatch", "nc4_ncc_mismatch_prev_means")),
    ("Training error", ("train_error", "train_error_eval")),
)


def dashboard_layout(prefix: str | Sequence[str] = "nc") -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout ``{category: {chart: ["Multiline", [tag regexes]]}}`` for
    ``SummaryWriter.add_custom_scalars``: one category ``f"Neural collapse ({prefix})"`` per prefix, with
    the charts NC1, NC2 equinorm, NC2 equiangularity, NC2 max-angle, NC2 ETF distance, NC3, NC4,
    Training error and ETF gaps. Each regex matches exactly one tag, e.g. ``^nc/nc1$``.

    Example:
        >>> layout = dashboard_layout("nc")
        >>> layout["Neural collapse (nc)"]["NC1"]
        ['Multiline', ['^nc/nc1$', '^nc/nc1_cdnv$']]
    """
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    layout: dict[str, dict[str, list[Any]]] = {}
    for p in prefixes:
        charts: dict[str, list[Any]] = {
            title: ["Multiline", [f"^{re.escape(f'{p}/{key}')}$" for key in keys]] for title, keys in _CHARTS
        }
        charts["ETF gaps"] = ["Multiline", [f"^{re.escape(p + '/')}[A-Za-z0-9_]+_gap$"]]
        layout[f"Neural collapse ({p})"] = charts
    return layout


@rank_zero_only
def log_dashboard(loggers: Sequence[Logger], prefix: str | Sequence[str] = "nc") -> None:
    """Write :func:`dashboard_layout` with ``experiment.add_custom_scalars`` to each TensorBoard-like
    logger (others are left alone); returns nothing. A run keeps only its latest layout, so pass every
    prefix in one call. Failures give one ``RuntimeWarning`` per logger type. Runs on global rank 0 only.
    """
    layout = dashboard_layout(prefix)
    for logger in loggers:
        add = getattr(experiment_of(logger), "add_custom_scalars", None)
        if not callable(add):
            continue
        try:
            add(layout)
        except Exception as err:
            warn_once(logger, "the custom-scalars dashboard", err)

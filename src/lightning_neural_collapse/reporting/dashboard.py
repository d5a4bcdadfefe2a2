"""A TensorBoard custom-scalars dashboard that groups the NC scalars like the paper's figures."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_neural_collapse.reporting._common import warn_once
from lightning_neural_collapse.reporting.capabilities import experiment_of

# (title, keys): one quantity per chart (the classifier's and the means' version of it, or its variants, as lines)
_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NC1: Tr(Sigma_W Sigma_B^+) / C", ("nc1",)),
    ("NC1: CDNV", ("nc1_cdnv",)),
    ("NC2: equinorm (std / mean of norms)", ("nc2_equinorm_means", "nc2_equinorm_weights")),
    ("NC2: equiangularity (std of cosines)", ("nc2_equiangular_means", "nc2_equiangular_weights")),
    ("NC2: max-angle (mean |cos + 1/(C-1)|)", ("nc2_maxangle_means", "nc2_maxangle_weights")),
    ("NC2: ETF distance", ("nc2_etf_distance_means", "nc2_etf_distance_weights")),
    ("NC3: self-duality (falls to 0)", ("nc3_self_duality",)),
    ("NC3: cos(w_c, mu_c) (rises to 1)", ("nc3_cosine",)),
    ("NC4: NCC mismatch", ("nc4_ncc_mismatch", "nc4_ncc_mismatch_prev_means", "nc4_ncc_mismatch_prev_means_sampled")),
    ("Training error", ("train_error", "train_error_eval")),
)
# charts over the onset of TPT only (``<prefix>/tpt_onset/<key>``, see Reporter.scalars): readable scales
_ONSET_CHARTS: tuple[tuple[str, str], ...] = (
    ("TPT onset: training error", "train_error"),
    ("TPT onset: NC4 NCC mismatch", "nc4_"),
)


# (title, ((training key or None, held-out key or None), ...)): training and validation lines in one chart
_HELD_OUT_CHARTS: tuple[tuple[str, tuple[tuple[str | None, str | None], ...]], ...] = (
    ("NC1: training vs validation", (("nc1", "nc1"),)),
    ("CDNV: training vs validation", (("nc1_cdnv", "nc1_cdnv"),)),
    ("Validation accuracy: network vs nearest training mean", ((None, "accuracy"), (None, "ncc_accuracy"))),
    (
        "NC4: training vs validation",
        (("nc4_ncc_mismatch", "nc4_ncc_mismatch"), ("nc4_ncc_mismatch_prev_means", None)),
    ),
    ("Validation mean shift", ((None, "mean_shift"),)),
)


# (title, per-layer keys): each chart holds that key of every listed layer, one line per layer
_LAYER_CHARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("NC1 per layer", ("nc1", "nc1_prev_means")),
    ("NC1 trace ratio per layer", ("nc1_trace_ratio",)),
    ("CDNV per layer", ("nc1_cdnv",)),
    ("NCC accuracy per layer (training)", ("ncc_accuracy", "ncc_accuracy_prev_means")),
    ("NC2 equinorm per layer", ("nc2_equinorm_means",)),
    ("NC2 equiangularity per layer", ("nc2_equiangular_means",)),
    ("NC2 max-angle per layer", ("nc2_maxangle_means",)),
    ("NC2 ETF distance per layer", ("nc2_etf_distance_means",)),
)


def dashboard_layout(
    prefix: str | Sequence[str] = "nc", held_out: Sequence[str] = (), layers: Sequence[str] = ()
) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout ``{category: {chart: ["Multiline", [tag regexes]]}}`` for
    ``SummaryWriter.add_custom_scalars``: one category ``f"Neural collapse ({prefix})"`` per prefix, with one
    quantity per chart: NC1, CDNV, NC2 equinorm, equiangularity, max-angle and ETF distance (class means and
    classifier), NC3 self-duality, NC3 cosine, NC4, training error, and the training error and NC4 over the onset
    of TPT (``<prefix>/tpt_onset/...``). Each regex matches exactly one tag, e.g. ``^nc/nc1$``.

    For each prefix in ``held_out`` (those that measure a validation loop) a category
    ``f"Held-out collapse ({prefix})"`` puts training and validation in one chart: NC1, CDNV, the validation
    accuracy of the network and of the nearest training class mean, NC4, and the mean shift. A held-out regex
    matches the tag of every validation dataloader, e.g. ``^nc_val/([^/]+/)?nc1$``.

    For each prefix in ``layers`` (those with ``layers=``) a category ``f"Per-layer collapse ({prefix})"``: one chart
    per per-layer key, each with a line per layer (``^nc/layers/[^/]+/nc1$``...), the validation NCC accuracy per
    layer, and He & Su's depth fit (slope, ratio per layer, Pearson r).

    Example:
        >>> layout = dashboard_layout("nc", held_out=["nc"])
        >>> layout["Neural collapse (nc)"]["NC1: CDNV"]
        ['Multiline', ['^nc/nc1_cdnv$']]
        >>> layout["Held-out collapse (nc)"]["NC1: training vs validation"]
        ['Multiline', ['^nc/nc1$', '^nc_val/([^/]+/)?nc1$']]
    """
    prefixes = [prefix] if isinstance(prefix, str) else list(prefix)
    layout: dict[str, dict[str, list[Any]]] = {}
    for p in prefixes:
        charts: dict[str, list[Any]] = {
            title: ["Multiline", [f"^{re.escape(f'{p}/{key}')}$" for key in keys]] for title, keys in _CHARTS
        }
        for title, key in _ONSET_CHARTS:
            charts[title] = ["Multiline", [f"^{re.escape(f'{p}/tpt_onset/{key}')}[A-Za-z0-9_]*$"]]
        layout[f"Neural collapse ({p})"] = charts
    for p in held_out:
        val = re.escape(f"{p}_val/")
        layout[f"Held-out collapse ({p})"] = {
            title: [
                "Multiline",
                [f"^{re.escape(f'{p}/{train}')}$" for train, _ in lines if train]
                + [f"^{val}([^/]+/)?{key}$" for _, key in lines if key],
            ]
            for title, lines in _HELD_OUT_CHARTS
        }
    for p in layers:
        head = re.escape(f"{p}/layers/")
        charts = {title: ["Multiline", [f"^{head}[^/]+/{key}$" for key in keys]] for title, keys in _LAYER_CHARTS}
        charts["NCC accuracy per layer (validation)"] = [
            "Multiline",
            [f"^{re.escape(f'{p}_val/')}([^/]+/)?layers/[^/]+/ncc_accuracy$"],
        ]
        charts["Depth fit of log NC1 (He & Su)"] = [
            "Multiline",
            [f"^{head}nc1_depth_(slope|ratio|pearson_r)(_prev_means)?$"],
        ]
        layout[f"Per-layer collapse ({p})"] = charts
    return layout


@rank_zero_only
def log_dashboard(
    loggers: Sequence[Logger],
    prefix: str | Sequence[str] = "nc",
    held_out: Sequence[str] = (),
    layers: Sequence[str] = (),
) -> None:
    """Write :func:`dashboard_layout` with ``experiment.add_custom_scalars`` to each TensorBoard-like
    logger (others are left alone); returns nothing. A run keeps only its latest layout, so pass every
    prefix in one call. Failures give one ``RuntimeWarning`` per logger type. Runs on global rank 0 only.
    """
    layout = dashboard_layout(prefix, held_out, layers)
    for logger in loggers:
        add = getattr(experiment_of(logger), "add_custom_scalars", None)
        if not callable(add):
            continue
        try:
            add(layout)
        except Exception as err:
            warn_once(logger, "the custom-scalars dashboard", err)

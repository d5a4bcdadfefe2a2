"""The "progressive collapse" figure (``layers=``): each per-layer key against depth, at a few epochs, with He & Su's
fit of ``log NC1`` against the layer index."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from lightning_neural_collapse.functional.layers import PREVIOUS_SUFFIX, depth_fit
from lightning_neural_collapse.reporting._common import finite_float

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# (panel title, key; the projection keys are looked up with and without the online suffix)
_PANELS: tuple[tuple[str, str], ...] = (
    ("NC1: Tr(Σ_W Σ_B⁺)/C", "nc1"),
    ("NC1: trace ratio Tr(Σ_W)/Tr(Σ_B)", "nc1_trace_ratio"),
    ("NC1: CDNV", "nc1_cdnv"),
    ("NCC accuracy (training)", "ncc_accuracy"),
    ("NC2: equinorm (means)", "nc2_equinorm_means"),
    ("NC2: equiangularity (means)", "nc2_equiangular_means"),
    ("NC2: max-angle (means)", "nc2_maxangle_means"),
    ("NC2: ETF distance (means)", "nc2_etf_distance_means"),
)


def layer_tags(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The layers' tags in the records, in depth order (the order their keys were recorded in).

    Example:
        >>> layer_tags([{"layers/a/nc1": 1.0, "layers/b/nc1": 0.5, "layers/nc1_depth_slope": -0.7}])
        ['a', 'b']
    """
    tags: list[str] = []
    for row in history:
        for key in row:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "layers" and parts[1] not in tags:
                tags.append(parts[1])
    return tags


def chosen_records(
    history: Sequence[Mapping[str, Any]], tpt_epoch: int | None, at_most: int = 4
) -> list[Mapping[str, Any]]:
    """Up to ``at_most`` measured records with layer keys: the first, the one where TPT began, the last, and
    evenly spaced ones between (by position), in time order.

    Example:
        >>> rows = [{"epoch": e, "layers/a/nc1_cdnv": 1.0} for e in range(10)]
        >>> [row["epoch"] for row in chosen_records(rows, tpt_epoch=7)]
        [0, 4, 7, 9]
    """
    measured = [row for row in history if any(str(key).startswith("layers/") for key in row)]
    if len(measured) <= at_most:
        return measured
    picks = {0, len(measured) - 1}
    if tpt_epoch is not None:
        at_tpt = [i for i, row in enumerate(measured) if finite_float(row.get("epoch")) == tpt_epoch]
        picks.update(at_tpt[:1])
    spare = at_most - len(picks)
    for j in range(1, spare + 1):
        picks.add(round(j * (len(measured) - 1) / (spare + 1)))
    return [measured[i] for i in sorted(picks)[:at_most]]


def _value(row: Mapping[str, Any], tag: str, key: str) -> float | None:
    for name in (key, key + PREVIOUS_SUFFIX):
        value = finite_float(row.get(f"layers/{tag}/{name}"))
        if value is not None:
            return value
    return None


def plot_depth(
    history: Sequence[Mapping[str, Any]], tpt_epoch: int | None = None, title: str | None = None
) -> Figure | None:
    """A new matplotlib ``Figure`` (Agg canvas) of 8 panels, each a per-layer key against the layer (depth order)
    at a few epochs (:func:`chosen_records`); the NC1 panel also draws He & Su's least-squares line of ``log NC1``
    against depth for the last epoch, with the ratio per layer and Pearson's r in its legend (log y axes where the
    values span more than a factor of 10). Online records' NC1
    and NCC accuracy are those against the previous means. ``None`` when the records hold no layer key.

    Example:
        >>> rows = [{"epoch": 0, "layers/a/nc1": 20.0, "layers/b/nc1": 1.0, "layers/c/nc1": 0.4}]
        >>> figure = plot_depth(rows)
        >>> len(figure.axes), figure.axes[0].get_yscale()
        (8, 'log')
    """
    tags = layer_tags(history)
    records = chosen_records(history, tpt_epoch)
    if not tags or not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13.0, 6.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 4).ravel()
    figure.subplots_adjust(left=0.06, right=0.99, bottom=0.14, top=0.9 if title else 0.94, wspace=0.4, hspace=0.6)
    for ax, (panel_title, key) in zip(axes, _PANELS, strict=True):
        _panel(ax, records, tags, panel_title, key, tpt_epoch)
    if title:
        figure.suptitle(title, fontsize=12)
    return figure


def _panel(
    ax: Axes,
    records: Sequence[Mapping[str, Any]],
    tags: list[str],
    title: str,
    key: str,
    tpt_epoch: int | None,
) -> None:
    plotted: list[float] = []
    for row in records:
        points = [(i, _value(row, tag, key)) for i, tag in enumerate(tags)]
        xs = [i for i, v in points if v is not None]
        ys = [v for _, v in points if v is not None]
        if not xs:
            continue
        epoch = finite_float(row.get("epoch"))
        label = f"epoch {int(epoch)}" if epoch is not None else "measurement"
        if tpt_epoch is not None and epoch == tpt_epoch:
            label += " (TPT)"
        ax.plot(xs, ys, "-", marker="o", markersize=3, linewidth=1.3, label=label)
        plotted.extend(ys)
    if key == "nc1" and records:
        values = [_value(records[-1], tag, key) for tag in tags]
        fit = depth_fit([math.nan if v is None else v for v in values])
        if fit is not None:
            start = next(i for i, v in enumerate(values) if v is not None and v > 0)
            intercept = _intercept([math.nan if v is None else v for v in values], fit.slope)
            xs = [start, len(tags) - 1]
            r = "" if math.isnan(fit.pearson_r) else f", r = {fit.pearson_r:.3f}"
            ax.plot(
                xs,
                [math.exp(intercept + fit.slope * x) for x in xs],
                ":",
                color="0.3",
                label=f"fit: ×{fit.ratio:.3g} per layer{r}",
            )
    if plotted and min(plotted) > 0 and max(plotted) > 10 * min(plotted) and key != "ncc_accuracy":
        ax.set_yscale("log")
    if not plotted:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    else:
        ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks(range(len(tags)))
    ax.set_xticklabels(tags, rotation=30, ha="right", fontsize=7)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, which="major", alpha=0.3)


def _intercept(values: list[float], slope: float) -> float:
    """The least-squares intercept of ``log values`` on the layer index for ``slope`` (positive finite values)."""
    points = [(float(i), math.log(v)) for i, v in enumerate(values) if math.isfinite(v) and v > 0]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    return mean_y - slope * mean_x

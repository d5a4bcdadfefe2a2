"""A one-figure summary of a run (the panels of Papyan et al. 2020, Figs 2-7) and where to send it."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from lightning_neural_collapse.reporting._common import finite_float, warn_once
from lightning_neural_collapse.reporting.capabilities import experiment_of, figure_kind

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# (panel title, y label, ((history key, legend label, line style), ...)); "val:" keys come from the held-out records
_PANELS: tuple[tuple[str, str, tuple[tuple[str, str, str], ...]], ...] = (
    (
        "NC1: within-class variability",
        r"$\mathrm{Tr}(\Sigma_W \Sigma_B^{+})/C$",
        (("nc1", "training", "-"), ("val:nc1", "validation", ":")),
    ),
    (
        "NC1: CDNV",
        "class-distance normalised var.",
        (("nc1_cdnv", "training", "-"), ("val:nc1_cdnv", "validation", ":")),
    ),
    (
        "NC2: equinorm",
        "Std / Avg of norms",
        (
            ("nc2_equinorm_means", "class means", "-"),
            ("nc2_equinorm_weights", "classifier", "--"),
            ("val:nc2_equinorm_means", "validation means", ":"),
        ),
    ),
    (
        "NC2: equiangularity",
        "Std of cosines",
        (
            ("nc2_equiangular_means", "class means", "-"),
            ("nc2_equiangular_weights", "classifier", "--"),
            ("val:nc2_equiangular_means", "validation means", ":"),
        ),
    ),
    (
        "NC2: max-angle",
        r"Avg $|\cos + 1/(C-1)|$",
        (
            ("nc2_maxangle_means", "class means", "-"),
            ("nc2_maxangle_weights", "classifier", "--"),
            ("val:nc2_maxangle_means", "validation means", ":"),
        ),
    ),
    ("NC3: self-duality", r"$\|W^T/\|W\| - M/\|M\|\|^2$", (("nc3_self_duality", "", "-"),)),
    (
        "NC4: NCC mismatch",
        "fraction of samples",
        (
            ("nc4_ncc_mismatch", "exact pass", "-"),
            ("nc4_ncc_mismatch_prev_means", "previous means", "-"),
            ("nc4_ncc_mismatch_prev_means_sampled", "previous means, sampled", "-"),
            ("val:nc4_ncc_mismatch", "validation", ":"),
        ),
    ),
    (
        "Training error",
        "fraction misclassified",
        (
            ("train_error", "training steps", "-"),
            ("train_error_eval", "eval pass", "--"),
            ("val:error", "validation", ":"),
            ("val:ncc_error", "validation, NCC rule", ":"),
        ),
    ),
)


def _val_rows(val_history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The held-out records as ``val:<key>`` rows (the first dataloader's keys when there are several), with the
    errors ``val:error`` (``1 - accuracy``) and ``val:ncc_error`` (``1 - ncc_accuracy``)."""
    rows = []
    for record in val_history:
        tagged = sorted({key.split("/", 1)[0] for key in record if "/" in key})
        head = f"{tagged[0]}/" if tagged and "accuracy" not in record else ""
        row: dict[str, Any] = {key: record[key] for key in ("epoch", "step") if key in record}
        for key, value in record.items():
            if key.startswith(head) and key not in ("epoch", "step"):
                row[f"val:{key[len(head) :]}"] = value
        for name, key in (("val:error", "val:accuracy"), ("val:ncc_error", "val:ncc_accuracy")):
            value = finite_float(row.get(key))
            if value is not None:
                row[name] = 1.0 - value
        rows.append(row)
    return rows


def _series(history: Sequence[Mapping[str, Any]], key: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in history:
        epoch, value = finite_float(row.get(x)), finite_float(row.get(key))
        if epoch is not None and value is not None:
            xs.append(epoch)
            ys.append(value)
    return xs, ys


@dataclass(frozen=True)
class RunLines:
    """One run's part of a figure: its records, the held-out records, its TPT mark and how it is told apart.

    Attributes:
        history: one mapping per training record; val_history: the held-out records; tpt: where TPT began on the
        x axis (or ``None``); label: the run's name in the legends (empty for a lone run); colour: its matplotlib
        colour (``None``: each line its own, as for a lone run); x: the x key, ``"epoch"`` or ``"step"``.
    """

    history: Sequence[Mapping[str, Any]]
    val_history: Sequence[Mapping[str, Any]] = ()
    tpt: int | None = None
    label: str = ""
    colour: str | None = None
    x: str = "epoch"


def _scale(ax: Axes, values: Sequence[float]) -> None:
    """Log y when every value is positive; symmetric-log (linear below the smallest positive value) when some are
    0 and none negative, so that errors that reach 0 at TPT keep their decay visible."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values):
        ax.set_yscale("log")
    elif positive and min(values) >= 0:
        ax.set_yscale("symlog", linthresh=min(positive), linscale=0.5)


def _panel(
    ax: Axes,
    runs: Sequence[RunLines],
    title: str,
    ylabel: str,
    lines: tuple[tuple[str, str, str], ...],
) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    plotted: list[float] = []
    drawn: dict[str, str] = {}  # label -> line style, in drawing order
    for run in runs:
        val_rows = _val_rows(run.val_history)
        for key, label, style in lines:
            xs, ys = _series(val_rows if key.startswith("val:") else run.history, key, run.x)
            if xs:
                drawn.setdefault(label or key, style)
                ax.plot(xs, ys, style, color=run.colour, marker="o", markersize=2.5, linewidth=1.3, label=label or key)
                plotted.extend(ys)
        if run.tpt is not None:
            ax.axvline(run.tpt, color=run.colour or "0.35", linestyle="--", linewidth=1.0, alpha=0.8)
    _scale(ax, plotted)
    if ax.get_yscale() == "symlog":
        ax.set_ylim(bottom=0.0)
    if not plotted:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    elif len(drawn) > 1 and len(runs) > 1:  # colours are the runs (the figure's legend); here the line styles
        proxies = [
            Line2D([], [], color="0.3", linestyle=style, label=label)  # type: ignore[arg-type]
            for label, style in drawn.items()
        ]
        ax.legend(handles=proxies, fontsize=7, frameon=False)
    elif len(drawn) > 1:
        ax.legend(fontsize=8, frameon=False)
    marks = {run.tpt for run in runs if run.tpt is not None}
    if len(marks) == 1:
        ax.text(marks.pop(), 0.98, " TPT", transform=ax.get_xaxis_transform(), ha="left", va="top", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(runs[0].x if runs else "epoch", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)


def plot_runs(runs: Sequence[RunLines], title: str | None = None) -> Figure:
    """A new matplotlib ``Figure`` (Agg canvas, no pyplot state) with the 8 panels of :func:`plot_history`, every
    run's lines in each (in the run's colour, its TPT marked by a dashed line of that colour).

    Raises:
        ImportError: if matplotlib is not installed (``pip install lightning-neural-collapse[plot]``).

    Example:
        >>> a = RunLines([{"epoch": 0, "nc1": 2.0}, {"epoch": 1, "nc1": 0.5}], tpt=1, label="a", colour="C0")
        >>> b = RunLines([{"epoch": 0, "nc1": 3.0}, {"epoch": 1, "nc1": 0.1}], label="b", colour="C1")
        >>> figure = plot_runs([a, b])
        >>> len(figure.axes[0].lines), figure.axes[0].get_yscale()
        (3, 'log')
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'lightning-neural-collapse[plot]'") from err
    figure = Figure(figsize=(13.0, 6.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 4).ravel()
    # fixed margins: a layout engine would triple the drawing time
    figure.subplots_adjust(left=0.055, right=0.99, bottom=0.08, top=0.9 if title else 0.94, wspace=0.4, hspace=0.45)
    for ax, (panel_title, ylabel, lines) in zip(axes, _PANELS, strict=True):
        _panel(ax, runs, panel_title, ylabel, lines)
    if len(runs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=run.colour, linewidth=2.0, label=run.label) for run in runs]
        figure.legend(handles=handles, loc="upper left", ncol=min(len(runs), 6), fontsize=9, frameon=False)
    if title:
        figure.suptitle(title, fontsize=12)
    return figure


def plot_history(
    history: Sequence[Mapping[str, float]],
    tpt_epoch: int | None,
    title: str | None = None,
    val_history: Sequence[Mapping[str, float]] = (),
) -> Figure:
    """A new matplotlib ``Figure`` (Agg canvas, no pyplot state) with 8 panels against the epoch (against the
    step when the records are windows of steps, with ``tpt_epoch`` then the step where TPT began): NC1,
    NC1 CDNV, NC2 equinorm, NC2 equiangularity, NC2 max-angle (class means solid, classifier dashed),
    NC3 self-duality, NC4 NCC mismatch and training error. ``val_history`` (the held-out records) adds dotted
    validation lines: test collapse in the NC1 and NC2 panels, the validation NC4, and the validation error of
    the network and of the NCC rule with the training means.

    ``history`` holds one mapping per measurement with ``"epoch"`` and any of the keys ``train_error``,
    ``nc1``, ``nc1_cdnv``, ``nc2_*_means``/``nc2_*_weights``, ``nc3_self_duality``, ``nc4_ncc_mismatch``;
    missing or non-finite values are skipped. Panels whose values are all positive use a log y axis, those that
    reach 0 (errors after TPT) a symmetric-log one, linear below their smallest positive value.
    ``tpt_epoch`` draws a dashed line labelled "TPT" in every panel.

    Raises:
        ImportError: if matplotlib is not installed (``pip install lightning-neural-collapse[plot]``).

    Example:
        >>> figure = plot_history([{"epoch": 0, "nc1": 2.0}, {"epoch": 1, "nc1": 0.5, "train_error": 0.0}], 1)
        >>> len(figure.axes), figure.axes[0].get_yscale()
        (8, 'log')
    """
    x = "step" if any("window" in row for row in history) else "epoch"
    return plot_runs([RunLines(history, val_history, tpt_epoch, x=x)], title)


def _to_rgb(figure: Figure) -> np.ndarray:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


@rank_zero_only
def log_figure(loggers: Sequence[Logger], figure: Figure, step: int, tag: str = "nc/figure") -> None:
    """Show ``figure`` under ``tag`` on each logger that takes images; returns nothing.

    TensorBoard: ``experiment.add_figure(tag, figure, global_step=step, close=False)``; W&B:
    ``logger.log_image(key=tag, images=[rgb_array], step=step)``; MLflow: ``experiment.log_figure(run_id,
    figure, artifact_file)`` with ``artifact_file = tag + ".png"``, inside the run's own artifacts; other
    loggers: nothing (see :func:`save_figure` for a file). The figure stays open. Failures give one
    ``RuntimeWarning`` per logger type. Runs on global rank 0 only.
    """
    for logger in loggers:
        try:
            kind = figure_kind(logger)
            if kind == "tensorboard":
                experiment_of(logger).add_figure(tag, figure, global_step=step, close=False)
            elif kind == "wandb":
                logger.log_image(key=tag, images=[_to_rgb(figure)], step=step)  # type: ignore[attr-defined]
            elif kind == "mlflow":
                run_id = logger.run_id  # type: ignore[attr-defined]
                experiment_of(logger).log_figure(run_id, figure, f"{tag}.png")
        except Exception as err:
            warn_once(logger, "figures", err)


@rank_zero_only
def save_figure(figure: Figure, path: str | os.PathLike[str]) -> str | None:
    """Save ``figure`` as a compact PNG (100 dpi, 256-colour palette when Pillow is present) at ``path``,
    creating its directory.

    Returns the path written, or ``None`` when writing failed (one ``RuntimeWarning`` per process, no
    exception) or on ranks other than 0.
    """
    target = os.fspath(path)
    try:
        directory = os.path.dirname(target)
        if directory:
            os.makedirs(directory, exist_ok=True)  # first: fail fast, before drawing
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, facecolor="white", metadata={"Software": None})
        data = _palette_png(buffer.getvalue())
        with open(target, "wb") as handle:
            handle.write(data)
    except Exception as err:  # OSError above all; a lost plot must not stop training
        warn_once("save_figure", "a figure file", err)
        return None
    return target


def _palette_png(png: bytes) -> bytes:
    """``png`` re-encoded with a 256-colour palette (about 3x smaller for line plots), or as is."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a matplotlib dependency
        return png
    with Image.open(io.BytesIO(png)) as image:
        palette = image.convert("RGB").quantize(colors=256)
    out = io.BytesIO()
    palette.save(out, format="png", optimize=True)
    return out.getvalue()

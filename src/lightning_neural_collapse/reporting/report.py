"""A report that compares finished runs: the paper's panels with the runs overlaid, as PNG or self-contained HTML.

``python -m lightning_neural_collapse report LOGDIR [LOGDIR ...] --out FILE`` (or ``lightning-neural-collapse
report``) reads each directory with :func:`~lightning_neural_collapse.reporting.runs.read_runs` and writes
:func:`write_report`.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from lightning_neural_collapse.reporting.figures import RunLines, plot_runs
from lightning_neural_collapse.reporting.runs import ReportError, Run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TABLE_KEYS: tuple[tuple[str, str], ...] = (
    ("nc1", "NC1"),
    ("nc1_cdnv", "NC1 CDNV"),
    ("nc2_equinorm_means", "NC2 equinorm (means)"),
    ("nc2_equinorm_weights", "NC2 equinorm (classifier)"),
    ("nc2_equiangular_means", "NC2 equiangularity (means)"),
    ("nc2_equiangular_weights", "NC2 equiangularity (classifier)"),
    ("nc2_maxangle_means", "NC2 max-angle (means)"),
    ("nc2_maxangle_weights", "NC2 max-angle (classifier)"),
    ("nc2_etf_distance_means", "NC2 ETF distance (means)"),
    ("nc3_self_duality", "NC3 self-duality"),
    ("nc3_cosine", "NC3 cosine"),
    ("nc4_ncc_mismatch", "NC4 NCC mismatch"),
    ("nc4_ncc_mismatch_prev_means", "NC4 NCC mismatch (previous means)"),
    ("train_error", "Training error"),
)
"""The table's rows: ``(record key, label)``; a key no run has is left out."""


def at_tpt_and_end(run: Run, key: str) -> tuple[float | None, float | None]:
    """``key``'s value at the TPT record of ``run`` (the first record at or after TPT that has it) and at its last
    record that has it; ``None`` where there is none (no TPT, or the key never logged).

    Example:
        >>> history = [{"epoch": 0, "nc1": 4.0}, {"epoch": 3, "nc1": 2.0}, {"epoch": 9, "nc1": 0.5}]
        >>> run = Run("r", ".", "nc", history, tpt=2)
        >>> at_tpt_and_end(run, "nc1")
        (2.0, 0.5)
    """
    x = run.x_key
    rows = [row for row in run.history if key in row and math.isfinite(row[key])]
    if not rows:
        return None, None
    end = rows[-1][key]
    if run.tpt is None:
        return None, end
    mark = _tpt_x(run)
    start = next((row[key] for row in rows if x in row and mark is not None and row[x] >= mark), None)
    return start, end


def _tpt_x(run: Run) -> float | None:
    """Where TPT sits on the run's x axis: its epoch, or for windows / logs without epochs its step."""
    if run.tpt is None:
        return None
    if run.x_key == "epoch" and not run.windows:
        return float(run.tpt)
    key = "tpt_step" if run.windows else "tpt_epoch"
    return next((row["step"] for row in run.history if key in row), None)


def report_figure(runs: Sequence[Run], title: str | None = None) -> Figure:
    """The panels of :func:`~lightning_neural_collapse.reporting.figures.plot_runs` with ``runs`` overlaid."""
    lines = [
        RunLines(run.history, run.val_history, _int_or_none(_tpt_x(run)), run.name, f"C{i % 10}", run.x_key)
        for i, run in enumerate(runs)
    ]
    return plot_runs(lines, title or f"Neural Collapse: {len(runs)} run{'s' if len(runs) != 1 else ''}")


def _int_or_none(value: float | None) -> int | None:
    return None if value is None else int(value)


def table_rows(runs: Sequence[Run]) -> list[list[str]]:
    """The summary table as text cells: a header, then for each run and key: run, TPT, key, at TPT, at end,
    end / TPT."""
    rows = [["run", "TPT epoch", "metric", "at TPT start", "at end", "end / TPT start"]]
    for run in runs:
        tpt = "none" if run.tpt is None else (f"step {run.tpt}" if run.windows else str(run.tpt))
        for key, label in TABLE_KEYS:
            start, end = at_tpt_and_end(run, key)
            if start is None and end is None:
                continue
            ratio = end / start if start not in (None, 0.0) and end is not None else None
            rows.append([run.name, tpt, label, _number(start), _number(end), _number(ratio)])
    return rows


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, facecolor="white", metadata={"Software": None})
    return buffer.getvalue()


def render_html(runs: Sequence[Run], figure: Figure) -> str:
    """A self-contained HTML page: the figure embedded as a base64 PNG, and the table of :func:`table_rows`."""
    image = base64.b64encode(_png(figure)).decode("ascii")
    header, *body = table_rows(runs)
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    cells = "\n".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in body)
    sources = "\n".join(
        f"<li><b>{html.escape(run.name)}</b>: {html.escape(run.source)} "
        f"(prefix <code>{html.escape(run.prefix)}</code>, {len(run.history)} records)</li>"
        for run in runs
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Neural Collapse report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin-top: 1em; }}
th, td {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #eee; }}
td:nth-child(-n+3) {{ text-align: left; }}
</style>
</head>
<body>
<h1>Neural Collapse report</h1>
<ul>
{sources}
</ul>
<img alt="Neural Collapse panels, runs overlaid" src="data:image/png;base64,{image}">
<h2>At the start of TPT and at the end</h2>
<table>
<thead><tr>{head}</tr></thead>
<tbody>
{cells}
</tbody>
</table>
</body>
</html>
"""


def write_report(runs: Sequence[Run], out: str, title: str | None = None) -> str:
    """Write the report of ``runs`` to ``out``: ``.png`` the figure, ``.html`` :func:`render_html`.

    Returns:
        ``out``.

    Raises:
        ReportError: for no runs, or another suffix.
    """
    suffix = os.path.splitext(out)[1].lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ReportError(f"--out {out}: the report is written as .png or .html, not {suffix or 'no suffix'!r}")
    if not runs:
        raise ReportError("no runs to report")
    figure = report_figure(runs, title)
    directory = os.path.dirname(out)
    if directory:
        os.makedirs(directory, exist_ok=True)
    if suffix == ".png":
        with open(out, "wb") as handle:
            handle.write(_png(figure))
    else:
        with open(out, "w", encoding="utf-8") as handle:
            handle.write(render_html(runs, figure))
    return out

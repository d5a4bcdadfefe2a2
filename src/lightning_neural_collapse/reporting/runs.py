"""Read finished runs back from their logs: TensorBoard event files or a CSVLogger ``metrics.csv``.

A *run* is one callback instance (one prefix) in one log directory: its training records (one dict per
measurement, keyed as in ``NeuralCollapseCallback.history``), its validation records and its TPT. Records are
rebuilt from the scalars ``<prefix>/<key>`` at each step; the x axis is ``<prefix>/epoch`` (logged with every
record), or the step for logs that lack it.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MARKER_KEYS = ("nc1", "nc1_cdnv", "nc2_equinorm_means", "nc3_self_duality", "train_error", "tpt_epoch", "tpt_step")
"""A prefix is a run of ours when one of its scalars is ``<prefix>/<one of these>``."""
_EVENTS = re.compile(r"events\.out\.tfevents\.")


class ReportError(ValueError):
    """A log directory that holds no Neural Collapse scalars, or cannot be read."""


@dataclass
class Run:
    """One callback instance's numbers in one log directory.

    Attributes:
        name: how the report labels it (the directory, and the prefix when it is not ``nc``).
        source: the directory of its event files or ``metrics.csv``.
        prefix: the first part of its tags.
        history: one dict per training record: ``step``, ``epoch`` when logged, and the keys without the prefix.
        val_history: the same for ``<prefix>_val/...`` (keys as logged there, ``<loader>/<key>`` with several).
        tpt: the epoch (or, for windows, the step) where TPT began, or ``None``.
    """

    name: str
    source: str
    prefix: str
    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    tpt: int | None = None

    @property
    def x_key(self) -> str:
        """``"epoch"`` when every record has its epoch, otherwise ``"step"``."""
        return "epoch" if self.history and all("epoch" in row for row in self.history) else "step"

    @property
    def windows(self) -> bool:
        """Whether the run measured windows of steps (its TPT is then a step)."""
        return any("tpt_step" in row for row in self.history)


def find_logs(directory: str) -> tuple[list[str], list[str]]:
    """The directories under ``directory`` (itself included) holding TensorBoard event files, and the paths of
    the ``metrics.csv`` files under it, both sorted."""
    if not os.path.isdir(directory):
        raise ReportError(f"{directory}: not a directory")
    events, tables = [], []
    for root, _, files in os.walk(directory):
        if any(_EVENTS.match(name) for name in files):
            events.append(root)
        if "metrics.csv" in files:
            tables.append(os.path.join(root, "metrics.csv"))
    return sorted(events), sorted(tables)


def read_event_scalars(directory: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in ``directory`` (not its subdirectories) as ``[(step, value), ...]``,
    read with TensorBoard's own loader, every point kept."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    accumulator = EventAccumulator(directory, size_guidance={SCALARS: 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()[SCALARS]}


def read_csv_scalars(path: str) -> dict[str, list[tuple[int, float]]]:
    """Every numeric column of a CSVLogger ``metrics.csv`` as ``[(step, value), ...]`` (empty cells left out)."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step = int(float(row.get("step") or ""))
            except ValueError:
                continue
            for tag, cell in row.items():
                if tag in ("step", None) or cell in ("", None):
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue
                series.setdefault(tag, []).append((step, value))
    return series


def prefixes(tags: Iterable[str]) -> list[str]:
    """The prefixes ``p`` with a tag ``p/<marker>`` (:data:`MARKER_KEYS`), validation prefixes (``*_val``) left out.

    Example:
        >>> prefixes(["nc/nc1", "nc/layer3/nc1", "nc_val/nc1", "epoch", "nc/hist/x"])
        ['nc', 'nc/layer3']
    """
    found = set()
    for tag in tags:
        head, _, key = tag.rpartition("/")
        if head and key in MARKER_KEYS and not head.endswith("_val") and "/layers/" not in f"/{head}/":
            if not head.endswith("/tpt_onset"):
                found.add(head)
    return sorted(found)


def _records(
    series: Mapping[str, list[tuple[int, float]]], prefix: str, nested: bool = False
) -> list[dict[str, float]]:
    """Records from the tags ``<prefix>/<key>`` by step; ``nested``: keys may hold a ``/`` (validation loaders),
    else only flat keys (not the histograms, the onset repeats, the layers or another instance's ``prefix/x``)."""
    head = f"{prefix}/"
    steps: dict[int, dict[str, float]] = {}
    for tag, points in series.items():
        key = tag[len(head) :]
        if not tag.startswith(head) or key.startswith(("hist/", "tpt_onset/", "layers/")):
            continue
        if "/" in key and not nested:
            continue
        for step, value in points:
            if math.isfinite(value):
                steps.setdefault(step, {"step": float(step)})[key] = value
    return [steps[s] for s in sorted(steps)]


def runs_from_series(series: Mapping[str, list[tuple[int, float]]], source: str, name: str) -> list[Run]:
    """The runs (one per prefix) in one directory's scalars, named ``name`` (and ``[prefix]`` when not ``nc``)."""
    runs = []
    for prefix in prefixes(series):
        history = _records(series, prefix)
        tpt = next((int(row[key]) for row in history for key in ("tpt_epoch", "tpt_step") if key in row), None)
        label = name if prefix == "nc" else f"{name} [{prefix}]"
        runs.append(Run(label, source, prefix, history, _records(series, f"{prefix}_val", nested=True), tpt))
    return runs


def read_runs(directory: str) -> list[Run]:
    """Every run under ``directory``: each directory of event files and each ``metrics.csv`` (one run per prefix; a
    folder with both gives its event files' runs).
    A run is named after ``directory`` (with the path below it when ``directory`` holds several).

    Raises:
        ReportError: when ``directory`` does not exist or holds no Neural Collapse scalars.
    """
    events, tables = find_logs(directory)
    found = [(folder, read_event_scalars(folder)) for folder in events]
    found = [(folder, series) for folder, series in found if prefixes(series)]
    with_events = {folder for folder, _ in found}
    for table in tables:  # a folder with both (two loggers of one run): its event files
        folder = os.path.dirname(table)
        if folder not in with_events and prefixes(series := read_csv_scalars(table)):
            found.append((folder, series))
    if not found:
        looked = f"{len(events)} TensorBoard event directories and {len(tables)} metrics.csv files"
        raise ReportError(
            f"{directory}: no Neural Collapse scalars (a tag like 'nc/nc1' or 'nc/train_error') in {looked}; "
            "point the report at the logger's directory of a run made with NeuralCollapseCallback"
        )
    base = os.path.basename(os.path.normpath(os.path.abspath(directory)))
    runs = []
    for folder, series in sorted(found, key=lambda item: item[0]):
        name = base if len(found) == 1 else f"{base}/{os.path.relpath(folder, directory)}"
        runs += runs_from_series(series, folder, name)
    return runs

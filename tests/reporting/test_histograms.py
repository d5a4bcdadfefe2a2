"""``reporting.histograms``: fixed bins written to TensorBoard (read back with its own loader), CSV quantiles."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_neural_collapse.functional.etf_deviation import BIN_WIDTH, NORM_EDGES, Binned, cosine_edges
from lightning_neural_collapse.reporting.histograms import log_histograms, occupied


def _binned(values: list[float], edges: torch.Tensor) -> Binned:
    binned = Binned.count(torch.tensor(values, dtype=torch.float64), edges)
    assert binned is not None
    return binned


def _read(logger: TensorBoardLogger) -> EventAccumulator:
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_gets_the_fixed_bins_from_minimum_to_maximum(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path)
    cosines = [-0.34, -0.33, -0.33, -0.30, 1.0]
    values = {
        "cosines_means": _binned(cosines, cosine_edges(4)),
        "norms_means": _binned([0.9, 1.0, 1.1], NORM_EDGES),
        "norms_weights": _binned([1.0] * 4, NORM_EDGES),  # a perfect ETF: one bin
    }
    log_histograms([tb], values, step=5)
    acc = _read(tb)
    assert set(acc.Tags()["histograms"]) == {"nc/hist/cosines_means", "nc/hist/norms_means", "nc/hist/norms_weights"}
    (event,) = acc.Histograms("nc/hist/cosines_means")
    proto = event.histogram_value
    assert event.step == 5 and proto.num == 5 and (proto.min, proto.max) == (-0.34, 1.0)
    limits = np.array(proto.bucket_limit)
    assert np.all(np.diff(limits) > 0) and np.allclose(np.diff(limits), BIN_WIDTH)
    assert limits[0] > proto.min >= limits[0] - BIN_WIDTH and limits[-1] >= proto.max  # trimmed to the data
    assert sum(proto.bucket) == 5
    edges = cosine_edges(4).numpy()
    assert np.all(np.isclose(limits[:, None], edges[None, :], atol=1e-12).any(axis=1))  # the run's fixed edges
    (ideal,) = acc.Histograms("nc/hist/norms_weights")
    single = ideal.histogram_value
    assert list(single.bucket) == [4] and single.min < 1.0 < single.max == pytest.approx(single.bucket_limit[0])
    assert not any(tag.endswith("_gap") for tag in acc.Tags()["scalars"])  # no duplicate of nc2_maxangle_*


def test_bins_stay_the_same_from_step_to_step(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path)
    for step, spread in enumerate((0.5, 0.05, 0.005)):
        values = list(np.linspace(1 - spread, 1 + spread, 9))
        log_histograms([tb], {"norms_means": _binned(values, NORM_EDGES)}, step=step)
    events = _read(tb).Histograms("nc/hist/norms_means")
    grids = [np.array(e.histogram_value.bucket_limit) for e in events]
    offsets = [(g[0] - float(NORM_EDGES[0])) / BIN_WIDTH for g in grids]
    assert all(abs(o - round(o)) < 1e-6 for o in offsets)  # every step on the one grid
    assert len(grids[0]) > len(grids[1]) > len(grids[2])


def test_csv_gets_quantiles_to_the_resolution_of_a_bin(tmp_path: Path) -> None:
    csv_logger = CSVLogger(tmp_path)
    values = np.linspace(0.5, 1.5, 101)
    log_histograms([csv_logger], {"norms_means": _binned(list(values), NORM_EDGES)}, step=2, prefix="nc_val")
    csv_logger.save()
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    got = {key: float(value) for key, value in row.items() if key.startswith("nc_val/")}
    levels = np.quantile(values, [0, 0.25, 0.5, 0.75, 1])
    expected = dict(zip(("min", "q25", "median", "q75", "max"), levels, strict=True))
    assert set(got) == {f"nc_val/norms_means_{k}" for k in expected}
    for key, value in expected.items():
        assert got[f"nc_val/norms_means_{key}"] == pytest.approx(value, abs=BIN_WIDTH)


def test_occupied_merges_to_a_bin_budget() -> None:
    binned = _binned(list(np.linspace(-0.9, 0.9, 1000)), cosine_edges(10))
    counts, edges = occupied(binned)
    assert counts.sum() == 1000 and len(edges) == len(counts) + 1 and len(counts) > 512
    merged, merged_edges = occupied(binned, max_bins=512)
    assert merged.sum() == 1000 and len(merged) <= 512 and len(merged_edges) == len(merged) + 1
    assert merged_edges[0] == edges[0] and merged_edges[-1] >= edges[-1] - 1e-12


def test_nothing_to_log_is_silent(tmp_path: Path) -> None:
    tb = TensorBoardLogger(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_histograms([tb], {}, step=0)
    assert _read(tb).Tags()["histograms"] == []

"""The metrics synced over two real gloo ranks equal one process on all the data (no Lightning)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "metric_sync.py"


def assert_close(actual: float, expected: float, rtol: float = 1e-9, floor: float = 1e-12) -> None:
    assert abs(actual - expected) <= rtol * max(abs(expected), floor), (actual, expected)


def assert_nested_close(actual: Any, expected: Any) -> None:
    if isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_nested_close(a, e)
    else:
        assert_close(actual, expected, floor=1e-9)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    outdir = tmp_path_factory.mktemp("metric_sync")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(outdir)], timeout=180, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((outdir / "result.json").read_text())


@pytest.mark.ddp
def test_shards_are_uneven_and_one_misses_a_class(result: dict[str, Any]) -> None:
    shards = result["shards"]
    assert shards["sizes"][0] != shards["sizes"][1]
    assert 4 in shards["classes"][0] and 4 not in shards["classes"][1]
    # each rank kept only its own samples after the synced computes (states unsynced again)
    assert [r["local_count"] for r in result["ranks"]] == shards["valid"]


@pytest.mark.ddp
def test_both_ranks_get_identical_numbers(result: dict[str, Any]) -> None:
    rank0, rank1 = result["ranks"]
    for key in ("metrics", "again", "counts", "means", "within_cov", "skipped"):
        assert rank0[key] == rank1[key], key
    for key in ("nc4_ncc_mismatch", "error", "error_counts"):
        assert rank0[key] == rank1[key], key
    assert rank0["metrics"] == rank0["again"]


@pytest.mark.ddp
def test_synced_equals_single_process(result: dict[str, Any]) -> None:
    single = result["single"]
    for synced in result["ranks"]:
        assert set(synced["metrics"]) == set(single["metrics"])
        assert len(synced["metrics"]) == 14  # every key but NC4 (NCCMismatch's job)
        for key, value in single["metrics"].items():
            assert math.isfinite(value)
            assert_close(synced["metrics"][key], value)
        assert synced["counts"] == single["counts"]
        assert synced["counts"][4] > 0
        assert synced["skipped"] == single["skipped"] == {"nonfinite": 2, "bad_label": 2}
        assert_nested_close(synced["means"], single["means"])
        assert_nested_close(synced["within_cov"], single["within_cov"])
        assert synced["error_counts"] == single["error_counts"]
        assert synced["error"] == single["error"]
        assert_close(synced["nc4_ncc_mismatch"], single["nc4_ncc_mismatch"])
    assert single["error_counts"][1] == sum(result["shards"]["sizes"]) - 4  # bad labels and NaN logits

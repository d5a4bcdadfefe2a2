"""Sharded training on the CPU (2 gloo processes): Lightning's ``ModelParallelStrategy`` with ``fully_shard`` on the
blocks and the classifier gives the same numbers as one process, online and exact (NC2 of the weights, NC3 and the
layers included); raw FSDP1's weight is gathered with ``summon_full_params``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
COUNTS = ("nc4_ncc_mismatch", "nc4_ncc_mismatch_prev_means", "train_error", "train_error_eval")
INHERITED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(SCRIPTS / script), *args]
    proc = subprocess.run(cmd, timeout=240, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("fsdp2")
    run("sharded_fit.py", str(out), "--samples", "241", "--layers")
    return json.loads((out / "result.json").read_text())  # type: ignore[no-any-return]


def assert_matches(record: dict[str, float], reference: dict[str, float], renamed: dict[str, str]) -> None:
    for key, value in reference.items():
        got = record[renamed.get(key, key)]
        assert got == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_the_scripts_own_check_agrees(sharded: dict[str, Any]) -> None:
    """The check benchmarks/gpu_sharded_check.sh relies on finds nothing wrong here, and catches a wrong key."""
    sys.path.insert(0, str(SCRIPTS))
    from sharded_fit import check

    assert check(sharded) == []
    broken = json.loads(json.dumps(sharded))
    broken["reference"]["nc1"] *= 1.01
    assert check(broken) == [f"nc/nc1: {sharded['histories'][0]['nc'][-1]['nc1']} != {broken['reference']['nc1']}"]


def test_fsdp2_exact_mode_equals_one_process(sharded: dict[str, Any]) -> None:
    """241 samples: the ranks' eval shards differ by one batch, and the sharded forwards still match (padding)."""
    rank0, rank1 = sharded["histories"]
    assert rank0 == rank1
    last = rank0["nc"][-1]
    reference = sharded["reference"]
    assert {"nc2_equiangular_weights", "nc3_self_duality", "nc3_cosine", "layers/body.1/nc1"} <= set(reference)
    assert_matches(last, reference, {})
    assert sharded["exact_samples"] == 241.0  # every sample once
    assert sharded["weight_shape"] == [4, 16]


def test_fsdp2_online_mode_equals_what_the_ranks_fed(sharded: dict[str, Any]) -> None:
    last = sharded["histories"][0]["nco"][-1]
    reference = dict(sharded["online_reference"])
    assert sharded["online_samples"] == 242  # the distributed sampler's duplicate, counted twice
    assert_matches(last, reference, {"nc4_ncc_mismatch": "nc4_ncc_mismatch_prev_means"})  # lr=0: same means


def test_fsdp1_weight_is_gathered_on_every_rank(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run("fsdp1_weight.py", str(tmp_path), port)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    numels = [r["local_numel"] for r in ranks]  # each rank's view of its flat shard holds part of the weight
    assert sum(numels) == 3 * 8 and max(numels) < 3 * 8
    for r in ranks:
        assert r["sharded"] and r["has_weight"] and r["weight_equal"] and r["bias_equal"], r
        assert r["after_numel"] == r["local_numel"]  # resharded afterwards: nothing written back

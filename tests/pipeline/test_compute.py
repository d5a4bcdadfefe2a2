"""``pipeline.compute``: the agreement and the epoch-finish step, on one process and on a pool of 2 gloo ranks.

The pool runs ``tests/scripts/finish_pool.py`` in a subprocess (no Trainer): a failure on one rank at any stage
must leave no rank in a collective (the process group times out after 30 s, which would fail the run), every rank
must reach the same verdict, and the reduced numbers must equal one process on the whole data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_neural_collapse.functional.collapse import geometry
from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.compute import Agreement, ExactRun, LocalEpoch, RankGroup, agree, finish_epoch
from lightning_neural_collapse.pipeline.samples import samples_of

SCRIPT = Path(__file__).parents[1] / "scripts" / "finish_pool.py"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("pool")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=180, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="gloo pools run on Linux/macOS")


def test_every_rank_reaches_the_same_verdict(pool: list[dict[str, Any]]) -> None:
    rank0, rank1 = pool
    assert rank0["world_size"] == rank1["world_size"] == 2
    names = ("online", "steps_failure", "not_due", "exact", "exact_failure", "ncc_failure")
    for name in (*names, "val", "val_failure", "val_empty"):
        same = {key: rank0[name][key] for key in ("status", "stage", "failed_ranks", "counts", "values", "means")}
        assert same == {key: rank1[name][key] for key in same}, name


def test_online_statistics_are_summed_before_anything_is_computed(pool: list[dict[str, Any]]) -> None:
    rank0 = pool[0]
    online = rank0["online"]
    assert online["status"] == "measured" and online["counts_per_class"] == rank0["reference_counts"]
    assert torch.allclose(torch.tensor(online["means"]), torch.tensor(rank0["reference_means"]), atol=1e-12)
    # decide saw the counts summed over ranks (errors of both shards, all 90 samples)
    assert online["decided"] == [online["counts"]] and online["counts"]["total"] == 90
    assert online["counts"]["errors"] == rank0["reference_errors"]
    assert online["counts_per_class"][3] > 0  # rank 1 had no class 3: it comes from rank 0


def test_a_failure_on_one_rank_skips_the_epoch_on_every_rank(pool: list[dict[str, Any]]) -> None:
    rank0, rank1 = pool
    for name, stage, failing in (
        ("steps_failure", "training steps", 1),
        ("exact_failure", "exact pass", 1),
        ("ncc_failure", "exact NC4 pass", 0),
    ):
        assert rank0[name]["status"] == rank1[name]["status"] == "skipped", name
        assert rank0[name]["stage"] == stage and rank0[name]["failed_ranks"] == 1, name
        assert pool[failing][name]["failure"] is not None and pool[1 - failing][name]["failure"] is None, name
    assert rank1["steps_failure"]["failure"] == "KeyError: 'labels'"
    assert rank0["steps_failure"]["decided"] == []  # no decision is taken on a failed epoch


def test_not_due_only_counts(pool: list[dict[str, Any]]) -> None:
    for rank in pool:
        assert rank["not_due"]["status"] == "counted" and rank["not_due"]["values"] == {}


def test_exact_mode_aligns_buffers_and_sums_uneven_shards(pool: list[dict[str, Any]]) -> None:
    rank0, rank1 = pool
    exact = rank0["exact"]
    assert exact["status"] == "measured"
    assert exact["counts_per_class"] == rank0["reference_counts"]  # rank 1's shard is empty
    assert exact["exact_counts"]["ncc_total"] == 90
    assert exact["exact_counts"]["ncc_mismatches"] == rank0["reference_ncc_mismatches"]
    # inside the passes both ranks saw rank 0's buffer; afterwards each has its own again
    assert set(rank0["buffers_seen_in_pass"]) == set(rank1["buffers_seen_in_pass"]) == {1.0}
    assert (rank0["buffer_after"], rank1["buffer_after"]) == (1.0, 2.0)


def test_held_out_loaders_are_reduced_and_fail_together(pool: list[dict[str, Any]]) -> None:
    rank0, rank1 = pool
    val = rank0["val"]
    assert val["status"] == "measured" and val["stage"] == "" and val["counts"]["total"] == 90
    assert val["counts_per_class"] == rank0["reference_counts"]  # class 3 only on rank 0
    assert torch.allclose(torch.tensor(val["means"]), torch.tensor(rank0["reference_means"]), atol=1e-12)
    assert "nc1" in val["values"] and "nc3" not in val["values"]  # no weight: test collapse only
    for rank, own in ((rank0, "IndexError: x"), (rank1, None)):
        failed = rank["val_failure"]
        assert failed["status"] == "skipped" and failed["stage"] == "validation" and failed["failed_ranks"] == 1
        assert failed["failure"] == own
        assert rank["val_empty"]["status"] == "counted" and rank["val_empty"]["counts"]["total"] == 0


# ------------------------------------------------------------------------------------------- one process


def _accumulator() -> Accumulator:
    acc = Accumulator(3, 2, torch.device("cpu"), statistics=True)
    acc.add(samples_of(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]), torch.eye(3)), torch.tensor([0, 1, 1]))
    return acc


def test_agree_without_a_process_group_is_local() -> None:
    group = RankGroup()
    assert group.world_size == 1 and group.rank == 0
    agreed = agree(group, None, {"errors": torch.tensor(2), "total": 5}, torch.device("cpu"))
    assert agreed == Agreement(0, {"errors": 2, "total": 5}) and not agreed.failed
    assert agree(group, "boom", {}, torch.device("cpu")).failed


def test_finish_epoch_on_one_process() -> None:
    acc = _accumulator()
    local = LocalEpoch(acc.local_counts(), None, acc.statistics, torch.device("cpu"))
    outcome = finish_epoch(
        RankGroup(), local, decide=lambda agreed: True, exact=None, weights=lambda: None, measure=geometry
    )
    assert outcome.status == "measured" and outcome.counts["errors"] == 1 and outcome.counts["total"] == 3
    assert outcome.statistics is not None and outcome.statistics.counts.tolist() == [1.0, 2.0, 0.0]
    assert "nc1" in outcome.values


def test_an_exception_in_local_work_becomes_the_failure() -> None:
    acc = _accumulator()
    local = LocalEpoch(acc.local_counts(), None, None, torch.device("cpu"))

    def broken() -> Any:
        raise KeyError("input")

    exact = ExactRun(broken, lambda means, present: (0, 0), nn.Identity())
    outcome = finish_epoch(
        RankGroup(), local, decide=lambda agreed: True, exact=exact, weights=lambda: None, measure=geometry
    )
    assert outcome.status == "skipped" and outcome.stage == "exact pass" and outcome.failure == "KeyError: 'input'"
    assert outcome.counts["total"] == 3  # the training steps' counts stay known

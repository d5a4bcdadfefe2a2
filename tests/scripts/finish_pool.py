"""The epoch-finish step (``pipeline.compute.finish_epoch``) on a pool of 2 gloo processes, without a Trainer.

Run in its own process (``tests/pipeline/test_compute.py`` does)::

    python tests/scripts/finish_pool.py OUTDIR

Each rank runs every scenario below in the same order and writes ``OUTDIR/rank{R}.json`` with what it saw.
The process group has a short timeout: a rank left alone in a collective fails the run instead of hanging.
Scenarios (rank 1's shard misses class 3 in all of them):

- ``online``: both ranks bring online statistics; ``decide`` sees the summed counts;
- ``steps_failure``: rank 1 could not measure a batch: every rank skips;
- ``not_due``: ``decide`` says no: every rank only counts;
- ``exact``: exact mode, rank 1 with an empty shard, rank 1's buffer differs from rank 0's;
- ``exact_failure``: rank 1's first pass raises;
- ``ncc_failure``: rank 0's NC4 pass raises.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from lightning_neural_collapse.functional import class_statistics, ncc_mismatch
from lightning_neural_collapse.functional.collapse import geometry
from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.compute import (
    Agreement,
    EpochOutcome,
    ExactRun,
    LocalEpoch,
    RankGroup,
    finish_epoch,
    finish_held_out,
)
from lightning_neural_collapse.pipeline.samples import samples_of

CLASSES, DIM, SAMPLES = 4, 6, 90


def data() -> tuple[Tensor, Tensor, Tensor]:
    """Features, labels and logits of the whole set; class 3 only at even indices."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(SAMPLES) % CLASSES
    labels[1::2] = torch.where(labels[1::2] == 3, 1, labels[1::2])
    labels[0::8] = 3
    centres = 5 * torch.randn(CLASSES, DIM, generator=g)
    features = centres[labels] + torch.randn(SAMPLES, DIM, generator=g)
    weight = torch.randn(CLASSES, DIM, generator=g)
    return features, labels, features @ weight.T


def shard(rank: int) -> slice:
    return slice(rank, None, 2)  # rank 1 gets the odd indices: no class 3


def accumulator(features: Tensor, logits: Tensor, labels: Tensor) -> Accumulator:
    acc = Accumulator(CLASSES, DIM, torch.device("cpu"), statistics=True)
    for start in range(0, len(labels), 16):
        acc.add(samples_of(features[start : start + 16], logits[start : start + 16]), labels[start : start + 16])
    return acc


def summary(outcome: EpochOutcome, decided: list[dict[str, int]]) -> dict[str, Any]:
    stats = outcome.statistics
    return {
        "status": outcome.status,
        "stage": outcome.stage,
        "failure": outcome.failure,
        "failed_ranks": outcome.failed_ranks,
        "counts": outcome.counts,
        "exact_counts": outcome.exact_counts,
        "decided": decided,
        "values": outcome.values,
        "counts_per_class": stats.counts.tolist() if stats is not None else None,
        "means": stats.means.tolist() if stats is not None else None,
    }


def run(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
    group = RankGroup()
    features, labels, logits = data()
    mine = shard(rank)
    device = torch.device("cpu")
    results: dict[str, Any] = {"rank": rank, "world_size": group.world_size}

    def scenario(name: str, local: LocalEpoch, *, due: bool = True, exact: ExactRun | None = None) -> None:
        decided: list[dict[str, int]] = []

        def decide(agreed: Agreement) -> bool:
            decided.append(agreed.counts)
            return due

        outcome = finish_epoch(group, local, decide=decide, exact=exact, weights=lambda: None, measure=geometry)
        results[name] = summary(outcome, decided)

    online = accumulator(features[mine], logits[mine], labels[mine])
    scenario("online", LocalEpoch(online.local_counts(), None, online.statistics, device))
    failing = accumulator(features[mine], logits[mine], labels[mine])
    failure = "KeyError: 'labels'" if rank == 1 else None
    scenario("steps_failure", LocalEpoch(failing.local_counts(), failure, failing.statistics, device))
    scenario("not_due", LocalEpoch(online.local_counts(), None, online.statistics, device), due=False)

    # exact mode: rank 0 holds the whole data set, rank 1 an empty shard; the model's buffer differs per rank
    model = nn.BatchNorm1d(DIM)
    model.running_mean.fill_(float(rank + 1))
    seen_buffers: list[float] = []
    exact_rows = slice(None) if rank == 0 else slice(0, 0)

    def statistics(fail: bool = False) -> Any:
        seen_buffers.append(float(model.running_mean[0]))
        if fail:
            raise RuntimeError("the forward failed")
        acc = accumulator(features[exact_rows], logits[exact_rows], labels[exact_rows])
        return acc.statistics, acc.local_counts()

    def ncc(means: Tensor, present: Tensor, fail: bool = False) -> tuple[int, int]:
        if fail:
            raise ValueError("NC4 pass failed")
        x, z = features[exact_rows], logits[exact_rows]
        if len(x) == 0:
            return 0, 0
        mismatch = ncc_mismatch(x, means, z, present)
        return round(mismatch * len(x)), len(x)

    empty = LocalEpoch(accumulator(features[:0], logits[:0], labels[:0]).local_counts(), None, None, device)
    scenario("exact", empty, exact=ExactRun(statistics, ncc, model))
    results["buffers_seen_in_pass"] = seen_buffers[:]
    results["buffer_after"] = float(model.running_mean[0])
    scenario("exact_failure", empty, exact=ExactRun(lambda: statistics(fail=rank == 1), ncc, model))
    scenario("ncc_failure", empty, exact=ExactRun(statistics, lambda m, p: ncc(m, p, fail=rank == 0), model))

    # held-out runs: the loader's sums of each rank, reduced; a failure on one rank skips it on both
    def held_out(name: str, local: LocalEpoch) -> None:
        results[name] = summary(finish_held_out(group, local, measure=lambda s: geometry(s, None)), [])

    held_out("val", LocalEpoch(online.local_counts(), None, online.statistics, device))
    held_out("val_failure", LocalEpoch(online.local_counts(), "IndexError: x" if rank == 0 else None, None, device))
    nothing = accumulator(features[:0], logits[:0], labels[:0])
    held_out("val_empty", LocalEpoch(nothing.local_counts(), None, nothing.statistics, device))

    # the single-process reference on the whole set
    if rank == 0:
        whole = class_statistics(features.double(), labels, CLASSES)
        results["reference_counts"] = whole.counts.tolist()
        results["reference_means"] = whole.means.tolist()
        results["reference_errors"] = int((logits.argmax(dim=1) != labels).sum())
        results["reference_ncc_mismatches"] = round(
            ncc_mismatch(features, whole.means, logits, whole.present) * SAMPLES
        )
    dist.barrier()
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    out = sys.argv[1]
    Path(out).mkdir(parents=True, exist_ok=True)
    mp.spawn(run, args=(free_port(), out), nprocs=2, join=True)

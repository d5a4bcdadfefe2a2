"""Two gloo ranks (no Lightning) feed the metrics different shards; rank 0 writes what they computed.

Usage: ``python metric_sync.py OUTDIR``. Writes ``OUTDIR/result.json`` with

- ``ranks``: for each rank, what ``NeuralCollapse``, ``NCCMismatch`` and ``ClassificationError`` returned
  after syncing (``compute`` and ``statistics`` are collectives), plus the rank's local sample count after;
- ``single``: the same measured in one process on all the data (after the process group is gone);
- ``shards``: the shard sizes and the classes each shard holds.

The shards have uneven sizes and rank 1 holds no sample of class ``MISSING_ON_RANK1``; both shards contain
one sample with a non-finite feature and one with an out-of-range label.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
NUM_CLASSES = 6
DIM = 8
MISSING_ON_RANK1 = 4
CHUNK = 16


def make_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 features, labels, weight and bias (identical in every process: fixed seed)."""
    rng = np.random.default_rng(123)
    counts = [40, 25, 60, 33, 18, 51]
    means = 2.0 * rng.standard_normal((NUM_CLASSES, DIM))
    labels = np.repeat(np.arange(NUM_CLASSES), counts)
    features = means[labels] + rng.standard_normal((len(labels), DIM))
    order = rng.permutation(len(labels))
    features, labels = features[order], labels[order]
    # one non-finite feature and one out-of-range label in each shard (see shard_indices)
    ordinary = np.flatnonzero(labels != MISSING_ON_RANK1)
    features[ordinary[5], 2] = np.nan
    features[ordinary[-5], 0] = np.inf
    labels[ordinary[7]] = NUM_CLASSES
    labels[ordinary[-7]] = -3
    weight = means - means.mean(axis=0) + 0.7 * rng.standard_normal((NUM_CLASSES, DIM))
    bias = 0.3 * rng.standard_normal(NUM_CLASSES)
    return (
        torch.tensor(features, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor(weight, dtype=torch.float32),
        torch.tensor(bias, dtype=torch.float32),
    )


def shard_indices(labels: torch.Tensor) -> list[torch.Tensor]:
    """Rank 0: the first ~70% of the samples and every sample of ``MISSING_ON_RANK1``; rank 1: the rest."""
    first = torch.arange(len(labels)) < int(0.7 * len(labels))
    first |= labels == MISSING_ON_RANK1
    return [torch.nonzero(first).flatten(), torch.nonzero(~first).flatten()]


def measure(features: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
    """Every metric on these samples; synced over the process group when there is one."""
    # imported here, not at the top: the parent process only spawns, and the import (Lightning) is slow
    from lightning_neural_collapse import ClassificationError, NCCMismatch, NeuralCollapse

    nc = NeuralCollapse(NUM_CLASSES, DIM)
    err = ClassificationError(NUM_CLASSES)
    for start in range(0, len(labels), CHUNK):
        nc.update(features[start : start + CHUNK], labels[start : start + CHUNK])
        err.update(features[start : start + CHUNK] @ weight.T + bias, labels[start : start + CHUNK])
    values = nc.compute(weight=weight)
    again = nc.compute(weight=weight)  # a second collective: the local states must have been restored
    stats = nc.statistics()
    skipped = nc.skipped()
    ncc = NCCMismatch(stats.means, stats.present)
    for start in range(0, len(labels), CHUNK):
        h = features[start : start + CHUNK]
        ncc.update(h, h @ weight.T + bias)
    nc4 = ncc.compute()
    return {
        "metrics": values,
        "again": again,
        "counts": [int(c) for c in stats.counts.tolist()],
        "means": stats.means.tolist(),
        "within_cov": stats.within_cov.tolist(),
        "skipped": skipped,
        "nc4_ncc_mismatch": nc4,
        "error": err.compute(),
        "error_counts": list(err.counts()),
        "local_count": int(nc.count.sum().item()),
        "local_ncc_total": int(ncc.total.item()),
    }


def worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    features, labels, weight, bias = make_data()
    shards = shard_indices(labels)
    mine = shards[rank]
    result = measure(features[mine], labels[mine], weight, bias)
    gathered: list[Any] = [None] * WORLD_SIZE
    dist.all_gather_object(gathered, result)
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        report = {
            "ranks": gathered,
            "single": measure(features, labels, weight, bias),  # no process group any more: local only
            "shards": {
                "sizes": [len(s) for s in shards],
                "classes": [sorted(set(labels[s].tolist())) for s in shards],
                "valid": [
                    int(((labels[s] >= 0) & (labels[s] < NUM_CLASSES) & features[s].isfinite().all(1)).sum())
                    for s in shards
                ],
            },
        }
        Path(outdir, "result.json").write_text(json.dumps(report, indent=1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main(outdir: str) -> None:
    Path(outdir).mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(free_port(), outdir), nprocs=WORLD_SIZE, join=True)


if __name__ == "__main__":
    main(sys.argv[1])

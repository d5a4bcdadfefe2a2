"""Raw FSDP1 (``FullyShardedDataParallel`` with a CPU ``device_id``) on 2 gloo processes: the binding's weight and
bias are the full parameters on every rank (``summon_full_params``), and the first step's check reads metadata only.

Run by tests/callback/test_sharded.py. Usage: python fsdp1_weight.py OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.sharding import is_sharded


def worker(rank: int, outdir: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    full = nn.Linear(8, 3)
    expected_w, expected_b = full.weight.detach().clone(), full.bias.detach().clone()
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
    model.add_module("head", FullyShardedDataParallel(full, device_id=torch.device("cpu"), use_orig_params=True))
    binding = Binding(model, "head")
    local_numel = int(binding.module.weight.numel())  # the rank's view of the flat shard
    weight, bias = binding.parameters(3, 8)  # a collective: both ranks
    result = {
        "rank": rank,
        "local_numel": local_numel,
        "sharded": is_sharded(binding.module, model),
        "has_weight": binding.has_weight(3, 8),
        "weight_equal": weight is not None and torch.equal(weight, expected_w),
        "bias_equal": bias is not None and torch.equal(bias, expected_b),
        "after_numel": int(binding.module.weight.numel()),  # resharded again afterwards
    }
    Path(outdir, f"rank{rank}.json").write_text(json.dumps(result))
    binding.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "29531"), nprocs=2, join=True)

"""Distributed reduction of sum states with one in-place ``all_reduce`` per state.

torchmetrics' default sync all-gathers every state (``world_size`` copies in memory at once); for a
``D x D`` second moment that is the largest allocation of a run. Summing in place keeps memory per
rank at one copy, whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

T = TypeVar("T")


def all_reduce_sum(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """Sum ``tensor`` over the ranks of ``group``; returns a one-element list, as torchmetrics expects.

    torchmetrics stacks the list and applies the state's ``dist_reduce_fx="sum"``, which leaves the
    single reduced tensor unchanged.
    """
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return [reduced]


def synced(metric: Metric, read: Callable[[], T]) -> T:
    """``read()`` evaluated on ``metric``'s states summed over ranks (a collective on every rank; a no-op
    without a process group). The rank's own states are restored afterwards, so accumulation can go on."""
    with metric.sync_context(dist_sync_fn=metric.dist_sync_fn, should_sync=metric._to_sync, should_unsync=True):
        return read()

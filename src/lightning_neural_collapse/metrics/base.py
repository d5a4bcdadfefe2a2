"""The base of every metric here: fixed-shape sum states, summed over ranks with one in-place ``all_reduce``.

torchmetrics' default sync all-gathers every state (``world_size`` copies in memory at once); for a
``D x D`` second moment that is the largest allocation of a run. Summing in place keeps memory per rank at
one copy, whatever the number of ranks. Reads of the summed states go through :meth:`SumStateMetric.synced`,
which restores the rank's own states afterwards, so accumulation can go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

T = TypeVar("T")


def all_reduce_sum(tensor: Tensor, group: Any | None = None) -> list[Tensor]:
    """Sum ``tensor`` over the ranks of ``group``; returns a one-element list, as torchmetrics expects.

    torchmetrics stacks the list and applies the state's ``dist_reduce_fx="sum"``, which leaves the single
    reduced tensor unchanged.
    """
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return [reduced]


class SumStateMetric(Metric):
    """A :class:`torchmetrics.Metric` whose states are fixed-shape sums (``dist_reduce_fx="sum"``).

    Defaults that every subclass shares: no compute cache (``compute`` may take arguments), the in-place
    :func:`all_reduce_sum` as ``dist_sync_fn``, and :meth:`synced` to read the states summed over ranks.
    ``update`` of a subclass never synchronises with the host.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("compute_with_cache", False)
        kwargs.setdefault("dist_sync_fn", all_reduce_sum)
        super().__init__(**kwargs)

    @property
    def distributed(self) -> bool:
        """Whether reads sum over ranks: a process group exists and syncing is on."""
        return bool(self._to_sync and self.distributed_available_fn())

    def synced(self, read: Callable[[], T]) -> T:
        """``read()`` evaluated on the states summed over ranks (a collective on every rank; a plain call
        without a process group, or when the states are already synced). The rank's own states are restored
        afterwards."""
        if self._is_synced or not self.distributed:
            return read()
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=True, should_unsync=True):
            return read()

    def local_states(self) -> dict[str, Tensor]:
        """Copies of this rank's states, by name (a snapshot: later updates do not change it)."""
        return {name: getattr(self, name).detach().clone() for name in self._defaults}

    def state_device(self) -> torch.device:
        """The device the states live on."""
        first = next(iter(self._defaults))
        return getattr(self, first).device  # type: ignore[no-any-return]

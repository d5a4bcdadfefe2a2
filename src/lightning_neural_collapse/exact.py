"""The exact measurement pass: the whole training set, in eval mode, without side effects on the run."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler


def exact_loader(train_loader: DataLoader, world_size: int = 1, rank: int = 0) -> DataLoader:
    """A non-shuffled loader over ``train_loader``'s dataset with the same batch size and collate function.

    Under several ranks each rank gets a disjoint shard without padding (``UnrepeatedDistributedSampler``),
    so every sample is counted exactly once whatever the dataset size.

    Raises:
        TypeError: for an ``IterableDataset`` (no length, no sharding by index): use ``mode="online"``.
    """
    dataset = train_loader.dataset
    if isinstance(dataset, IterableDataset):
        raise TypeError("mode='exact' needs a map-style training dataset; with an IterableDataset use mode='online'")
    batch_size = train_loader.batch_size or getattr(train_loader.batch_sampler, "batch_size", None) or 256
    sampler: Any
    if world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=train_loader.collate_fn,
        num_workers=train_loader.num_workers,
        pin_memory=train_loader.pin_memory,
        drop_last=False,
    )


@contextmanager
def observing(module: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; afterwards every submodule's train/eval flag and every
    global random generator (torch, CUDA, NumPy, Python) are back to what they were."""
    flags = [(m, m.training) for m in module.modules()]
    rng = _rng_states()
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        _set_rng_states(rng)


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        states["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        pass
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        np.random.set_state(states["numpy"])

"""``pipeline.loop``: what the callback reads from the Lightning loop, on stand-in trainers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping, Timer
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_neural_collapse.pipeline import loop


def trainer(**kwargs: Any) -> Any:
    progress = SimpleNamespace(
        is_last_batch=kwargs.pop("is_last_batch", False), current=SimpleNamespace(ready=kwargs.pop("ready", 1))
    )
    epoch_loop = SimpleNamespace(batch_progress=progress)
    if "stepped" in kwargs:
        epoch_loop._batches_that_stepped = kwargs.pop("stepped")
    defaults = {"callbacks": [], "max_epochs": 10, "max_steps": -1, "num_training_batches": 5, "global_step": 3}
    return SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=epoch_loop), **{**defaults, **kwargs})


def test_limits() -> None:
    assert loop.limits(trainer()).known_end
    assert loop.limits(trainer(max_steps=100)).open_ended
    assert loop.limits(trainer(callbacks=[EarlyStopping(monitor="x")])).open_ended
    assert loop.limits(trainer(callbacks=[Timer(duration="00:00:01:00")])).open_ended
    assert not loop.limits(trainer(max_epochs=-1)).known_end


def test_is_last_batch() -> None:
    assert loop.is_last_batch(trainer(is_last_batch=True))
    assert loop.is_last_batch(trainer(ready=5))  # num_training_batches done (limit_train_batches)
    assert not loop.is_last_batch(trainer(ready=4))
    assert loop.is_last_batch(trainer(ready=2, max_steps=3, global_step=3))  # max_steps reached mid-epoch
    assert not loop.is_last_batch(trainer(ready=2, max_steps=4, global_step=3))


def test_epoch_end_step_is_lightnings() -> None:
    assert loop.epoch_end_step(trainer(stepped=8), after_epoch_end=False) == 8  # during the last batch's end
    assert loop.epoch_end_step(trainer(stepped=8), after_epoch_end=True) == 7  # after it: the counter moved on
    assert loop.epoch_end_step(trainer(global_step=5), after_epoch_end=True) == 5  # no counter: global_step


def test_padding_and_length() -> None:
    data = TensorDataset(torch.zeros(5, 1))
    assert loop.pads_samples(DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0)))
    assert not loop.pads_samples(DataLoader(data, sampler=DistributedSampler(data, num_replicas=5, rank=0)))
    dropping = DistributedSampler(data, num_replicas=2, rank=0, drop_last=True)
    assert not loop.pads_samples(DataLoader(data, sampler=dropping))
    assert not loop.pads_samples(DataLoader(data)) and not loop.pads_samples([1])
    assert loop.length(DataLoader(data, batch_size=2)) == 3 and loop.length(iter([1])) is None

"""What the Lightning loop tells the callback: where an epoch ends, at which logging step, and how a fit ends.

These read the ``Trainer`` (and a few of its loops' counters), nothing else; they are the only places that do.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, DistributedSampler

from lightning_neural_collapse.pipeline.schedule import Limits


def limits(trainer: Any) -> Limits:
    """How the fit ends: ``max_epochs``, and whether ``max_steps``, ``max_time`` (a ``Timer``) or an
    ``EarlyStopping`` can end it before."""
    stoppers = any(isinstance(cb, (EarlyStopping, Timer)) for cb in trainer.callbacks)
    max_steps = trainer.max_steps
    return Limits(trainer.max_epochs, open_ended=stoppers or (max_steps is not None and max_steps >= 0))


def last_unit(trainer: Any, every_n_train_steps: int | None = None) -> int | None:
    """The last epoch the fit can reach (``max_epochs - 1``), or with ``every_n_train_steps`` the last window
    (``max_steps // every_n_train_steps - 1``); ``None`` when unbounded (``max_epochs=-1``, no ``max_steps``)."""
    if every_n_train_steps is not None:
        max_steps = trainer.max_steps
        return max_steps // every_n_train_steps - 1 if max_steps is not None and max_steps > 0 else None
    max_epochs = trainer.max_epochs
    return max_epochs - 1 if max_epochs is not None and max_epochs > 0 else None


def is_last_batch(trainer: Any) -> bool:
    """Whether the training batch that just ended is its epoch's last: Lightning's own test (the data fetcher is
    exhausted, or ``num_training_batches`` are done, which honours ``limit_train_batches``), or ``max_steps``
    reached."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch or progress.current.ready == trainer.num_training_batches:
        return True
    return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps


def epoch_end_step(trainer: Any, *, after_epoch_end: bool) -> int:
    """The logging step of the current epoch's end, the one ``self.log(..., on_epoch=True)`` and
    ``LearningRateMonitor`` use: Lightning's batches-that-stepped counter during the last batch's
    ``on_train_batch_end``, minus one once that batch is done (``on_train_epoch_end``). It counts batches, not
    optimizer steps, so it is right under manual optimisation with several optimizers too. ``global_step`` where
    the counter is unavailable."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    if not isinstance(stepped, int):
        return int(trainer.global_step)
    return max(stepped - 1, 0) if after_epoch_end else stepped


def validation_step(trainer: Any) -> int:
    """The logging step of the validation running now: the one Lightning logs its validation metrics at
    (the batches-that-stepped counter; ``global_step`` where it is unavailable)."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    stepped = getattr(loop, "_batches_that_stepped", None)
    return stepped if isinstance(stepped, int) else int(trainer.global_step)


def has_validation(trainer: Any, pl_module: Any) -> bool:
    """Whether this fit can run a validation loop: the module has a ``validation_step`` and
    ``limit_val_batches`` is not 0 (the loaders themselves are loaded later)."""
    limit = getattr(trainer, "limit_val_batches", 1.0)
    return bool(is_overridden("validation_step", pl_module)) and limit != 0


def validation_loaders(trainer: Any) -> int:
    """The number of validation dataloaders of the running validation (the same on every rank)."""
    batches = getattr(trainer, "num_val_batches", None) or []
    return len(batches) if isinstance(batches, (list, tuple)) else 1


def length(loader: Any) -> int | None:
    """``len(loader)``, or ``None`` for a loader without a length."""
    try:
        return len(loader)
    except TypeError:
        return None


def pads_samples(loader: Any) -> bool:
    """Whether ``loader``'s ``DistributedSampler`` repeats samples to fill the last ranks."""
    if not isinstance(loader, DataLoader):
        return False
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    size = length(loader.dataset)
    return size is not None and size % sampler.num_replicas != 0

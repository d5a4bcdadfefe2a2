"""The exact measurement pass: the training set in eval mode, without side effects on the run.

:func:`exact_loader` builds the pass's loader: the user's ``exact_dataloader=`` (a DataLoader, or a function
returning one, for clean un-augmented data), else the training loader rebuilt without shuffling, with every
setting that shapes its batches or its workers kept. Under several ranks each rank gets a disjoint shard
without padding (``UnrepeatedDistributedSampler``), so every sample is counted exactly once.
:class:`ExactPass` runs the model over it, batch by batch, and hands the captured features, logits and labels
to a consumer. It runs no collective (the ranks may run different numbers of batches); the caller reduces.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

from lightning_neural_collapse.metrics import NCCMismatch, NeuralCollapse
from lightning_neural_collapse.pipeline import loop
from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.compute import ExactRun
from lightning_neural_collapse.pipeline.labels import LabelReader, call_model
from lightning_neural_collapse.pipeline.layer_sums import LayerResults, LayerSums
from lightning_neural_collapse.pipeline.samples import Captured
from lightning_neural_collapse.pipeline.sharding import model_is_sharded

Consumer = Callable[[Captured, Tensor], None]


class ExactLoaderError(ValueError):
    """A loader the exact pass cannot use; the message names the option to change."""


def exact_loader(train_loader: Any, world_size: int = 1, rank: int = 0, user_loader: Any = None) -> DataLoader:
    """The loader of the exact pass.

    Args:
        train_loader: the training ``DataLoader`` (used when ``user_loader`` is ``None``).
        world_size: number of ranks.
        rank: this rank.
        user_loader: the ``exact_dataloader=`` option: a ``DataLoader``, a function with no argument returning
            one, or ``None``.

    Returns:
        A ``DataLoader`` over this rank's shard: the user's loader as is on one rank (or when its sampler is
        already distributed), else the same dataset, batch size, collate function and worker settings
        (``num_workers``, ``worker_init_fn``, ``generator``, ``persistent_workers``, ``prefetch_factor``,
        ``timeout``, ``multiprocessing_context``, ``pin_memory``) over a non-shuffled, unpadded shard.

    Raises:
        ExactLoaderError: for an ``IterableDataset`` training loader, a function that does not return a
            loader, or a user loader with a custom sampler under several ranks.
    """
    if user_loader is not None:
        loader = user_loader() if callable(user_loader) and not isinstance(user_loader, DataLoader) else user_loader
        if not isinstance(loader, DataLoader):
            raise ExactLoaderError(
                f"`exact_dataloader` must be a DataLoader or return one, got {type(loader).__name__}"
            )
        if world_size == 1 or _is_distributed(loader.sampler) or isinstance(loader.dataset, IterableDataset):
            return loader  # an IterableDataset is expected to shard itself across ranks
        if not isinstance(loader.sampler, (SequentialSampler, RandomSampler)):
            raise ExactLoaderError(
                f"`exact_dataloader` uses a {type(loader.sampler).__name__} under {world_size} ranks: give it a "
                "distributed sampler that shards the data across ranks, or use a plain (sequential) loader, "
                "which the callback shards itself."
            )
        return _rebuilt(loader, world_size, rank)
    if not isinstance(train_loader, DataLoader):
        raise ExactLoaderError(
            "mode='exact' needs a single torch DataLoader for training, or `exact_dataloader=`; "
            "otherwise use mode='online'."
        )
    if isinstance(train_loader.dataset, IterableDataset):
        raise ExactLoaderError(
            "mode='exact' needs a map-style training dataset (an IterableDataset has no order to re-read); "
            "pass `exact_dataloader=` or use mode='online'."
        )
    return _rebuilt(train_loader, world_size, rank)


def _rebuilt(loader: DataLoader, world_size: int, rank: int) -> DataLoader:
    dataset = loader.dataset
    sampler: Any
    if world_size > 1:
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)
    else:
        sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 256
    workers = loader.num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=loader.collate_fn,
        num_workers=workers,
        pin_memory=loader.pin_memory,
        drop_last=False,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context if workers > 0 else None,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor if workers > 0 else None,
        persistent_workers=loader.persistent_workers if workers > 0 else False,
    )


def _is_distributed(sampler: Any) -> bool:
    return hasattr(sampler, "num_replicas") and hasattr(sampler, "rank")


def batch_limit(limit_train_batches: int | float | None, num_batches: int | None) -> int | None:
    """How many batches of the exact loader to measure under ``Trainer(limit_train_batches=...)``: ``None``
    for all of them.

    Example:
        >>> batch_limit(1.0, 10), batch_limit(3, 10), batch_limit(0.25, 10), batch_limit(0.01, 10)
        (None, 3, 2, 1)
    """
    if limit_train_batches is None:
        return None
    if isinstance(limit_train_batches, int) and not isinstance(limit_train_batches, bool):
        return limit_train_batches if num_batches is None or limit_train_batches < num_batches else None
    if float(limit_train_batches) >= 1.0 or num_batches is None:
        return None
    return max(1, int(num_batches * float(limit_train_batches)))


class ExactPass:
    """One eval-mode pass of ``model`` over ``loader``, feeding each batch's captured tensors to a consumer.

    Args:
        model: the LightningModule (called directly, never through the DDP wrapper).
        loader: the batches (from :func:`exact_loader`).
        binding: the classifier's :class:`~lightning_neural_collapse.pipeline.capture.Binding` (its hooks).
        labels: reads class indices from a batch.
        input_getter: ``batch -> model input`` (a tensor, a tuple of positional or a dict of keyword arguments).
        to_device: moves a batch to the model's device (``trainer.strategy.batch_to_device``).
        context: a context manager factory wrapped around the pass (``precision_plugin.forward_context``).
        max_batches: stop after this many batches (``limit_train_batches``), or ``None``.
        forwards: with a sharded model (:func:`~lightning_neural_collapse.pipeline.sharding.model_is_sharded`),
            run exactly this many forwards (agreed over the ranks, see :meth:`ExactMeasurement.pad_to`): a rank with
            fewer batches repeats its first one without counting it, because every sharded forward is a collective.
            ``None``, or an unsharded model: one forward per batch.
    """

    def __init__(
        self,
        model: nn.Module,
        loader: Iterable[Any],
        binding: Binding,
        labels: LabelReader,
        input_getter: Callable[[Any], Any],
        *,
        to_device: Callable[[Any], Any] = lambda batch: batch,
        context: Callable[[], AbstractContextManager[Any]] = nullcontext,
        max_batches: int | None = None,
        forwards: int | None = None,
    ) -> None:
        self.model = model
        self.forwards = forwards
        self.sharded = model_is_sharded(model)
        self.loader = loader
        self.binding = binding
        self.labels = labels
        self.input_getter = input_getter
        self.to_device = to_device
        self.context = context
        self.max_batches = max_batches

    def run(self, consume: Consumer) -> int:
        """Run the pass (model in eval mode, no gradients, RNG and train/eval flags restored afterwards), handing
        each batch's samples and class indices to ``consume``; returns the number of batches. Exceptions of the
        model or of the getters propagate."""
        batches = 0
        capture = self.binding.capture
        first: Any = None
        with observing(self.model), self.context():
            for batch in self.loader:
                if self.max_batches is not None and batches >= self.max_batches:
                    break
                if self.forwards is not None and batches >= self.forwards:
                    break
                batch = self.to_device(batch)
                first = batch if first is None else first
                capture.clear()
                call_model(self.model, self.input_getter(batch))
                captured = self.binding.take()
                if captured is None:
                    raise RuntimeError(f"the classifier `{self.binding.name}` did not run in the model's forward")
                consume(captured, self.labels.read(batch, captured.features.device, captured.layout))
                batches += 1
            padding = 0 if self.forwards is None or not self.sharded else self.forwards - batches
            if padding > 0 and first is None:
                raise RuntimeError(
                    "this rank's shard of the exact pass is empty, but the other ranks' forwards are collectives "
                    "(a sharded model): give every rank at least one batch (a smaller batch size, or fewer ranks)"
                )
            for _ in range(padding):  # the same number of forwards on every rank; these samples are not counted
                call_model(self.model, self.input_getter(first))
        capture.clear()
        return batches

    def local_forwards(self) -> int:
        """How many forwards :meth:`run` makes without padding: the loader's batches (``limit_train_batches``
        applied); ``-1`` for a loader without a length."""
        total = loop.length(self.loader)
        if total is None:
            return -1
        return total if self.max_batches is None else min(total, self.max_batches)


class ExactMeasurement:
    """Exact mode's local work for :func:`~lightning_neural_collapse.pipeline.compute.finish_epoch`: pass 1 (the
    per-class statistics, the eval-mode error) and pass 2 (NC4 against the reduced means), over this rank's shard.

    Args:
        new_pass: returns a fresh :class:`ExactPass` (the loader is built once, by the caller).
        new_accumulator: ``features -> Accumulator`` with statistics (shifted by the previous measurement), for
            the features' device.
        empty_features: a ``(0, D)`` tensor on the model's device, for a rank whose shard is empty.
        num_classes: ``C``.
        model: what the ranks align before the passes (see ``RankGroup.aligned``).
        second_layers: with ``layers=``: pass 2's per-layer sums against the reduced pass-1 layer means (its
            accumulator's :class:`~lightning_neural_collapse.pipeline.layer_sums.LayerSums` are pass 1's), else
            ``None``. It also serves as :class:`~lightning_neural_collapse.pipeline.compute.ExactLayers`.
    """

    def __init__(
        self,
        new_pass: Callable[[], ExactPass],
        new_accumulator: Callable[[Tensor], Accumulator],
        empty_features: Callable[[], Tensor],
        num_classes: int,
        model: nn.Module,
        second_layers: Callable[[LayerResults], LayerSums] | None = None,
    ) -> None:
        self.new_pass = new_pass
        self.new_accumulator = new_accumulator
        self.empty_features = empty_features
        self.num_classes = num_classes
        self.model = model
        self.second_layers = second_layers
        self._first: LayerSums | None = None
        self._second: LayerSums | None = None
        self._forwards: int | None = None

    def run(self) -> ExactRun:
        """The two passes as :class:`~lightning_neural_collapse.pipeline.compute.ExactRun` callables."""
        layers = self if self.second_layers is not None else None
        return ExactRun(self.statistics, self.ncc, self.model, layers, forwards=self.local_forwards, pad_to=self.pad_to)

    def local_forwards(self) -> int:
        """This rank's forwards per pass without padding (``-1``: unknown, a loader without a length)."""
        return self.new_pass().local_forwards()

    def pad_to(self, forwards: int | None) -> None:
        """Make every later pass run exactly ``forwards`` forwards (``None``: one per batch)."""
        self._forwards = forwards

    def first(self) -> LayerSums:
        """Pass 1's per-layer sums (after :meth:`statistics`)."""
        if self._first is None:
            raise RuntimeError("the layers' first pass has not run")
        return self._first

    def prepare(self, first: LayerResults) -> None:
        """Set up pass 2's per-layer sums against the reduced pass-1 means ``first`` (before :meth:`ncc`)."""
        assert self.second_layers is not None
        self._second = self.second_layers(first)

    def second(self) -> LayerSums:
        """Pass 2's per-layer sums (after :meth:`ncc`)."""
        if self._second is None:
            raise RuntimeError("the layers' second pass has not run")
        return self._second

    def statistics(self) -> tuple[NeuralCollapse, dict[str, Tensor | int]]:
        """Pass 1: the statistics metric and the pass's counts (errors, samples, skipped)."""
        acc: Accumulator | None = None

        def consume(captured: Captured, labels: Tensor) -> None:
            nonlocal acc
            if acc is None:
                acc = self.new_accumulator(captured.features)
            acc.add(captured, labels)

        self._pass().run(consume)
        if acc is None:  # an empty shard: take part with nothing
            acc = self.new_accumulator(self.empty_features())
        assert acc.statistics is not None
        self._first = acc.layers
        return acc.statistics, dict(acc.local_counts())

    def ncc(self, means: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Pass 2: ``(mismatches, samples)`` of NC4 against ``means`` (and, with layers, each layer's samples against
        its pass-1 means, see :meth:`prepare`)."""
        metric = NCCMismatch(means, present).to(means.device)
        layers = self._second

        def consume(captured: Captured, labels: Tensor) -> None:
            counted = (labels >= 0) & (labels < self.num_classes) & captured.finite
            metric.update_decisions(captured.features, captured.predictions, counted)
            if layers is not None:
                layers.add(captured.layers, labels.to(counted.device), counted)

        self._pass().run(consume)
        return metric.mismatches, metric.total

    def _pass(self) -> ExactPass:
        exact_pass = self.new_pass()
        exact_pass.forwards = self._forwards
        return exact_pass


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

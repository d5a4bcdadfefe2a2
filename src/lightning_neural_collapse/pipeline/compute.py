"""Finishing a measurement: the only place where the callback talks to the other ranks.

Every rank runs :func:`finish_epoch` at the same moment (the end of the epoch's last training batch, or the
fallbacks, all decided from state that is identical on every rank), and inside it the same collectives
in the same order, whatever happened locally. Each round is *local work, then agreement, then reduction*:

0. **agree** on the training steps: one ``all_reduce`` of a small int64 vector holding this rank's failure
   flag (a batch it could not measure, or no batch measured yet) and its counts (errors, samples, skipped
   samples, online NC4 counts). If any rank failed, every rank skips the epoch. From the summed counts the
   caller decides TPT and whether NC is measured (``decide``): the same decision on every rank.
1. statistics, when NC is measured. Exact mode first *aligns* the model (``broadcast`` of rank 0's buffers,
   restored afterwards, so that every rank measures the same model) and **agrees** on the number of forwards
   per pass (one ``all_reduce`` MAX: a sharded model's forward is itself a collective, so a rank with fewer
   batches repeats one, uncounted), then runs the eval pass over its shard (local work); online mode already
   has its sums. **Agree** on the pass's outcome and counts (one small ``all_reduce``); if any rank failed,
   every rank skips. **Reduce** the per-class statistics (one in-place ``all_reduce`` per state, inside
   :meth:`~lightning_neural_collapse.NeuralCollapse.statistics`), then, with ``layers=``, each listed layer's
   sums in depth order (``LayerSums.reduce``: its moments, then its projection).
2. exact mode only: the NC4 pass against the reduced class means, which also measures each layer's samples
   against that layer's reduced means (local), then **agree** on its outcome and counts, then **reduce** the
   layers' second-pass sums.

The classifier weight is then read on every rank (a collective for sharded weights), and the metrics are
computed from identical inputs on every rank, so they are identical. An exception in local work never
leaves a rank alone in a collective: it becomes the failure flag of the next agreement.

A validation run ends with :func:`finish_held_out`, on every rank at the end of the validation loop, once per
validation dataloader in index order (the same number on every rank): **agree** on the loader's counts and
failure flags (one small ``all_reduce``); if no rank failed and some rank counted a sample, **reduce** its
per-class statistics, then the layers' sums; then the metrics, from identical inputs on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_neural_collapse.functional.collapse import Geometry
from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.metrics import NeuralCollapse
from lightning_neural_collapse.pipeline.layer_sums import LayerResults, LayerSums


class RankGroup:
    """The ranks of the run (the default process group), and the three collectives the callback uses.

    Without an initialised process group (or with one rank) every collective is a no-op, so the same code
    runs on one process.
    """

    def __init__(self, process_group: Any | None = None) -> None:
        self.process_group = process_group

    @property
    def world_size(self) -> int:
        """Number of ranks (1 without a process group)."""
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_world_size(self.process_group))
        return 1

    @property
    def rank(self) -> int:
        """This rank (0 without a process group)."""
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank(self.process_group))
        return 0

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.process_group)
        return tensor

    def extremes(self, value: int, device: torch.device) -> tuple[int, int]:
        """``(min, max)`` of an integer over the ranks: one ``all_reduce`` (MAX of ``[-value, value]``)."""
        both = torch.tensor([-value, value], dtype=torch.long, device=device)
        if self.world_size > 1:
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.process_group)
        return -int(both[0]), int(both[1])

    @contextmanager
    def aligned(self, module: nn.Module) -> Iterator[None]:
        """Inside, every rank's ``module`` holds rank 0's buffers (BatchNorm running statistics: what DDP's
        forward broadcasts too); afterwards each rank's own buffers are back. One ``broadcast`` per buffer."""
        if self.world_size == 1:
            yield
            return
        buffers = [b for b in module.buffers() if b.numel()]
        saved = [b.detach().clone() for b in buffers]
        try:
            for buffer in buffers:
                dist.broadcast(buffer.data, src=0, group=self.process_group)
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved, strict=True):
                    buffer.copy_(value)


@dataclass(frozen=True)
class Agreement:
    """The outcome of one agreement: how many ranks failed, and the counts summed over ranks."""

    failed_ranks: int
    counts: dict[str, int]

    @property
    def failed(self) -> bool:
        """Whether any rank failed."""
        return self.failed_ranks > 0


def agree(group: RankGroup, failure: str | None, counts: Mapping[str, Tensor | int], device: torch.device) -> Agreement:
    """One ``all_reduce`` of ``[failed, *counts]`` (int64): every rank learns whether any failed, and the sums."""
    values = [torch.as_tensor(1 if failure else 0, dtype=torch.long, device=device)]
    values += [torch.as_tensor(v, device=device).to(torch.long).reshape(()) for v in counts.values()]
    summed = group.sum_(torch.stack(values)).tolist()
    return Agreement(int(summed[0]), dict(zip(counts, (int(v) for v in summed[1:]), strict=True)))


@dataclass
class LocalEpoch:
    """What this rank brings to :func:`finish_epoch`.

    Attributes:
        counts: the training steps' integer counts (see ``Accumulator.local_counts``), same keys on every rank.
        failure: why this rank cannot take part (a batch it could not measure, ...), or ``None``.
        statistics: the online per-class statistics, when accumulated.
        device: where the collectives' tensors live.
        layers: the listed hidden layers' sums (``layers=``), when accumulated with the statistics.
    """

    counts: Mapping[str, Tensor | int]
    failure: str | None
    statistics: NeuralCollapse | None
    device: torch.device
    layers: LayerSums | None = None


class ExactLayers(Protocol):
    """Exact mode's per-layer local work, alongside :class:`ExactRun`'s passes: :meth:`first` returns the sums of
    pass 1 (filled while ``ExactRun.statistics`` runs), :meth:`prepare` sets up pass 2's sums against the reduced
    pass-1 means (before ``ExactRun.ncc`` runs, which fills them), :meth:`second` returns those."""

    def first(self) -> LayerSums: ...

    def prepare(self, first: LayerResults) -> None: ...

    def second(self) -> LayerSums: ...


@dataclass
class ExactRun:
    """Exact mode's local work: ``statistics()`` runs pass 1 and returns the per-class statistics metric and the
    pass's counts (``errors``, ``total``, ``nonfinite``, ``bad_label``); ``ncc(means, present)`` runs pass 2
    and returns ``(mismatches, total)``; ``model`` is what :meth:`RankGroup.aligned` aligns; ``layers`` the
    per-layer work (``layers=``), or ``None``; ``forwards`` returns this rank's forwards per pass (``-1``
    unknown) and ``pad_to`` makes both passes run the agreed number (sharded forwards are collectives)."""

    statistics: Callable[[], tuple[NeuralCollapse, dict[str, Tensor | int]]]
    ncc: Callable[[Tensor, Tensor], tuple[Tensor | int, Tensor | int]]
    model: nn.Module
    layers: ExactLayers | None = None
    forwards: Callable[[], int] | None = None
    pad_to: Callable[[int | None], None] | None = None


@dataclass
class EpochOutcome:
    """What :func:`finish_epoch` found, identical on every rank.

    ``status`` is ``"skipped"`` (some rank failed: ``stage`` says where, ``failures`` holds this rank's
    message), ``"counted"`` (training-step counts only) or ``"measured"`` (with ``statistics``, ``weight`` and
    the metric ``values``; with ``layers=``, ``layers`` holds the layers' reduced numbers, whose keys are in
    ``values`` too).
    """

    status: str
    counts: dict[str, int] = field(default_factory=dict)
    exact_counts: dict[str, int] = field(default_factory=dict)
    statistics: ClassStatistics | None = None
    weight: Tensor | None = None
    values: dict[str, float] = field(default_factory=dict)
    geometry: Geometry | None = None
    stage: str = ""
    failure: str | None = None
    failed_ranks: int = 0
    layers: LayerResults | None = None


def finish_epoch(
    group: RankGroup,
    local: LocalEpoch,
    *,
    decide: Callable[[Agreement], bool],
    exact: ExactRun | None,
    weights: Callable[[], Tensor | None],
    measure: Callable[[ClassStatistics, Tensor | None], Geometry],
) -> EpochOutcome:
    """Finish one epoch's measurement on every rank, in the documented order (module docstring).

    Args:
        group: the ranks.
        local: this rank's training-step counts and (online) statistics.
        decide: called with the agreed training-step counts; returns whether NC is measured now. Runs on
            every rank with the same input, so it must be deterministic (it is where TPT is decided).
        exact: exact mode's local passes, or ``None`` (online mode).
        weights: returns the ``(C, D)`` classifier weight, or ``None``; called on every rank.
        measure: the metrics of the reduced statistics and the weight (local, deterministic: for example
            :func:`~lightning_neural_collapse.functional.collapse.geometry`).
    """
    steps = agree(group, local.failure, local.counts, local.device)
    if steps.failed:
        return EpochOutcome(
            "skipped", steps.counts, stage="training steps", failure=local.failure, failed_ranks=steps.failed_ranks
        )
    if not decide(steps):
        return EpochOutcome("counted", steps.counts)
    if exact is None:
        if local.statistics is None:  # identical on every rank: the plan is
            return EpochOutcome("counted", steps.counts)
        stats = local.statistics.statistics()
        layers = local.layers.reduce() if local.layers is not None else None
        return _outcome(steps.counts, {}, stats, weights, measure, layers)
    with group.aligned(exact.model):
        if exact.forwards is not None and exact.pad_to is not None:  # agree on the number of forwards
            try:
                mine = exact.forwards()
            except Exception:  # the pass itself will fail and say why, at its agreement
                mine = -1
            fewest, most = group.extremes(mine, local.device)
            exact.pad_to(most if fewest >= 0 else None)  # unknown on some rank: one forward per batch
        failure, metric, pass_counts = _attempt(exact.statistics)
        first = agree(group, failure, pass_counts or _EMPTY_PASS, local.device)
        if first.failed:
            return EpochOutcome(
                "skipped", steps.counts, stage="exact pass", failure=failure, failed_ranks=first.failed_ranks
            )
        assert metric is not None
        stats = metric.statistics()
        layer_work = exact.layers
        layers = layer_work.first().reduce() if layer_work is not None else None
        failure, ncc_counts = _attempt_ncc(exact.ncc, stats, layer_work, layers)
        second = agree(group, failure, ncc_counts, local.device)
        if second.failed:
            return EpochOutcome(
                "skipped", steps.counts, stage="exact NC4 pass", failure=failure, failed_ranks=second.failed_ranks
            )
        if layer_work is not None and layers is not None:
            layers = layers.merged(layer_work.second().reduce())
    exact_counts = {**first.counts, **second.counts}
    return _outcome(steps.counts, exact_counts, stats, weights, measure, layers)


_EMPTY_PASS: dict[str, Tensor | int] = {"errors": 0, "total": 0, "nonfinite": 0, "bad_label": 0}


def _attempt(
    run: Callable[[], tuple[NeuralCollapse, dict[str, Tensor | int]]],
) -> tuple[str | None, NeuralCollapse | None, dict[str, Tensor | int] | None]:
    try:
        metric, counts = run()
    except Exception as err:  # becomes this rank's failure flag: no rank is left waiting
        return f"{type(err).__name__}: {err}", None, None
    return None, metric, {key: counts[key] for key in _EMPTY_PASS}


def _attempt_ncc(
    run: Callable[[Tensor, Tensor], tuple[Tensor | int, Tensor | int]],
    stats: ClassStatistics,
    layer_work: ExactLayers | None = None,
    layers: LayerResults | None = None,
) -> tuple[str | None, dict[str, Tensor | int]]:
    try:
        if layer_work is not None and layers is not None:
            layer_work.prepare(layers)  # pass 2's per-layer centres and NC1 directions
        mismatches, total = run(stats.means, stats.present)
    except Exception as err:
        return f"{type(err).__name__}: {err}", {"ncc_mismatches": 0, "ncc_total": 0}
    return None, {"ncc_mismatches": mismatches, "ncc_total": total}


def _outcome(
    counts: dict[str, int],
    exact_counts: dict[str, int],
    stats: ClassStatistics,
    weights: Callable[[], Tensor | None],
    measure: Callable[[ClassStatistics, Tensor | None], Geometry],
    layers: LayerResults | None = None,
) -> EpochOutcome:
    weight = weights()  # every rank: a collective when the weight is sharded
    geometry = measure(stats, weight)
    values = dict(geometry.values)
    if layers is not None:
        values.update(layers.values())
    return EpochOutcome("measured", counts, exact_counts, stats, weight, values, geometry=geometry, layers=layers)


def finish_held_out(
    group: RankGroup, local: LocalEpoch, *, measure: Callable[[ClassStatistics], Geometry]
) -> EpochOutcome:
    """Finish one validation dataloader's part of a validation run on every rank (module docstring).

    Args:
        group: the ranks.
        local: this rank's counts and statistics of the loader (statistics ``None`` only where every rank has
            none: for example before the shapes are known).
        measure: the test-collapse metrics of the reduced statistics (local, deterministic).

    Returns:
        ``"skipped"`` (some rank failed, ``stage="validation"``), ``"counted"`` (no sample on any rank, or no
        statistics) or ``"measured"``, with the agreed counts.
    """
    agreed = agree(group, local.failure, local.counts, local.device)
    if agreed.failed:
        return EpochOutcome(
            "skipped", agreed.counts, stage="validation", failure=local.failure, failed_ranks=agreed.failed_ranks
        )
    if agreed.counts.get("total", 0) == 0 or local.statistics is None:  # identical on every rank
        return EpochOutcome("counted", agreed.counts)
    stats = local.statistics.statistics()
    layers = local.layers.reduce() if local.layers is not None else None
    geometry = measure(stats)
    values = dict(geometry.values)
    if layers is not None:
        values.update(layers.values(statistics=False))
    return EpochOutcome("measured", agreed.counts, statistics=stats, values=values, geometry=geometry, layers=layers)

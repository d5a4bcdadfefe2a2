"""The held-out split: Neural Collapse of the validation batches, in the validation loop's own forward.

The forward hooks fire in the validation step too, so each validation batch's features and decisions are added,
with the batch's labels, to one accumulator per validation dataloader (no extra forward, no host-device sync):
the network's accuracy, the per-class statistics of the validation features, and the nearest-class-centre rule
against the class means of the latest training measurement (``SavedState.reference``: in online mode the epoch
that has just ended, in exact mode its eval pass, which finishes at the start of this validation). At the end
of the validation loop every rank finishes every dataloader in index order
(:func:`~lightning_neural_collapse.pipeline.compute.finish_held_out`), and one record per validation run goes to
``SavedState.val_history`` and to the loggers under ``<prefix>_val/`` (SPEC.md's held-out keys). Sanity-check
runs are not measured.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_neural_collapse.functional.collapse import Geometry, geometry
from lightning_neural_collapse.functional.held_out import TEST_COLLAPSE_KEYS, fraction, mean_shift
from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline import loop
from lightning_neural_collapse.pipeline.accumulate import COUNT_KEYS, Accumulator, Reference
from lightning_neural_collapse.pipeline.compute import EpochOutcome, LocalEpoch, RankGroup, finish_held_out
from lightning_neural_collapse.pipeline.config import Config
from lightning_neural_collapse.pipeline.run_state import FitState, SavedState
from lightning_neural_collapse.reporting.reporter import Reporter


@dataclass
class LoaderSums:
    """One validation dataloader's sums on this rank, for one validation run."""

    accumulator: Accumulator | None = None
    failure: str | None = None
    loop: str = "validation"

    def local(self, device: torch.device) -> LocalEpoch:
        """What this rank brings to :func:`~lightning_neural_collapse.pipeline.compute.finish_held_out`."""
        acc = self.accumulator
        counts: dict[str, Any] = dict(acc.local_counts()) if acc is not None else dict.fromkeys(COUNT_KEYS, 0)
        if acc is None:
            return LocalEpoch(counts, self.failure, None, device)
        return LocalEpoch(counts, self.failure, acc.statistics, device, acc.layers)


@dataclass
class HeldOutRun:
    """One validation run on this rank: the training means it compares with, and each dataloader's sums.

    Attributes:
        reference: the class means of the latest training measurement, or ``None`` before the first one.
        epoch: ``trainer.current_epoch`` of the run.
        loaders: the sums by dataloader index.
    """

    reference: Reference | None
    epoch: int
    loaders: dict[int, LoaderSums] = field(default_factory=dict)

    def sums(self, dataloader: int) -> LoaderSums:
        """The sums of validation dataloader ``dataloader`` (created empty at its first batch)."""
        return self.loaders.setdefault(dataloader, LoaderSums())


def held_out_record(outcome: EpochOutcome, reference: Reference | None, tag: str = "") -> dict[str, float]:
    """The held-out keys of one dataloader's finished run, under ``tag/`` when ``tag`` is not empty.

    ``accuracy`` and ``skipped_samples`` always; ``ncc_accuracy`` and ``nc4_ncc_mismatch`` when there were training
    means to compare with; the test-collapse keys and ``mean_shift`` when the statistics were measured. Undefined
    values are left out.

    Example:
        >>> counts = {"errors": 1, "total": 4, "nonfinite": 0, "bad_label": 0, "ncc_mismatches": 1,
        ...           "ncc_hits": 2, "ncc_total": 4}
        >>> held_out_record(EpochOutcome("counted", counts), None, "clean")  # doctest: +NORMALIZE_WHITESPACE
        {'clean/accuracy': 0.75, 'clean/skipped_samples': 0.0, 'clean/ncc_accuracy': 0.5,
         'clean/nc4_ncc_mismatch': 0.25}
    """
    counts = outcome.counts
    total = counts.get("total", 0)
    values: dict[str, float] = {
        "accuracy": fraction(total - counts.get("errors", 0), total),
        "skipped_samples": float(counts.get("nonfinite", 0) + counts.get("bad_label", 0)),
    }
    if counts.get("ncc_total", 0) > 0:
        values["ncc_accuracy"] = fraction(counts["ncc_hits"], counts["ncc_total"])
        values["nc4_ncc_mismatch"] = fraction(counts["ncc_mismatches"], counts["ncc_total"])
    stats = outcome.statistics
    if outcome.status == "measured" and stats is not None:
        values.update({key: outcome.values[key] for key in TEST_COLLAPSE_KEYS if key in outcome.values})
        values.update({key: value for key, value in outcome.values.items() if key.startswith("layers/")})
        if reference is not None and reference.fits(*stats.means.shape):
            values["mean_shift"] = mean_shift(stats.means, stats.present, reference.means, reference.present)
    head = f"{tag}/" if tag else ""
    return {f"{head}{key}": value for key, value in values.items() if value == value}  # drops nan


class HeldOut:
    """The held-out measurement of one callback instance: open a validation run, add its batches, finish it.

    Args:
        config: the callback's options (``measure_val``, ``val_names``, the prefix).
        saved: the checkpointed state (the training means to compare with; ``val_history``).
        reporter: where the numbers go.
        group: the ranks.
        new_accumulator: a fresh accumulator for ``fit`` on a device, shifted by (and comparing with) the training
            means.
    """

    def __init__(
        self,
        config: Config,
        saved: SavedState,
        reporter: Reporter,
        group: RankGroup,
        new_accumulator: Callable[[FitState, torch.device], Accumulator],
    ) -> None:
        self.config = config
        self.saved = saved
        self.reporter = reporter
        self.group = group
        self.new_accumulator = new_accumulator

    def open(self, trainer: Trainer, fit: FitState) -> None:
        """Start measuring the validation run beginning now (nothing for sanity checks, ``measure_val=False``, or
        before the first training step has told ``C`` and ``D``: the same on every rank)."""
        fit.validation = None
        if not self.config.measure_val or trainer.sanity_checking or fit.shapes is None:
            return
        reference = self.saved.reference
        if reference is not None and not reference.fits(fit.shapes.num_classes, fit.shapes.dim):
            reference = None
        if reference is None:
            fit.warn.info("no-reference", say.no_reference(self.config.val_prefix))
        loaders = getattr(trainer, "val_dataloaders", None)
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        for index, loader in enumerate(loaders):
            if loop.pads_samples(loader):
                where = self._where(index, len(loaders))
                size = loop.length(loader.dataset)
                fit.warn(f"val-padding-{index}", say.padded_val_sampler(where, size or 0, trainer.world_size))
        fit.validation = HeldOutRun(reference, trainer.current_epoch)

    def add(self, trainer: Trainer, fit: FitState, batch: Any, dataloader: int) -> None:
        """Add the validation step's samples of ``batch`` (validation dataloader ``dataloader``); no host sync."""
        run = fit.validation
        if run is None:
            return
        failure = fit.add_batch(run.sums(dataloader), batch, lambda device: self.new_accumulator(fit, device))
        if failure is not None:
            step, where = loop.validation_step(trainer), self._where(dataloader, loop.validation_loaders(trainer))
            fit.warn("val-batch-error", say.val_batch_error(step, where, failure))

    def finish(self, trainer: Trainer, pl_module: LightningModule, fit: FitState) -> dict[str, float] | None:
        """Finish the open validation run on every rank: one :func:`finish_held_out` per dataloader, in index
        order; then record and report it.

        Returns:
            The run's record, or ``None`` when nothing was measured.
        """
        run, fit.validation = fit.validation, None
        if run is None:
            return None
        step = loop.validation_step(trainer)
        loaders = loop.validation_loaders(trainer)
        record: dict[str, float] = {"epoch": run.epoch, "step": step}
        for index in range(loaders):
            sums = run.sums(index)
            if sums.accumulator is None and sums.failure is None:  # no batch here: take part with zeros
                sums.accumulator = self.new_accumulator(fit, pl_module.device)
            outcome = finish_held_out(self.group, sums.local(pl_module.device), measure=self._measure)
            tag = self.config.val_tag(index, loaders)
            if outcome.status == "skipped":
                where = self._where(index, loaders)
                own = outcome.failure and f"NeuralCollapseCallback: {where} not measured: {outcome.failure}"
                shared = say.skipped_validation(step, where, outcome.failed_ranks)
                fit.warn.skipped(self.group.rank, own, "val-skipped", shared)
                continue
            record.update(held_out_record(outcome, run.reference, tag))
        if not any(key not in ("epoch", "step") and not key.endswith("skipped_samples") for key in record):
            return None  # no loader counted a sample (the classifier never ran in validation_step, say)
        self.saved.val_history.append(record)
        self.reporter.scalars(trainer, record, prefix=self.config.val_prefix)
        return record

    def _where(self, index: int, loaders: int) -> str:
        """The tag under which dataloader ``index`` (of ``loaders``) logs: ``nc_val`` or ``nc_val/<name>``."""
        tag = self.config.val_tag(index, loaders)
        return f"{self.config.val_prefix}/{tag}" if tag else self.config.val_prefix

    def _measure(self, stats: ClassStatistics) -> Geometry:
        """The test-collapse metrics of the validation statistics (no weight, no histogram)."""
        return geometry(stats, None, global_mean=self.config.global_mean, dtype=self.config.dtype)

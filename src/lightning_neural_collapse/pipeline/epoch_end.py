"""Finishing an epoch's measurement: the *what*, while the callback's hooks decide *when*.

:meth:`EpochEnd.finish` runs on every rank for the open epoch: it brings this rank's sums (or, in exact mode,
the eval-mode passes) to :func:`~lightning_neural_collapse.pipeline.compute.finish_epoch`, where TPT is decided
from the training error summed over ranks and NC is measured when it is due; then it commits the record to the
checkpointed state, calls the user's ``on_tpt_start`` once, gives the measurement's warnings and reports.
:meth:`EpochEnd.measure_last_epoch` measures, at the end of a fit, the last epoch reached when the schedule did
not (``max_steps``, ``max_time``, early stopping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_neural_collapse.functional.collapse import Geometry, geometry
from lightning_neural_collapse.functional.etf_deviation import cosine_edges
from lightning_neural_collapse.functional.layers import PREVIOUS_SUFFIX
from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline import loop
from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.compute import Agreement, EpochOutcome, RankGroup, finish_epoch
from lightning_neural_collapse.pipeline.config import Config
from lightning_neural_collapse.pipeline.exact import ExactMeasurement, ExactPass, batch_limit, exact_loader
from lightning_neural_collapse.pipeline.labels import default_input_getter
from lightning_neural_collapse.pipeline.layer_sums import Centres, LayerResults, LayerSums
from lightning_neural_collapse.pipeline.run_state import FitState, OpenEpoch, SavedState, build_record, reference_of
from lightning_neural_collapse.pipeline.schedule import EpochPlan, Schedule
from lightning_neural_collapse.reporting.reporter import Measured, Reporter

TPTHook = Callable[[Trainer, LightningModule, int], None]


class EpochEnd:
    """The end of an epoch's measurement for one callback instance.

    Args:
        config: the callback's options.
        saved: the checkpointed state (history, TPT, the previous class means).
        reporter: where the numbers go.
        on_tpt_start: the callback's hook, called once on every rank when TPT begins.
        group: the ranks (the default process group).
    """

    def __init__(
        self, config: Config, saved: SavedState, reporter: Reporter, on_tpt_start: TPTHook, group: RankGroup
    ) -> None:
        self.config = config
        self.schedule = Schedule(config.every_n_epochs, config.measure)
        self.saved = saved
        self.reporter = reporter
        self.on_tpt_start = on_tpt_start
        self.group = group
        self.last_statistics: ClassStatistics | None = None
        """The per-class statistics of the latest measurement of this fit, or ``None``."""

    def input_getter(self, batch: Any) -> Any:
        """The exact pass's model input of ``batch`` (``input_getter=`` or the default)."""
        return (self.config.input_getter or default_input_getter)(batch)

    def plan(self, trainer: Trainer) -> EpochPlan:
        """What the training steps of the unit (epoch or window) starting now accumulate."""
        if self.config.mode == "exact":
            return EpochPlan(statistics=False, standby=False)
        if self.config.windows:  # every window is measured (once TPT has begun, with measure="tpt")
            return EpochPlan(statistics=self.config.measure == "always" or self.saved.tpt.started, standby=False)
        epoch, limits = trainer.current_epoch, loop.limits(trainer)
        return self.schedule.online_plan(epoch, limits, tpt_started=self.saved.tpt.started)

    def accumulator(
        self,
        fit: FitState,
        device: torch.device,
        *,
        statistics: bool,
        lagged: bool = True,
        sample_ncc: bool = True,
        held_out: bool = False,
    ) -> Accumulator:
        """A fresh accumulator of this fit's shapes on ``device``, shifted by the previous measurement.

        ``lagged``: online NC4 against the previous means (not in the exact pass); ``held_out``: a validation
        loader's (the layers count NCC only)."""
        assert fit.shapes is not None
        config = self.config
        layers = None
        if statistics and fit.layer_dims:
            layers = self.layer_sums(
                fit,
                device,
                moments=not held_out,
                references=self.saved.layer_references,
                project=lagged,
                directions=not held_out,
                suffix="" if held_out else PREVIOUS_SUFFIX,
            )
        return Accumulator(
            fit.shapes.num_classes,
            fit.shapes.dim,
            device,
            statistics=statistics,
            reference=self.saved.reference,
            lagged_ncc=lagged,
            subset=fit.subset,
            global_mean=config.global_mean,
            accumulate_dtype=config.dtype,
            sum_dtype=config.dtype if device.type == "mps" else None,  # MPS has no float64
            ncc_samples=config.ncc_samples if lagged and sample_ncc else None,
            ncc_seed=len(self.saved.history),
            layers=layers,
        )

    def layer_sums(
        self,
        fit: FitState,
        device: torch.device,
        *,
        moments: bool,
        references: Centres,
        project: bool,
        directions: bool,
        suffix: str,
    ) -> LayerSums:
        """Fresh per-layer sums of this fit's listed layers on ``device`` (see
        :class:`~lightning_neural_collapse.pipeline.layer_sums.LayerSums`)."""
        assert fit.shapes is not None and fit.layer_dims is not None
        config = self.config
        return LayerSums(
            fit.layer_dims,
            {name: config.layer_tag(name) for name in fit.layer_dims},
            fit.shapes.num_classes,
            device,
            moments=moments,
            references=references,
            project=project,
            directions=directions,
            subset=fit.subset,
            suffix=suffix,
            global_mean=config.global_mean,
            accumulate_dtype=config.dtype,
            sum_dtype=config.dtype if device.type == "mps" else torch.float64,
        )

    def choose_classes(self, fit: FitState, device: torch.device) -> None:
        """Fix the measured classes of ``classes=`` once ``C`` is known: a list as given, ``k`` random ones drawn
        with ``classes_seed``, or (``"frequent"``) the ``k`` most frequent of an earlier measurement of this run.

        Raises:
            MisconfigurationException: for a class id that is not below ``C``.
        """
        wanted, shapes = self.config.classes, fit.shapes
        if wanted is None or shapes is None:
            return
        num_classes = shapes.num_classes
        if isinstance(wanted, tuple):
            if max(wanted) >= num_classes:
                raise MisconfigurationException(
                    f"`classes` lists class {max(wanted)}, but the classifier has {num_classes} classes"
                )
            chosen: list[int] | None = list(wanted)
        elif self.config.classes_from == "random":
            generator = torch.Generator().manual_seed(self.config.classes_seed)
            chosen = torch.randperm(num_classes, generator=generator)[: min(wanted, num_classes)].tolist()
        else:
            chosen = self.saved.subset  # None until a first measurement of all classes
        if chosen is not None:
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[torch.tensor(chosen, dtype=torch.long)] = True
            fit.subset = mask.to(device)

    def finish(self, trainer: Trainer, pl_module: LightningModule, fit: FitState) -> None:
        """Finish the open epoch of ``fit`` on every rank: reduce, measure, commit and report."""
        epoch, fit.open = fit.open, None
        if epoch is None or self.saved.finished(epoch.epoch):
            return  # finished before the checkpoint this fit resumed from
        exact = self.config.mode == "exact"
        if epoch.partial and not exact:
            fit.warn("partial", say.partial_epoch(epoch.epoch))
            self.saved.mark_finished(epoch.epoch)
            return
        step = epoch.step if epoch.step is not None else loop.epoch_end_step(trainer, after_epoch_end=True)
        outcome = self._run(trainer, pl_module, fit, epoch)
        if outcome.stage == "training steps":
            self._warn_failure(fit, outcome, epoch.epoch)
            self.saved.mark_finished(epoch.epoch)
            return
        if outcome.stage:  # the exact pass failed on some rank: every rank gets here
            if not fit.exact_measured:
                raise MisconfigurationException(say.exact_failure(outcome.stage, outcome.failure, outcome.failed_ranks))
            self._warn_failure(fit, outcome, epoch.epoch)
        record = build_record(
            outcome,
            epoch.epoch,
            step,
            exact=exact,
            partial=epoch.partial,
            unit_key=self.saved.unit_key,
            current_epoch=epoch.current_epoch,
            lagged_key=self.config.lagged_nc4_key,
        )
        if self.config.classes is not None and outcome.statistics is not None:
            record["classes_measured"] = float(outcome.statistics.present.sum())
        self._commit(trainer, pl_module, fit, record, outcome)
        if epoch.plan.standby and epoch.accumulator is not None:
            fit.held = epoch  # measured if the fit ends with this epoch

    def _run(
        self, trainer: Trainer, pl_module: LightningModule, fit: FitState, epoch: OpenEpoch, *, force: bool = False
    ) -> EpochOutcome:
        """Finish ``epoch`` on every rank; ``force``: measure NC whatever the schedule (the last epoch reached)."""
        if epoch.accumulator is None and fit.shapes is not None:  # no batch measured here: take part with nothing
            epoch.accumulator = self.accumulator(fit, pl_module.device, statistics=epoch.plan.accumulates)
        saved, exact = self.saved, self.config.mode == "exact"

        def decide(agreed: Agreement) -> bool:  # every rank, same counts: TPT, then whether NC is measured
            total = agreed.counts["total"]
            if not (epoch.partial or force) and total > 0:
                saved.tpt.update(epoch.epoch, agreed.counts["errors"] / total)
            if force or not exact:
                return force or epoch.plan.statistics
            return self.schedule.due(epoch.epoch, loop.limits(trainer), tpt_started=saved.tpt.started)

        shapes = fit.shapes
        return finish_epoch(
            self.group,
            epoch.local(pl_module.device, statistics=epoch.plan.statistics or force),
            decide=decide,
            exact=self._exact(trainer, pl_module, fit).run() if exact and shapes is not None else None,
            weights=lambda: fit.binding.parameters(shapes.num_classes, shapes.dim)[0] if shapes else None,
            measure=self._measure,
        )

    def _measure(self, stats: ClassStatistics, weight: Tensor | None) -> Geometry:
        """Every metric of the reduced statistics, and the cosine histograms when they are logged."""
        edges = cosine_edges(int(stats.present.sum())) if self.config.log_histograms else None
        return geometry(stats, weight, global_mean=self.config.global_mean, edges=edges, dtype=self.config.dtype)

    def _exact(self, trainer: Trainer, pl_module: LightningModule, fit: FitState) -> ExactMeasurement:
        assert fit.shapes is not None and fit.labels is not None
        shapes, labels = fit.shapes, fit.labels

        def new_pass() -> ExactPass:
            if fit.exact_loader is None:
                fit.exact_loader = exact_loader(
                    trainer.train_dataloader, trainer.world_size, trainer.global_rank, self.config.exact_dataloader
                )
            limit = (
                None
                if self.config.exact_dataloader is not None
                else batch_limit(trainer.limit_train_batches, loop.length(fit.exact_loader))
            )
            return ExactPass(
                pl_module,
                fit.exact_loader,
                fit.binding,
                labels,
                self.input_getter,
                to_device=trainer.strategy.batch_to_device,
                context=trainer.precision_plugin.forward_context,
                max_batches=limit,
            )

        def second_layers(first: LayerResults) -> LayerSums:  # pass 2: each layer against its pass-1 means
            centres = first.centres()
            return self.layer_sums(
                fit, pl_module.device, moments=False, references=centres, project=True, directions=True, suffix=""
            )

        return ExactMeasurement(
            new_pass,
            lambda features: self.accumulator(fit, features.device, statistics=True, lagged=False),
            lambda: torch.zeros(0, shapes.dim, device=pl_module.device),
            shapes.num_classes,
            pl_module,
            second_layers if fit.layer_dims else None,
        )

    def _commit(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        fit: FitState,
        record: dict[str, float],
        outcome: EpochOutcome,
    ) -> None:
        saved, epoch = self.saved, int(record[self.saved.unit_key])
        started = saved.tpt.epoch == epoch
        if started:  # windows: the step of the window's end; epochs: the epoch
            record["tpt_step" if self.config.windows else "tpt_epoch"] = (
                record["step"] if self.config.windows else epoch
            )
        saved.commit(record)
        fit.last_finished = epoch
        if outcome.statistics is not None:
            self._remember(outcome)
            fit.last_measured, fit.exact_measured = epoch, fit.exact_measured or self.config.mode == "exact"
            wanted = self.config.classes
            if isinstance(wanted, int) and self.config.classes_from == "frequent" and saved.subset is None:
                counts = outcome.statistics.counts
                saved.subset = sorted(torch.argsort(counts, descending=True, stable=True)[:wanted].tolist())
                self.choose_classes(fit, counts.device)
        if started:
            unit = f"window {epoch} (step {record['step']})" if self.config.windows else f"epoch {epoch}"
            rank_zero_info(
                f"NeuralCollapseCallback: the Terminal Phase of Training begins at {unit} "
                f"(training error {record.get('train_error', 0.0):.4g} <= {saved.tpt.threshold})."
            )
            try:
                self.on_tpt_start(trainer, pl_module, epoch)
            except Exception as err:  # a user's hook must not leave the other ranks waiting
                fit.warn.on_rank(
                    self.group.rank,
                    f"NeuralCollapseCallback: on_tpt_start raised {err!r}; TPT stays recorded and training goes on.",
                )
        if fit.shapes is not None:
            subset = self.config.classes is not None
            unit = "window" if self.config.windows else "epoch"
            warned = say.epoch_warnings(outcome, epoch, fit.shapes.num_classes, self.config.prefix, subset, unit)
            for key, message in warned:
                fit.warn(key, message)
        self.reporter.scalars(trainer, record, onset=(epoch, saved.tpt.epoch))
        self._snapshot(trainer, outcome, epoch, int(record["step"]))

    def measure_last_epoch(self, trainer: Trainer, pl_module: LightningModule, fit: FitState) -> None:
        """At the end of the fit, measure the last epoch reached if the schedule did not (every rank)."""
        last = self.saved.history[-1] if self.saved.history else None
        key = self.saved.unit_key
        if last is None or int(last[key]) != fit.last_finished or fit.last_measured == fit.last_finished:
            return
        epoch_index = int(last[key])
        allowed = self.config.measure == "always" or (
            self.saved.tpt.epoch is not None and self.saved.tpt.epoch <= epoch_index
        )
        held = fit.held if fit.held is not None and fit.held.epoch == epoch_index else None
        if not allowed or (self.config.mode == "online" and held is None):
            return
        epoch = held or OpenEpoch(epoch_index, EpochPlan(statistics=False, standby=False))
        outcome = self._run(trainer, pl_module, fit, epoch, force=True)
        if outcome.status != "measured":
            self._warn_failure(fit, outcome, epoch_index)
            return
        extra = build_record(outcome, epoch_index, int(last["step"]), exact=self.config.mode == "exact", partial=True)
        new = {key: value for key, value in extra.items() if key not in last}
        last.update(new)
        self._remember(outcome)
        self.reporter.scalars(trainer, {"step": last["step"], **new})
        self._snapshot(trainer, outcome, epoch_index, int(last["step"]))

    def _snapshot(self, trainer: Trainer, outcome: EpochOutcome, unit: int, step: int) -> None:
        """The histograms and the figure of a measured unit, when the reporter's snapshot schedule says so."""
        saved = self.saved
        tpt = saved.tpt.epoch
        if self.config.windows and tpt is not None:  # the figure's x axis is the step
            record = saved.record(tpt)
            figure_tpt = None if record is None else int(record["step"])
        else:
            figure_tpt = tpt
        measured = Measured(unit, step, outcome.statistics, outcome.weight, outcome.geometry, figure_tpt)
        self.reporter.snapshot(trainer, measured, saved.history, tpt, saved.val_history)

    def _remember(self, outcome: EpochOutcome) -> None:
        """Keep a measured outcome's class means (and each layer's, with its NC1 directions) for the next
        measurement and the validation runs, and its statistics for :attr:`last_statistics`."""
        self.saved.reference, self.last_statistics = reference_of(outcome), outcome.statistics
        if outcome.layers is not None:
            self.saved.layer_references = {name: ref.cpu() for name, ref in outcome.layers.centres().items()}

    def _warn_failure(self, fit: FitState, outcome: EpochOutcome, epoch: int) -> None:
        own = (
            outcome.failure
            and f"NeuralCollapseCallback: epoch {epoch} not measured ({outcome.stage}): {outcome.failure}"
        )
        shared = say.skipped_epoch(epoch, outcome.stage, outcome.failed_ranks)
        fit.warn.skipped(self.group.rank, own, f"failed-{outcome.stage}", shared)

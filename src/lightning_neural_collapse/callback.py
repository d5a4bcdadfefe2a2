"""``NeuralCollapseCallback``: NC1-NC4 and the Terminal Phase of Training in any Lightning run.

The hooks only hand work to the pipeline (capture -> accumulate -> compute -> report): the binding to the
model (:mod:`~lightning_neural_collapse.pipeline.capture`), the first-step checks, the per-epoch sums, the
exact pass, the one place with collectives (:mod:`~lightning_neural_collapse.pipeline.compute`), the state
(:mod:`~lightning_neural_collapse.pipeline.run_state`) and the reporter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.capture import Binding, CaptureShapeError
from lightning_neural_collapse.pipeline.compute import Agreement, EpochOutcome, RankGroup, finish_epoch
from lightning_neural_collapse.pipeline.config import Config, DtypeChoice, GlobalMeanChoice, Measure, Mode
from lightning_neural_collapse.pipeline.exact import (
    ExactLoaderError,
    ExactMeasurement,
    ExactPass,
    batch_limit,
    exact_loader,
)
from lightning_neural_collapse.pipeline.first_step import FirstStep
from lightning_neural_collapse.pipeline.labels import LabelReader, default_input_getter
from lightning_neural_collapse.pipeline.probe import is_compiled
from lightning_neural_collapse.pipeline.run_state import FitState, OpenEpoch, SavedState, build_record, reference_of
from lightning_neural_collapse.pipeline.schedule import EpochPlan, Limits, Schedule
from lightning_neural_collapse.reporting._common import reset_warnings
from lightning_neural_collapse.reporting.reporter import Reporter, epoch_end_step


class NeuralCollapseCallback(Callback):
    r"""Measure Neural Collapse (Papyan, Han & Donoho, 2020) on the training set while a model trains.

    Every epoch it logs ``{prefix}/train_error`` (the share of training samples the training steps
    misclassified: TPT begins at the first epoch where it is at most ``tpt_threshold``) and
    ``{prefix}/skipped_samples``; every measured epoch each metric of SPEC.md (``nc1``, ``nc2_*``, ``nc3_*``,
    NC4) and once ``{prefix}/tpt_epoch``. An epoch's measurement finishes at the end of its last training
    batch, before validation and any checkpoint saved there, at the step of Lightning's own epoch-end
    metrics. On loggers that support them it also writes histograms of the distance to a simplex ETF and a
    TensorBoard dashboard; at the end of ``fit`` a figure of the paper's panels. Everything stays in
    :attr:`history` too, and in checkpoints.

    The features are the input of the classifier layer and the predictions its output, captured by a
    forward hook: nothing in the model or the training step changes, and the final weights of a run are
    bit-identical with and without the callback.

    Args:
        mode: ``"online"`` (default) accumulates the features the training steps produce (no extra forward
            pass; the model changes during the epoch; NC4 is measured against the class means of the previous
            measurement and logged as ``nc4_ncc_mismatch_prev_means``). ``"exact"``, as in the paper: at the
            end of a measured epoch the model runs in eval mode, without gradients, twice over the training set
            (class means, then ``nc4_ncc_mismatch``), also logging that pass's ``train_error_eval``.
        classifier: dotted name of the final layer (its output are the logits). Default: a timm-style
            ``get_classifier()`` (unless it is an ``nn.Identity``), else the last ``nn.Linear``, checked in the
            first training step.
        features: dotted name of a module whose output are the penultimate features, when they are not the
            classifier's input.
        num_classes: number of classes; default: the classifier's number of outputs.
        label_getter: function ``batch -> labels``; default: ``batch[1]`` of a tuple/list, or the
            ``label``/``labels``/``y``/``target``/``targets`` entry of a dict. Class indices or one-hot/soft
            ``(batch, classes)`` targets (argmax).
        input_getter: function ``batch -> model input`` for the exact pass; a tensor calls ``model(x)``, a tuple
            ``model(*args)``, a dict ``model(**kwargs)``. Default: ``batch[0]``; for a dict its ``input_ids``
            (and ``attention_mask``) by keyword, else its ``x``/``input``/``inputs``/``image``/... entry.
        exact_dataloader: the data of the exact pass (a ``DataLoader``, or a function with no argument returning
            one), for example the training set without augmentation. Default: the training loader, rebuilt
            without shuffling (and limited like ``limit_train_batches``).
        ignore_index: a label value marking samples to leave out.
        every_n_epochs: measure NC every this many epochs (epochs 0, n, 2n, ... and the last reached). The
            training error, and so TPT, is counted every epoch.
        measure: ``"always"`` (default) or ``"tpt"``: measure NC only once TPT has begun.
        tpt_threshold: training error at or below which TPT begins (default 0.0: zero errors).
        global_mean: ``"classes"`` (mean of the class means, default) or ``"sample"`` (mean of all samples).
        prefix: first part of every logged tag; one per instance.
        log_histograms: write ETF-deviation histograms (quantile scalars on loggers without histograms).
        log_figure: at the end of ``fit``, log a figure of the NC panels and save it in the run's log
            directory (``neural_collapse.png``, or ``neural_collapse_<prefix>.png`` for other prefixes).
        accumulate_dtype: ``"float64"`` (default) or ``"float32"``: the dtype of the per-batch products of the
            streaming statistics, which are summed in float64 (float32 on devices without float64). float32 is
            accurate thanks to a per-class shift and much faster on GPUs.

    Example::

        trainer = Trainer(callbacks=[NeuralCollapseCallback()], max_epochs=100)
    """

    def __init__(
        self,
        mode: Mode = "online",
        classifier: str | None = None,
        features: str | None = None,
        num_classes: int | None = None,
        label_getter: Callable[[Any], Any] | None = None,
        input_getter: Callable[[Any], Any] | None = None,
        exact_dataloader: DataLoader | Callable[[], DataLoader] | None = None,
        ignore_index: int | None = None,
        every_n_epochs: int = 1,
        measure: Measure = "always",
        tpt_threshold: float = 0.0,
        global_mean: GlobalMeanChoice = "classes",
        prefix: str = "nc",
        log_histograms: bool = True,
        log_figure: bool = True,
        accumulate_dtype: DtypeChoice = "float64",
    ) -> None:
        self.config = Config(
            mode=mode,
            classifier=classifier,
            features=features,
            num_classes=num_classes,
            label_getter=label_getter,
            input_getter=input_getter,
            exact_dataloader=exact_dataloader,
            ignore_index=ignore_index,
            every_n_epochs=every_n_epochs,
            measure=measure,
            tpt_threshold=tpt_threshold,
            global_mean=global_mean,
            prefix=prefix,
            log_histograms=log_histograms,
            log_figure=log_figure,
            accumulate_dtype=accumulate_dtype,
        )
        self.schedule = Schedule(every_n_epochs, measure)
        self.reporter = Reporter(
            prefix,
            log_histograms=log_histograms,
            log_figure=log_figure,
            figure_name=self.config.figure_name,
            global_mean=global_mean,
        )
        self._saved = SavedState(tpt_threshold)
        self._fit: FitState | None = None
        self._group = RankGroup()
        self.figure_path: str | None = None
        """Where the figure was saved at the end of the last ``fit`` (``None`` if not saved)."""
        self.last_statistics: ClassStatistics | None = None
        """The per-class statistics (counts, means, ``Sigma_W``, variances; float64, summed over ranks) of the
        latest measurement of this fit, or ``None``."""

    # ------------------------------------------------------------------ public API

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per finished epoch: ``epoch``, ``step``, ``train_error``, ``skipped_samples`` and the keys
        measured that epoch."""
        return self._saved.history

    @property
    def tpt_epoch(self) -> int | None:
        """First epoch (0-based ``trainer.current_epoch``) of the Terminal Phase of Training, or ``None``."""
        return self._saved.tpt.epoch

    @property
    def state_key(self) -> str:
        config = self.config
        return self._generate_state_key(classifier=config.classifier, features=config.features, prefix=config.prefix)

    def on_tpt_start(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Called once, on every rank, at the end of the epoch where TPT begins. Override to react; an
        exception here is caught and warned about, and training goes on."""

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        same = [cb for cb in _instances(trainer) if cb.config.prefix == self.config.prefix]
        if stage == "fit" and len(same) > 1:
            raise MisconfigurationException(
                f"{len(same)} NeuralCollapseCallback instances log under `prefix={self.config.prefix!r}`; give each "
                "its own `prefix=` (for example 'nc/layer3')."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._saved.restored and trainer.global_step == 0 and trainer.current_epoch == 0:
            self._saved.clear()  # a new run, not a resumed or continued one
        self._saved.restored = False
        self.figure_path = self.last_statistics = None
        reset_warnings()
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            rank_zero_info("NeuralCollapseCallback: disabled under `fast_dev_run`, nothing is measured.")
            return
        config, compiled = self.config, is_compiled(pl_module)
        binding = Binding(pl_module, config.classifier, config.features, count_calls=not compiled)
        if binding.automatic:
            rank_zero_info(
                f"NeuralCollapseCallback: using `{binding.name}` ({type(binding.module).__name__}) as the classifier."
            )
        self._fit = FitState(binding)
        self._fit.first_step = FirstStep(
            binding,
            num_classes=config.num_classes,
            label_getter=config.label_getter,
            ignore_index=config.ignore_index,
            input_getter=self._input_getter if config.mode == "exact" else None,
            probe=not compiled,
            warn=self._warn_once,
        )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is None:
            return
        loader = trainer.train_dataloader
        if self.config.mode == "exact":
            try:
                self._fit.exact_loader = exact_loader(
                    loader, trainer.world_size, trainer.global_rank, self.config.exact_dataloader
                )
            except ExactLoaderError as err:
                raise MisconfigurationException(str(err)) from err
            if trainer.world_size > 1 and any("running" in name for name, _ in pl_module.named_buffers()):
                rank_zero_info(
                    "NeuralCollapseCallback(mode='exact'): under DDP every rank measures with rank 0's "
                    "BatchNorm running statistics (as DDP's forward broadcasts them)."
                )
        elif isinstance(loader, DataLoader) and _pads_samples(loader):
            rank_zero_warn(
                say.padded_sampler(len(loader.dataset), trainer.world_size),  # type: ignore[arg-type]
                category=RuntimeWarning,
            )
        instances = _instances(trainer)
        if instances and instances[0] is self:  # one layout for every instance: a run keeps only the last
            self.reporter.dashboard(trainer, [cb.config.prefix for cb in instances])

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        fit = self._fit
        if fit is None:
            return
        fit.binding.capture.clear()
        if fit.open is None or fit.open.epoch != trainer.current_epoch:
            fit.held = None  # a new epoch began: the one on standby was not the last
            fit.open = OpenEpoch(trainer.current_epoch, self._plan(trainer), partial=batch_idx > 0)
        if fit.first_step is not None:
            fit.first_step.begin(batch)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._fit is not None and self._fit.first_step is not None:
            self._first_step_done(loss)  # before the first backward and optimizer step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        fit = self._fit
        if fit is None:
            return
        if fit.first_step is not None:
            self._first_step_done(None)  # no backward ran in this step
        self._accumulate(fit, batch)
        if fit.open is not None and _is_last_batch(trainer):
            fit.open.step = epoch_end_step(trainer, after_epoch_end=False)
            if self.config.mode == "online":
                self._finish(trainer, pl_module)
            # exact mode runs the model: not before the other callbacks and the module have seen this batch

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        if fit is not None and fit.open is not None and fit.open.step is not None and not trainer.sanity_checking:
            self._finish(trainer, pl_module)  # the validation right after an epoch's last batch, before its checkpoint

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        if fit is not None and fit.open is not None and fit.open.epoch == trainer.current_epoch:
            if fit.open.step is None:  # an epoch cut short (max_steps, a stop)
                fit.open.step = epoch_end_step(trainer, after_epoch_end=True)
            self._finish(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is None:
            return
        if self._fit.open is not None:
            self._finish(trainer, pl_module)
        self._measure_last_epoch(trainer, pl_module)
        title = f"Neural Collapse ({self.config.mode} mode)"
        self.figure_path = self.reporter.final_figure(trainer, self.history, self.tpt_epoch, title)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()  # the history of the finished epochs stays

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._saved.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved.load_state_dict(state_dict)

    # ------------------------------------------------------------------ capture and accumulate

    def _input_getter(self, batch: Any) -> Any:
        return (self.config.input_getter or default_input_getter)(batch)

    def _plan(self, trainer: Trainer) -> EpochPlan:
        if self.config.mode == "exact":
            return EpochPlan(statistics=False, standby=False)
        return self.schedule.online_plan(trainer.current_epoch, _limits(trainer), tpt_started=self._saved.tpt.started)

    def _first_step_done(self, loss: Tensor | None) -> None:
        fit = self._fit
        assert fit is not None and fit.first_step is not None
        shapes = fit.first_step.finish(loss)
        if shapes is None:
            return  # the classifier did not run: check again at the next step
        fit.first_step, fit.shapes = None, shapes
        fit.labels = LabelReader(self.config.label_getter, shapes.num_classes, self.config.ignore_index)
        if fit.binding.parameters(shapes.num_classes, shapes.dim)[0] is None:
            self._warn_once("no-weight", say.no_weight(fit.binding.name, shapes.num_classes, shapes.dim))

    def _accumulate(self, fit: FitState, batch: Any) -> None:
        epoch, capture = fit.open, fit.binding.capture
        if epoch is None or epoch.failure is not None:
            return
        try:
            captured = capture.take()
            if captured is None:
                self._warn_once("no-forward", say.no_forward(fit.binding.name))
                return
            if capture.calls > 1:
                self._warn_once("forwards", say.several_forwards(fit.binding.name, capture.calls))
            if fit.shapes is None or fit.labels is None:
                return
            features, logits = captured
            labels = fit.labels.read(batch, features.device)
            if labels.shape[0] != features.shape[0]:
                self._warn_once("batch-size", say.batch_size_mismatch(labels.shape[0], features.shape[0]))
                return
            if epoch.accumulator is None:
                epoch.accumulator = self._accumulator(fit, features.device, statistics=epoch.plan.accumulates)
            epoch.accumulator.update(features, logits, labels)
        except Exception as err:  # after the first step's checks, never stop the run
            epoch.failure = str(err) if isinstance(err, CaptureShapeError) else f"{type(err).__name__}: {err}"
            self._warn_once("batch-error", say.batch_error(epoch.epoch, epoch.failure))

    def _accumulator(
        self, fit: FitState, device: torch.device, *, statistics: bool, lagged: bool = True
    ) -> Accumulator:
        assert fit.shapes is not None
        config = self.config
        return Accumulator(
            fit.shapes.num_classes,
            fit.shapes.dim,
            device,
            statistics=statistics,
            reference=self._saved.reference,
            lagged_ncc=lagged,
            global_mean=config.global_mean,
            accumulate_dtype=config.dtype,
            sum_dtype=config.dtype if device.type == "mps" else None,  # MPS has no float64
        )

    # ------------------------------------------------------------------ compute and report

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        assert fit is not None
        epoch, fit.open = fit.open, None
        if epoch is None or self._saved.finished(epoch.epoch):
            return  # finished before the checkpoint this fit resumed from
        exact = self.config.mode == "exact"
        if epoch.partial and not exact:
            self._warn_once("partial", say.partial_epoch(epoch.epoch))
            self._saved.mark_finished(epoch.epoch)
            return
        step = epoch.step if epoch.step is not None else epoch_end_step(trainer, after_epoch_end=True)
        outcome = self._run_finish(trainer, pl_module, fit, epoch)
        if outcome.stage == "training steps":
            self._warn_failure(outcome, epoch.epoch)
            self._saved.mark_finished(epoch.epoch)
            return
        if outcome.stage:  # the exact pass failed on some rank: every rank gets here
            if not fit.exact_measured:
                raise MisconfigurationException(say.exact_failure(outcome.stage, outcome.failure, outcome.failed_ranks))
            self._warn_failure(outcome, epoch.epoch)
        record = build_record(outcome, epoch.epoch, step, exact=exact, partial=epoch.partial)
        self._commit(trainer, pl_module, fit, record, outcome)
        if epoch.plan.standby and epoch.accumulator is not None:
            fit.held = epoch  # measured if the fit ends with this epoch

    def _run_finish(
        self, trainer: Trainer, pl_module: LightningModule, fit: FitState, epoch: OpenEpoch, *, force: bool = False
    ) -> EpochOutcome:
        """Finish ``epoch`` on every rank; ``force``: measure NC whatever the schedule (the last epoch reached)."""
        if epoch.accumulator is None and fit.shapes is not None:  # no batch measured here: take part with nothing
            epoch.accumulator = self._accumulator(fit, pl_module.device, statistics=epoch.plan.accumulates)
        saved, exact = self._saved, self.config.mode == "exact"

        def decide(agreed: Agreement) -> bool:  # every rank, same counts: TPT, then whether NC is measured
            total = agreed.counts["total"]
            if not (epoch.partial or force) and total > 0:
                saved.tpt.update(epoch.epoch, agreed.counts["errors"] / total)
            if force or not exact:
                return force or epoch.plan.statistics
            return self.schedule.due(epoch.epoch, _limits(trainer), tpt_started=saved.tpt.started)

        shapes = fit.shapes
        return finish_epoch(
            self._group,
            epoch.local(pl_module.device, statistics=epoch.plan.statistics or force),
            decide=decide,
            exact=self._exact(trainer, pl_module, fit).run() if exact and shapes is not None else None,
            weights=lambda: fit.binding.parameters(shapes.num_classes, shapes.dim)[0] if shapes else None,
            global_mean=self.config.global_mean,
        )

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
                else batch_limit(trainer.limit_train_batches, _length(fit.exact_loader))
            )
            return ExactPass(
                pl_module,
                fit.exact_loader,
                fit.binding.capture,
                labels,
                self._input_getter,
                to_device=trainer.strategy.batch_to_device,
                context=trainer.precision_plugin.forward_context,
                max_batches=limit,
            )

        return ExactMeasurement(
            new_pass,
            lambda features: self._accumulator(fit, features.device, statistics=True, lagged=False),
            lambda: torch.zeros(0, shapes.dim, device=pl_module.device),
            shapes.num_classes,
            pl_module,
        )

    def _commit(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        fit: FitState,
        record: dict[str, float],
        outcome: EpochOutcome,
    ) -> None:
        saved, epoch = self._saved, int(record["epoch"])
        started = saved.tpt.epoch == epoch
        if started:
            record["tpt_epoch"] = epoch
        saved.commit(record)
        fit.last_finished = epoch
        if outcome.statistics is not None:
            saved.reference, self.last_statistics = reference_of(outcome), outcome.statistics
            fit.last_measured, fit.exact_measured = epoch, fit.exact_measured or self.config.mode == "exact"
        if started:
            rank_zero_info(
                f"NeuralCollapseCallback: the Terminal Phase of Training begins at epoch {epoch} "
                f"(training error {record.get('train_error', 0.0):.4g} <= {saved.tpt.threshold})."
            )
            try:
                self.on_tpt_start(trainer, pl_module, epoch)
            except Exception as err:  # a user's hook must not leave the other ranks waiting
                self._warn_rank(
                    f"NeuralCollapseCallback: on_tpt_start raised {err!r}; TPT stays recorded and training goes on."
                )
        if fit.shapes is not None:
            for key, message in say.epoch_warnings(outcome, epoch, fit.shapes.num_classes, self.config.prefix):
                self._warn_once(key, message)
        self.reporter.scalars(trainer, record)
        self.reporter.distributions(trainer, outcome.statistics, outcome.weight, int(record["step"]))

    def _measure_last_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the end of the fit, measure the last epoch reached if the schedule did not (every rank)."""
        fit = self._fit
        assert fit is not None
        last = self.history[-1] if self.history else None
        if last is None or int(last["epoch"]) != fit.last_finished or fit.last_measured == fit.last_finished:
            return
        epoch_index = int(last["epoch"])
        allowed = self.config.measure == "always" or (self.tpt_epoch is not None and self.tpt_epoch <= epoch_index)
        held = fit.held if fit.held is not None and fit.held.epoch == epoch_index else None
        if not allowed or (self.config.mode == "online" and held is None):
            return
        epoch = held or OpenEpoch(epoch_index, EpochPlan(statistics=False, standby=False))
        outcome = self._run_finish(trainer, pl_module, fit, epoch, force=True)
        if outcome.status != "measured":
            self._warn_failure(outcome, epoch_index)
            return
        extra = build_record(outcome, epoch_index, int(last["step"]), exact=self.config.mode == "exact", partial=True)
        new = {key: value for key, value in extra.items() if key not in last}
        last.update(new)
        self._saved.reference, self.last_statistics = reference_of(outcome), outcome.statistics
        self.reporter.scalars(trainer, {"step": last["step"], **new})
        self.reporter.distributions(trainer, outcome.statistics, outcome.weight, int(last["step"]))

    # ------------------------------------------------------------------ messages and clean-up

    def _warn_failure(self, outcome: EpochOutcome, epoch: int) -> None:
        if outcome.failure:  # this rank's own cause, on this rank
            self._warn_rank(f"NeuralCollapseCallback: epoch {epoch} not measured ({outcome.stage}): {outcome.failure}")
        self._warn_once(f"failed-{outcome.stage}", say.skipped_epoch(epoch, outcome.stage, outcome.failed_ranks))

    def _warn_rank(self, message: str) -> None:
        warnings.warn(rank_prefixed_message(message, self._group.rank), RuntimeWarning, stacklevel=3)

    def _warn_once(self, key: str, message: str) -> None:
        fit = self._fit
        if fit is not None and key in fit.warned:
            return
        if fit is not None:
            fit.warned.add(key)
        rank_zero_warn(message, category=RuntimeWarning)

    def _close(self) -> None:
        fit, self._fit = self._fit, None
        if fit is not None:
            if fit.first_step is not None and fit.first_step.probe is not None:
                fit.first_step.probe.stop()
            fit.binding.close()
        self._saved.restored = False


def _instances(trainer: Trainer) -> list[NeuralCollapseCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, NeuralCollapseCallback)]  # type: ignore[attr-defined]


def _limits(trainer: Trainer) -> Limits:
    stoppers = any(isinstance(cb, (EarlyStopping, Timer)) for cb in trainer.callbacks)  # type: ignore[attr-defined]
    max_steps = trainer.max_steps
    return Limits(trainer.max_epochs, open_ended=stoppers or (max_steps is not None and max_steps >= 0))


def _is_last_batch(trainer: Trainer) -> bool:
    """Whether the batch that just ended is the epoch's last (Lightning's own test, or ``max_steps`` reached)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    if progress.is_last_batch or progress.current.ready == trainer.num_training_batches:
        return True
    return trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _pads_samples(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    try:
        return len(loader.dataset) % sampler.num_replicas != 0  # type: ignore[arg-type]
    except TypeError:
        return False

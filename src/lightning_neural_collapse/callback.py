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

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, Timer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.metrics import NCCMismatch
from lightning_neural_collapse.pipeline.accumulate import COUNT_KEYS, Accumulator
from lightning_neural_collapse.pipeline.capture import Binding, CaptureShapeError
from lightning_neural_collapse.pipeline.compute import EpochOutcome, ExactRun, LocalEpoch, RankGroup, finish_epoch
from lightning_neural_collapse.pipeline.config import Config, DtypeChoice, GlobalMeanChoice, Measure, Mode
from lightning_neural_collapse.pipeline.diagnostics import epoch_warnings
from lightning_neural_collapse.pipeline.exact import ExactLoaderError, ExactPass, batch_limit, exact_loader
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
            mode=mode, classifier=classifier, features=features, num_classes=num_classes,
            label_getter=label_getter, input_getter=input_getter, exact_dataloader=exact_dataloader,
            ignore_index=ignore_index, every_n_epochs=every_n_epochs, measure=measure, tpt_threshold=tpt_threshold,
            global_mean=global_mean, prefix=prefix, log_histograms=log_histograms, log_figure=log_figure,
            accumulate_dtype=accumulate_dtype,
        )
        self.schedule = Schedule(every_n_epochs, measure)
        self.reporter = Reporter(prefix, log_histograms=log_histograms, log_figure=log_figure,
                                 figure_name=self.config.figure_name, global_mean=global_mean)
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
            rank_zero_info(f"NeuralCollapseCallback: using `{binding.name}` ({type(binding.module).__name__}) as "
                           "the classifier.")
        self._fit = fit = FitState(binding)
        fit.first_step = FirstStep(
            binding, num_classes=config.num_classes, label_getter=config.label_getter,
            ignore_index=config.ignore_index, input_getter=self._input_getter if config.mode == "exact" else None,
            probe=not compiled, warn=self._warn_once,
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
                rank_zero_info("NeuralCollapseCallback(mode='exact'): under DDP every rank measures with rank 0's "
                               "BatchNorm running statistics (as DDP's forward broadcasts them).")
        elif isinstance(loader, DataLoader) and _pads_samples(loader):
            rank_zero_warn(
                f"NeuralCollapseCallback(mode='online'): the DistributedSampler pads {len(loader.dataset)} samples "  # type: ignore[arg-type]
                f"to a multiple of {trainer.world_size} ranks, so each epoch counts up to {trainer.world_size - 1} "
                "samples twice. Use mode='exact' to count every sample exactly once.",
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

    # ------------------------------------------------------------------ internals

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
        fit.first_step = None
        fit.shapes = shapes
        fit.labels = LabelReader(self.config.label_getter, shapes.num_classes, self.config.ignore_index)
        if fit.binding.parameters(shapes.num_classes, shapes.dim)[0] is None:
            self._warn_once("no-weight", f"NeuralCollapseCallback: `{fit.binding.name}` has no ({shapes.num_classes} "
                            f"x {shapes.dim}) weight; NC2 of the weights and NC3 are not measured.")

    def _accumulate(self, fit: FitState, batch: Any) -> None:
        epoch = fit.open
        if epoch is None or epoch.failure is not None:
            return
        try:
            captured = fit.binding.capture.take()
        except CaptureShapeError as err:
            epoch.failure = str(err)
            self._warn_once("batch-error", f"NeuralCollapseCallback: {err}")
            return
        if captured is None:
            self._warn_once("no-forward", f"NeuralCollapseCallback: the classifier `{fit.binding.name}` did not run "
                            "in a training step; that batch is not measured. Set `classifier=` to the layer the "
                            "training step uses.")
            return
        if fit.binding.capture.calls > 1:
            self._warn_once("forwards", f"NeuralCollapseCallback: the classifier `{fit.binding.name}` ran "
                            f"{fit.binding.capture.calls} times in one training step (SAM, FixMatch, several views?); "
                            "each step's last forward is measured, and its samples must pair with the labels "
                            "(`label_getter=`).")
        if fit.shapes is None or fit.labels is None:
            return
        features, logits = captured
        try:
            labels = fit.labels.read(batch, features.device)
            if labels.shape[0] != features.shape[0]:
                self._warn_once("batch-size", f"NeuralCollapseCallback: {labels.shape[0]} labels for "
                                f"{features.shape[0]} features in a batch (mixup, several views, several "
                                "forwards?); such batches are skipped. Use `label_getter=`.")
                return
            if epoch.accumulator is None:
                epoch.accumulator = self._accumulator(fit, features, statistics=epoch.plan.accumulates, lagged=True)
            epoch.accumulator.update(features, logits, labels)
        except Exception as err:  # after the first step's checks, never stop the run
            epoch.failure = f"{type(err).__name__}: {err}"
            self._warn_once("batch-error", f"NeuralCollapseCallback: a training batch of epoch {epoch.epoch} could "
                            f"not be measured ({epoch.failure}); nothing is logged for such an epoch. If the batch "
                            "format changes during training, pass `label_getter=` (and `input_getter=` for "
                            "mode='exact').")

    def _accumulator(self, fit: FitState, features: Tensor, *, statistics: bool, lagged: bool) -> Accumulator:
        assert fit.shapes is not None
        device, config = features.device, self.config
        sum_dtype = None if device.type != "mps" else config.dtype  # MPS has no float64
        return Accumulator(
            fit.shapes.num_classes, fit.shapes.dim, device, statistics=statistics, reference=self._saved.reference,
            lagged_ncc=lagged, global_mean=config.global_mean, accumulate_dtype=config.dtype, sum_dtype=sum_dtype,
        )

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        assert fit is not None
        epoch, fit.open = fit.open, None
        if epoch is None or self._saved.finished(epoch.epoch):
            return  # finished before the checkpoint this fit resumed from
        exact = self.config.mode == "exact"
        if epoch.partial and not exact:
            self._warn_once("partial", f"NeuralCollapseCallback: epoch {epoch.epoch} resumed from a mid-epoch "
                            "checkpoint; its first batches were measured before it and their sums are lost, so "
                            "that epoch is not logged (and TPT is not decided on it). Measuring goes on with the "
                            "next epoch; mode='exact' measures resumed epochs in full.")
            self._saved.mark_finished(epoch.epoch)
            return
        step = epoch.step if epoch.step is not None else epoch_end_step(trainer, after_epoch_end=True)
        outcome = self._run_finish(trainer, pl_module, fit, epoch, exact=exact)
        if outcome.stage == "training steps":
            self._warn_failure(outcome, epoch.epoch)
            self._saved.mark_finished(epoch.epoch)
            return
        if outcome.stage:  # the exact pass failed on some rank
            if not fit.exact_measured:
                raise MisconfigurationException(self._exact_failure(outcome))
            self._warn_failure(outcome, epoch.epoch)
        record = build_record(outcome, epoch.epoch, step, exact=exact, partial=epoch.partial)
        self._commit(trainer, pl_module, fit, record, outcome)
        if epoch.plan.standby and epoch.accumulator is not None:
            fit.held = epoch  # measured if the fit ends with this epoch

    def _run_finish(
        self, trainer: Trainer, pl_module: LightningModule, fit: FitState, epoch: OpenEpoch, *, exact: bool,
        force: bool = False,
    ) -> EpochOutcome:
        if epoch.accumulator is None and fit.shapes is not None:  # no batch measured here: take part with nothing
            epoch.accumulator = self._accumulator(fit, _empty_features(pl_module, fit), statistics=epoch.plan.accumulates,
                                                  lagged=True)
        acc, saved = epoch.accumulator, self._saved
        failure = epoch.failure or (None if acc is not None else "no training batch measured on this rank yet")
        counts = acc.local_counts() if acc is not None else dict.fromkeys(COUNT_KEYS, 0)
        statistics = acc.statistics if acc is not None and (epoch.plan.statistics or force) else None
        local = LocalEpoch(counts, failure, statistics, pl_module.device)

        def decide(agreed: Any) -> bool:
            total = agreed.counts["total"]
            if not epoch.partial and total > 0 and not force:
                saved.tpt.update(epoch.epoch, agreed.counts["errors"] / total)
            if force:
                return True
            if exact:
                return self.schedule.due(epoch.epoch, _limits(trainer), tpt_started=saved.tpt.started)
            return epoch.plan.statistics

        shapes = fit.shapes
        return finish_epoch(
            self._group, local, decide=decide, exact=self._exact_run(trainer, pl_module, fit) if exact else None,
            weights=lambda: fit.binding.parameters(shapes.num_classes, shapes.dim)[0] if shapes else None,
            global_mean=self.config.global_mean,
        )

    def _exact_run(self, trainer: Trainer, pl_module: LightningModule, fit: FitState) -> ExactRun:
        def new_pass() -> ExactPass:
            assert fit.labels is not None
            loader = fit.exact_loader
            if loader is None:
                loader = fit.exact_loader = exact_loader(trainer.train_dataloader, trainer.world_size,
                                                         trainer.global_rank, self.config.exact_dataloader)
            user = self.config.exact_dataloader is not None
            limit = None if user else batch_limit(trainer.limit_train_batches, _length(loader))
            return ExactPass(pl_module, loader, fit.binding.capture, fit.labels, self._input_getter,
                             to_device=trainer.strategy.batch_to_device,
                             context=trainer.precision_plugin.forward_context, max_batches=limit)

        def statistics() -> Any:
            acc: Accumulator | None = None

            def consume(features: Tensor, logits: Tensor, labels: Tensor) -> None:
                nonlocal acc
                if acc is None:
                    acc = self._accumulator(fit, features, statistics=True, lagged=False)
                acc.update(features, logits, labels)

            if fit.shapes is None:
                raise RuntimeError("no training batch measured on this rank yet")
            new_pass().run(consume)
            if acc is None:  # an empty shard: take part with nothing
                acc = self._accumulator(fit, _empty_features(pl_module, fit), statistics=True, lagged=False)
            assert acc.statistics is not None
            return acc.statistics, acc.local_counts()

        def ncc(means: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
            metric = NCCMismatch(means, present).to(pl_module.device)
            num_classes = fit.shapes.num_classes if fit.shapes else 0

            def consume(features: Tensor, logits: Tensor, labels: Tensor) -> None:
                metric.update(features, logits, (labels >= 0) & (labels < num_classes))

            new_pass().run(consume)
            return metric.mismatches, metric.total

        return ExactRun(statistics, ncc, pl_module)

    def _commit(
        self, trainer: Trainer, pl_module: LightningModule, fit: FitState, record: dict[str, float],
        outcome: EpochOutcome,
    ) -> None:
        saved, epoch = self._saved, int(record["epoch"])
        started = saved.tpt.epoch == epoch and saved.record(epoch) is None
        if started:
            record["tpt_epoch"] = epoch
        saved.commit(record)
        fit.last_finished = epoch
        if outcome.statistics is not None:
            saved.reference = reference_of(outcome)
            self.last_statistics = outcome.statistics
            fit.last_measured = epoch
            fit.exact_measured = fit.exact_measured or self.config.mode == "exact"
        if started:
            rank_zero_info(f"NeuralCollapseCallback: the Terminal Phase of Training begins at epoch {epoch} "
                           f"(training error {record.get('train_error', 0.0):.4g} <= {saved.tpt.threshold}).")
            try:
                self.on_tpt_start(trainer, pl_module, epoch)
            except Exception as err:  # a user's hook must not leave the other ranks waiting
                warnings.warn(rank_prefixed_message(f"NeuralCollapseCallback: on_tpt_start raised {err!r}; TPT stays "
                                                    "recorded and training goes on.", trainer.global_rank),
                              RuntimeWarning, stacklevel=2)
        if fit.shapes is not None:
            for key, message in epoch_warnings(outcome, epoch, fit.shapes.num_classes, self.config.prefix):
                self._warn_once(key, message)
        self.reporter.scalars(trainer, record)
        self.reporter.distributions(trainer, outcome.statistics, outcome.weight, int(record["step"]))

    def _measure_last_epoch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the end of the fit: finish an epoch still open, and measure the last epoch reached if it was not."""
        fit = self._fit
        assert fit is not None
        if fit.open is not None:
            self._finish(trainer, pl_module)
        last = self.history[-1] if self.history else None
        if last is None or int(last["epoch"]) != fit.last_finished or fit.last_measured == fit.last_finished:
            return
        if not self._allowed(int(last["epoch"])):
            return
        exact = self.config.mode == "exact"
        held = fit.held if fit.held is not None and fit.held.epoch == int(last["epoch"]) else None
        if not exact and held is None:
            return
        epoch = held or OpenEpoch(int(last["epoch"]), EpochPlan(statistics=False, standby=False))
        outcome = self._run_finish(trainer, pl_module, fit, epoch, exact=exact, force=True)
        if outcome.status != "measured":
            self._warn_failure(outcome, epoch.epoch)
            return
        extra = build_record(outcome, epoch.epoch, int(last["step"]), exact=exact, partial=True)
        new = {key: value for key, value in extra.items() if key not in last}
        last.update(new)
        self._saved.reference = reference_of(outcome)
        self.reporter.scalars(trainer, {"step": last["step"], **new})
        self.reporter.distributions(trainer, outcome.statistics, outcome.weight, int(last["step"]))

    def _allowed(self, epoch: int) -> bool:
        return self.config.measure == "always" or (self.tpt_epoch is not None and self.tpt_epoch <= epoch)

    def _exact_failure(self, outcome: EpochOutcome) -> str:
        cause = outcome.failure or f"it failed on {outcome.failed_ranks} other rank(s); see their error"
        return (f"NeuralCollapseCallback(mode='exact'): the {outcome.stage} of the first measured epoch failed: "
                f"{cause}. Set `input_getter=` (batch -> model input: a tensor, a tuple of arguments or a dict of "
                "keyword arguments) or `exact_dataloader=` (the data to measure), or use mode='online'.")

    def _warn_failure(self, outcome: EpochOutcome, epoch: int) -> None:
        if outcome.failure:  # this rank's own cause, on this rank
            warnings.warn(rank_prefixed_message(f"NeuralCollapseCallback: epoch {epoch} not measured ("
                                                f"{outcome.stage}): {outcome.failure}", self._group.rank),
                          RuntimeWarning, stacklevel=2)
        self._warn_once(f"failed-{outcome.stage}", f"NeuralCollapseCallback: epoch {epoch} is not measured: "
                        f"{outcome.failed_ranks} rank(s) could not take part ({outcome.stage}); every rank skips it, "
                        "and training goes on.")

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
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    stoppers = any(isinstance(cb, (EarlyStopping, Timer)) for cb in callbacks)
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


def _empty_features(pl_module: LightningModule, fit: FitState) -> Tensor:
    import torch

    dim = fit.shapes.dim if fit.shapes is not None else 1
    return torch.zeros(0, dim, device=pl_module.device)


def _pads_samples(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    try:
        return len(loader.dataset) % sampler.num_replicas != 0  # type: ignore[arg-type]
    except TypeError:
        return False

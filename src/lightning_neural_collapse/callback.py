"""``NeuralCollapseCallback``: NC1-NC4 and the Terminal Phase of Training in any Lightning run.

The hooks only hand work to the pipeline (capture -> accumulate -> compute -> report): the binding to the
model (:mod:`~lightning_neural_collapse.pipeline.capture`), the first-step checks, the per-epoch sums, the
exact pass, the one place with collectives (:mod:`~lightning_neural_collapse.pipeline.compute`), the state
(:mod:`~lightning_neural_collapse.pipeline.run_state`) and the reporter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline import loop
from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.compute import RankGroup
from lightning_neural_collapse.pipeline.config import ClassSubset, Config, DtypeChoice, GlobalMeanChoice, Measure, Mode
from lightning_neural_collapse.pipeline.epoch_end import EpochEnd
from lightning_neural_collapse.pipeline.exact import (
    ExactLoaderError,
    exact_loader,
)
from lightning_neural_collapse.pipeline.first_step import FirstStep
from lightning_neural_collapse.pipeline.held_out import HeldOut
from lightning_neural_collapse.pipeline.layer_taps import LayerNotFoundError, LayerReduce
from lightning_neural_collapse.pipeline.probe import is_compiled
from lightning_neural_collapse.pipeline.run_state import FitState, OpenEpoch, SavedState
from lightning_neural_collapse.reporting._common import reset_warnings
from lightning_neural_collapse.reporting.reporter import Reporter


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
        ignore_index: a label value marking samples to leave out (default -100, as ``cross_entropy``).
        shift_labels: for sequence models, whose every position is a sample (a ``(B, T, C)`` output from
            ``(B, T, D)`` features, with ``(B, T)`` labels): ``True`` when the target of position ``t`` is
            ``labels[:, t + 1]`` (Hugging Face causal LMs shift inside their loss; the last position has no
            target), ``False`` when the labels are aligned already (nanoGPT-style ``(x, y)``). Default: automatic,
            ``True`` for a Hugging Face ``*ForCausalLM`` model, else ``False`` (said in an info message). An
            ``attention_mask`` in a dict batch is honoured.
        every_n_epochs: measure NC every this many epochs (epochs 0, n, 2n, ... and the last reached). The
            training error, and so TPT, is counted every epoch.
        every_n_train_steps: instead of epochs, measure windows of this many training steps (optimizer steps;
            online mode): each window is logged at its end, with its own ``train_error``; the shift and online
            NC4's means come from the previous window. For language models, which train about one epoch.
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
        classes: measure a subset of the classes, for speed at vocabulary scale: a number ``k`` (see
            ``classes_from``) or a list of class ids. Samples of other classes are left out, and NC4 compares
            the network's choice among the subset with the nearest mean of the subset. Recorded in the log
            (``nc/classes_measured``).
        classes_from: with ``classes=k``: ``"frequent"`` (default), the ``k`` classes with the most samples in the
            measurement, or ``"random"``, ``k`` classes drawn once with ``classes_seed``.
        classes_seed: the seed of ``classes_from="random"``.
        measure_val: when the fit validates, measure the validation batches in the validation step's own forward
            against the class means of the latest training measurement (held-out collapse, logged under
            ``{prefix}_val/``: ``ncc_accuracy``, ``nc4_ncc_mismatch``, ``accuracy``, ``mean_shift`` and the
            test-collapse keys ``nc1``, ``nc1_cdnv``, ``nc2_*_means``); default ``True``. Sanity checks are not
            measured.
        val_names: with several validation dataloaders, a name per loader for its tags
            (``nc_val/<name>/<key>``); default ``dataloader_<index>``. A single loader logs under ``nc_val/``.
        ncc_samples: online mode: count NC4 (against the previous means) on this many samples of each training
            batch, drawn with a private seeded generator, logged as ``nc4_ncc_mismatch_prev_means_sampled``;
            default every sample. It bounds NC4's cost at vocabulary scale (one ``B x C x D`` product per step).
        layers: hidden layers to measure too, in the same forward: dotted module names or globs per dotted part
            (``["layer*"]`` selects ``layer1`` ... ``layer4``), measured in depth order. Each output is flattened to
            ``(batch, D_l)`` (token models: one row per position) and logged under ``{prefix}/layers/<name>/``:
            ``nc1_trace_ratio``, ``nc1_cdnv``, ``nc2_{equinorm,equiangular,maxangle,etf_distance}_means``, and NC1
            through ``pinv`` of the layer's centred means with ``ncc_accuracy``: exact mode from its second pass,
            online against the previous measurement's means (``nc1_prev_means``, ``ncc_accuracy_prev_means``); plus
            He & Su's fit of ``log NC1`` against depth (``layers/nc1_depth_{slope,ratio,pearson_r}``). Memory
            ``O(C * D_l)`` per layer, no ``D_l x D_l`` matrix. Validation adds
            ``{prefix}_val/layers/<name>/ncc_accuracy``.
        layer_reduce: ``"flatten"`` (default) or ``"avgpool"``: average each ``(batch, channels, ...)`` output over its
            spatial dimensions first; the tag then reads ``<name>@avgpool``.

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
        ignore_index: int | None = -100,
        shift_labels: bool | None = None,
        every_n_epochs: int = 1,
        every_n_train_steps: int | None = None,
        measure: Measure = "always",
        tpt_threshold: float = 0.0,
        global_mean: GlobalMeanChoice = "classes",
        prefix: str = "nc",
        log_histograms: bool = True,
        log_figure: bool = True,
        accumulate_dtype: DtypeChoice = "float64",
        classes: int | list[int] | None = None,
        classes_from: ClassSubset = "frequent",
        classes_seed: int = 0,
        measure_val: bool = True,
        val_names: list[str] | None = None,
        ncc_samples: int | None = None,
        layers: list[str] | None = None,
        layer_reduce: LayerReduce = "flatten",
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
            shift_labels=shift_labels,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            measure=measure,
            tpt_threshold=tpt_threshold,
            global_mean=global_mean,
            prefix=prefix,
            log_histograms=log_histograms,
            log_figure=log_figure,
            accumulate_dtype=accumulate_dtype,
            classes=tuple(classes) if isinstance(classes, list) else classes,
            classes_from=classes_from,
            classes_seed=classes_seed,
            measure_val=measure_val,
            val_names=tuple(val_names) if isinstance(val_names, list) else val_names,
            ncc_samples=ncc_samples,
            layers=tuple(layers) if isinstance(layers, list) else layers,
            layer_reduce=layer_reduce,
        )
        self.reporter = Reporter(
            prefix,
            log_histograms=log_histograms,
            log_figure=log_figure,
            figure_name=self.config.figure_name,
            global_mean=global_mean,
            title=f"Neural Collapse ({mode} mode)",
        )
        self._saved = SavedState(tpt_threshold, unit_key="window" if self.config.windows else "epoch")
        self._fit: FitState | None = None
        self._end = EpochEnd(self.config, self._saved, self.reporter, self._tpt_started, RankGroup())
        self._held_out = HeldOut(
            self.config,
            self._saved,
            self.reporter,
            RankGroup(),
            # no lambda (ddp_spawn pickles callbacks); validation counts every sample
            functools.partial(self._end.accumulator, statistics=True, sample_ncc=False, held_out=True),
        )
        self.figure_path: str | None = None
        """Where the figure was saved at the end of the last ``fit`` (``None`` if not saved)."""
        self.depth_figure_path: str | None = None
        """With ``layers=``: where the progressive-collapse figure was saved at the end of the last ``fit``."""

    # ------------------------------------------------------------------ public API

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per finished epoch: ``epoch``, ``step``, ``train_error``, ``skipped_samples`` and the keys
        measured that epoch."""
        return self._saved.history

    @property
    def val_history(self) -> list[dict[str, float]]:
        """One dict per measured validation run: ``epoch``, ``step`` and the held-out keys (``<loader>/<key>`` with
        several validation dataloaders), as logged under ``{prefix}_val/``."""
        return self._saved.val_history

    @property
    def tpt_epoch(self) -> int | None:
        """First epoch (0-based ``trainer.current_epoch``) of the Terminal Phase of Training, or ``None``; with
        ``every_n_train_steps``, the epoch in which the first window of TPT ended."""
        if not self.config.windows or self._saved.tpt.epoch is None:
            return self._saved.tpt.epoch
        record = self._saved.record(self._saved.tpt.epoch)
        return None if record is None else int(record["epoch"])

    @property
    def tpt_step(self) -> int | None:
        """The logging step at the end of the epoch (or window) where TPT began, or ``None``."""
        record = None if self._saved.tpt.epoch is None else self._saved.record(self._saved.tpt.epoch)
        return None if record is None else int(record["step"])

    @property
    def last_statistics(self) -> ClassStatistics | None:
        """The per-class statistics (counts, means, ``Sigma_W``, variances; float64, summed over ranks) of the
        latest measurement of this fit, or ``None``."""
        return self._end.last_statistics

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
        self.figure_path = self.depth_figure_path = self._end.last_statistics = None
        reset_warnings()
        self.reporter.start_fit(loop.last_unit(trainer, self.config.every_n_train_steps))
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            rank_zero_info("NeuralCollapseCallback: disabled under `fast_dev_run`, nothing is measured.")
            return
        config, compiled = self.config, is_compiled(pl_module)
        try:
            binding = Binding(
                pl_module,
                config.classifier,
                config.features,
                count_calls=not compiled,
                layers=config.layers,
                layer_reduce=config.layer_reduce,
            )
        except LayerNotFoundError as err:
            raise MisconfigurationException(f"NeuralCollapseCallback: {err}") from err
        if binding.automatic:
            rank_zero_info(
                f"NeuralCollapseCallback: using `{binding.name}` ({type(binding.module).__name__}) as the classifier."
            )
        tied = binding.tied_to()
        if tied is not None:
            rank_zero_info(
                f"NeuralCollapseCallback: the weight of `{binding.name}` is tied to `{tied}` (weight tying): "
                "NC2 of the weights and NC3 compare the class means with that embedding matrix."
            )
        shift, shift_reason = _shift_labels(pl_module, config.shift_labels)
        self._fit = fit = FitState(binding, shift_labels=shift)
        fit.first_step = FirstStep(
            binding,
            num_classes=config.num_classes,
            label_getter=config.label_getter,
            ignore_index=config.ignore_index,
            input_getter=self._end.input_getter if config.mode == "exact" else None,
            probe=not compiled,
            warn=fit.warn,
            shift_labels=fit.shift_labels,
            shift_reason=shift_reason,
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
        elif isinstance(loader, DataLoader) and loop.pads_samples(loader):
            rank_zero_warn(
                say.padded_sampler(len(loader.dataset), trainer.world_size),  # type: ignore[arg-type]
                category=RuntimeWarning,
            )
        instances = _instances(trainer)
        if instances and instances[0] is self:  # one layout for every instance: a run keeps only the last
            validates = loop.has_validation(trainer, pl_module)
            held_out = [cb.config.prefix for cb in instances if cb.config.measure_val and validates]
            layered = [cb.config.prefix for cb in instances if cb.config.layers]
            self.reporter.dashboard(trainer, [cb.config.prefix for cb in instances], held_out, layered)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        fit = self._fit
        if fit is None:
            return
        fit.binding.capture.clear()
        steps = self.config.every_n_train_steps
        unit, partial = (trainer.current_epoch, batch_idx > 0) if steps is None else divmod(trainer.global_step, steps)
        if fit.open is None or fit.open.epoch != unit:
            fit.held = None  # a new unit began: the one on standby was not the last
            fit.open = OpenEpoch(unit, self._end.plan(trainer), partial=bool(partial))
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
        steps, open_unit = self.config.every_n_train_steps, fit.open
        if open_unit is not None and steps is not None:  # a window ends with its K-th optimizer step
            open_unit.step, open_unit.current_epoch = (
                loop.epoch_end_step(trainer, after_epoch_end=False),
                trainer.current_epoch,
            )
            if trainer.global_step >= (open_unit.epoch + 1) * steps:
                self._finish(trainer, pl_module)
        elif open_unit is not None and loop.is_last_batch(trainer):
            open_unit.step = loop.epoch_end_step(trainer, after_epoch_end=False)
            if self.config.mode == "online":
                self._finish(trainer, pl_module)
            # exact mode runs the model: not before the other callbacks and the module have seen this batch

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        if fit is None or fit.open is None or fit.open.step is None or trainer.sanity_checking or self.config.windows:
            return
        self._finish(trainer, pl_module)  # the validation right after an epoch's last batch, before its checkpoint

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is not None:
            self._held_out.open(trainer, self._fit)  # after on_validation_start: the training means are final

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._fit is not None and self._fit.validation is not None:
            self._fit.binding.capture.clear()

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._fit is not None:
            self._held_out.add(trainer, self._fit, batch, dataloader_idx)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is not None:
            self._held_out.finish(trainer, pl_module, self._fit)  # before ModelCheckpoint's on_validation_end

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        fit = self._fit
        if (
            fit is not None
            and fit.open is not None
            and fit.open.epoch == trainer.current_epoch
            and not self.config.windows
        ):
            if fit.open.step is None:  # an epoch cut short (max_steps, a stop)
                fit.open.step = loop.epoch_end_step(trainer, after_epoch_end=True)
            self._finish(trainer, pl_module)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fit is None:
            return
        if self._fit.open is not None:
            self._finish(trainer, pl_module)
        self._end.measure_last_epoch(trainer, pl_module, self._fit)
        tpt = self.tpt_step if self.config.windows else self.tpt_epoch
        self.figure_path = self.reporter.final_figure(
            trainer, self.history, tpt, val_history=self.val_history, depth_tpt=self.tpt_epoch
        )
        self.depth_figure_path = self.reporter.depth_figure_path

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

    def _tpt_started(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        self.on_tpt_start(trainer, pl_module, epoch)  # looked up at call time: overrides and patches apply

    def _first_step_done(self, loss: Tensor | None) -> None:
        assert self._fit is not None
        fit = self._fit
        fit.finish_first_step(loss, self.config.label_getter, self.config.ignore_index, shift=fit.shift_labels)
        if fit.first_step is None and fit.shapes is not None:  # done: C is known
            self._end.choose_classes(fit, fit.binding.model.device)  # type: ignore[arg-type]

    def _accumulate(self, fit: FitState, batch: Any) -> None:
        fit.accumulate(batch, lambda device, statistics: self._end.accumulator(fit, device, statistics=statistics))

    def _finish(self, trainer: Trainer, pl_module: LightningModule) -> None:
        assert self._fit is not None
        self._end.finish(trainer, pl_module, self._fit)

    # ------------------------------------------------------------------ messages and clean-up

    def _close(self) -> None:
        fit, self._fit = self._fit, None
        if fit is not None:
            fit.close()
        self._saved.restored = False


def _instances(trainer: Trainer) -> list[NeuralCollapseCallback]:
    return [cb for cb in trainer.callbacks if isinstance(cb, NeuralCollapseCallback)]  # type: ignore[attr-defined]


def _shift_labels(model: LightningModule, option: bool | None) -> tuple[bool, str]:
    """``shift_labels``, resolved: the option, else ``True`` for a Hugging Face ``*ForCausalLM`` model; and why."""
    if option is not None:
        return option, f"shift_labels={option}"
    causal = next((type(m).__name__ for m in model.modules() if type(m).__name__.endswith("ForCausalLM")), None)
    if causal is not None:
        return True, f"automatic: `{causal}` is named like a Hugging Face causal LM, which shifts labels in its loss"
    return False, "automatic: no Hugging Face *ForCausalLM in the model; set shift_labels=True if it shifts them"

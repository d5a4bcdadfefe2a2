"""``NeuralCollapseCallback``: NC1-NC4 and the Terminal Phase of Training in any Lightning run."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from typing_extensions import override

from lightning_neural_collapse.batch import (
    BatchFormatError,
    ClassCountError,
    check_targets,
    class_indices,
    default_input_getter,
    default_label_getter,
)
from lightning_neural_collapse.capture import FeatureCapture, classifier_parameters, find_classifier
from lightning_neural_collapse.error import ClassificationError
from lightning_neural_collapse.exact import exact_loader, observing
from lightning_neural_collapse.functional.collapse import NC4_KEY, metrics_from_statistics
from lightning_neural_collapse.functional.etf_deviation import etf_deviation, ideal_values
from lightning_neural_collapse.functional.statistics import ClassStatistics
from lightning_neural_collapse.metric import NeuralCollapse
from lightning_neural_collapse.ncc import NCCMismatch
from lightning_neural_collapse.probe import FinalLayerProbe, is_compiled
from lightning_neural_collapse.reporting import (
    log_dashboard,
    log_figure,
    log_histograms,
    log_scalars,
    plot_history,
    save_figure,
)
from lightning_neural_collapse.reporting._common import reset_warnings
from lightning_neural_collapse.reporting.capabilities import log_dir as logger_dir
from lightning_neural_collapse.tpt import TPTDetector

Mode = Literal["online", "exact"]
Measure = Literal["always", "tpt"]
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
FIGURE_NAME = "neural_collapse.png"


class NeuralCollapseCallback(Callback):
    r"""Measure Neural Collapse (Papyan, Han & Donoho, 2020) on the training set while a model trains.

    Every measured epoch it logs ``{prefix}/<key>`` for each metric of SPEC.md (``nc1``,
    ``nc2_equinorm_means``, ..., ``nc4_ncc_mismatch``), every epoch ``{prefix}/train_error``, and once
    ``{prefix}/tpt_epoch`` when the Terminal Phase of Training begins (the first epoch whose training
    error is at most ``tpt_threshold``). On loggers that support them it also writes histograms of the
    distance to a simplex ETF and a TensorBoard dashboard; at the end of ``fit`` a figure of the
    paper's panels. Everything stays in :attr:`history` too.

    The features are the input of the classifier layer and the predictions its output, captured by a
    forward hook: nothing in the model or the training step changes, and the final weights of a run
    are bit-identical with and without the callback.

    Args:
        mode: ``"online"`` (default) accumulates the features the training steps produce (no extra
            forward pass; the model changes during the epoch, and NC4 uses the class means of the
            previous measurement). ``"exact"``, as in the paper: at the end of a measured epoch the
            model runs in eval mode, without gradients, twice over the whole training set (class means,
            then NC4), through a non-shuffled loader with the training batch size and collate function.
        classifier: dotted name of the final layer (its output are the logits). Default: the module
            returned by a timm-style ``get_classifier()``, else the last ``nn.Linear``.
        features: dotted name of a module whose output are the penultimate features, when they are not
            the classifier's input (for example a head that pools inside).
        num_classes: number of classes; default: the classifier's number of outputs.
        label_getter: function ``batch -> labels``; default: ``batch[1]`` of a tuple/list, or the
            ``label``/``labels``/``y``/``target``/``targets`` entry of a dict. Labels may be class
            indices or one-hot/soft ``(batch, classes)`` targets (argmax).
        input_getter: function ``batch -> model input`` for ``mode="exact"``; default: ``batch[0]`` or the
            ``x``/``input``/``inputs``/``image``/``images`` entry of a dict.
        ignore_index: a label value marking samples to leave out.
        every_n_epochs: measure NC every this many epochs (epochs 0, n, 2n, ... and the last). The
            training error, and so TPT, is tracked every epoch.
        measure: ``"always"`` (default) or ``"tpt"``: measure NC only once TPT has begun.
        tpt_threshold: training error at or below which TPT begins (default 0.0: zero errors).
        global_mean: ``"classes"`` (mean of the class means, default) or ``"sample"`` (mean of all samples).
        prefix: first part of every logged tag.
        log_histograms: write ETF-deviation histograms (quantile scalars on loggers without histograms).
        log_figure: at the end of ``fit``, log a figure of the NC panels and save it as
            ``neural_collapse.png`` in the log directory.
        accumulate_dtype: ``"float64"`` (default) or ``"float32"`` for the streaming statistics
            (float32 stays accurate thanks to the per-class shift and is faster on consumer GPUs).

    Example::

        trainer = Trainer(callbacks=[NeuralCollapseCallback()], max_epochs=100)
    """

    _capture: FeatureCapture | None
    _classifier_module: nn.Module | None
    _num_classes: int | None
    _dim: int | None
    _error: ClassificationError | None
    _stats: NeuralCollapse | None
    _ncc: NCCMismatch | None
    _probe: FinalLayerProbe | None
    _pending_batch: Any
    _warned: set[str]

    def __init__(
        self,
        mode: Mode = "online",
        classifier: str | None = None,
        features: str | None = None,
        num_classes: int | None = None,
        label_getter: Callable[[Any], Any] | None = None,
        input_getter: Callable[[Any], Any] | None = None,
        ignore_index: int | None = None,
        every_n_epochs: int = 1,
        measure: Measure = "always",
        tpt_threshold: float = 0.0,
        global_mean: Literal["classes", "sample"] = "classes",
        prefix: str = "nc",
        log_histograms: bool = True,
        log_figure: bool = True,
        accumulate_dtype: Literal["float64", "float32"] = "float64",
    ) -> None:
        _check_choice("mode", mode, ("online", "exact"))
        _check_choice("measure", measure, ("always", "tpt"))
        _check_choice("global_mean", global_mean, ("classes", "sample"))
        _check_choice("accumulate_dtype", accumulate_dtype, tuple(_DTYPES))
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise MisconfigurationException(f"`every_n_epochs` must be a positive integer, got {every_n_epochs!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise MisconfigurationException(f"`num_classes` must be an integer >= 2, got {num_classes!r}")
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise MisconfigurationException(f"`prefix` must be a non-empty tag such as 'nc', got {prefix!r}")
        for name, getter in (("label_getter", label_getter), ("input_getter", input_getter)):
            if getter is not None and not callable(getter):
                raise MisconfigurationException(f"`{name}` must be callable (batch -> tensor), got {getter!r}")
        try:
            self._tpt = TPTDetector(tpt_threshold)
        except ValueError as err:
            raise MisconfigurationException(str(err)) from err
        self.mode = mode
        self.classifier = classifier
        self.features = features
        self.num_classes = num_classes
        self.label_getter = label_getter or default_label_getter
        self.input_getter = input_getter or default_input_getter
        self.ignore_index = ignore_index
        self.every_n_epochs = every_n_epochs
        self.measure = measure
        self.global_mean = global_mean
        self.prefix = prefix
        self.log_histograms = log_histograms
        self.log_figure = log_figure
        self.accumulate_dtype = accumulate_dtype
        self.history: list[dict[str, float]] = []
        """One dict per epoch: ``epoch``, ``step``, ``train_error`` and the metric keys measured that epoch."""
        self.figure_path: str | None = None
        """Where the figure was saved at the end of the last ``fit`` (``None`` if not saved)."""
        self._reset_run_state()
        self._reference_means: Tensor | None = None
        self._reference_present: Tensor | None = None
        self._restored = False  # load_state_dict ran since the last fit: continue that run

    # ------------------------------------------------------------------ public API

    @property
    def tpt_epoch(self) -> int | None:
        """First epoch (0-based ``trainer.current_epoch``) of the Terminal Phase of Training, or ``None``."""
        return self._tpt.epoch

    @property
    def state_key(self) -> str:
        return self._generate_state_key(classifier=self.classifier, features=self.features, prefix=self.prefix)

    def on_tpt_start(self, trainer: Trainer, pl_module: LightningModule, epoch: int) -> None:
        """Called once, on every rank, at the end of the epoch where TPT begins. Override to react."""

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        same_prefix = [cb for cb in callbacks if isinstance(cb, NeuralCollapseCallback) and cb.prefix == self.prefix]
        if len(same_prefix) > 1:
            raise MisconfigurationException(
                f"{len(same_prefix)} NeuralCollapseCallback instances log under `prefix={self.prefix!r}`; "
                "give each its own `prefix=` (for example 'nc/layer3')."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset_run_state()
        if not self._restored and trainer.global_step == 0 and trainer.current_epoch == 0:
            self._new_run()  # a fresh run, not a resumed or continued one: nothing of an earlier fit carries over
        reset_warnings()  # the reporting warnings too are once per run
        if trainer.fast_dev_run:  # type: ignore[attr-defined]
            rank_zero_info("NeuralCollapseCallback: disabled under `fast_dev_run`, nothing is measured.")
            return
        name, module = find_classifier(pl_module, self.classifier)
        features_module = None
        if self.features is not None:
            try:
                features_module = pl_module.get_submodule(self.features)
            except AttributeError as err:
                raise MisconfigurationException(
                    f"`features={self.features!r}` is not a submodule of {type(pl_module).__name__}"
                ) from err
        declared = getattr(module, "out_features", None)
        if self.num_classes is not None and declared is not None and declared != self.num_classes:
            raise MisconfigurationException(
                f"`num_classes={self.num_classes}` but the classifier `{name}` has {declared} outputs; set "
                "`num_classes=` to match, or `classifier=` to the layer that produces the logits."
            )
        if self.classifier is None:
            rank_zero_info(f"NeuralCollapseCallback: using `{name}` ({type(module).__name__}) as the classifier.")
        self._classifier_name, self._classifier_module = name, module
        self._num_classes = self.num_classes or declared
        self._capture = FeatureCapture(module, features_module)
        self._capture.attach()
        if self.classifier is None and not is_compiled(pl_module):
            # found by a heuristic: check in the first step that nothing with weights runs on its output
            self._probe = FinalLayerProbe(pl_module, module)
        self._active = True

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        loader = trainer.train_dataloader
        if self.mode == "exact":
            if not isinstance(loader, DataLoader):
                raise MisconfigurationException(
                    "mode='exact' needs a single torch DataLoader for training; use mode='online' instead."
                )
            try:
                exact_loader(loader)
            except TypeError as err:
                raise MisconfigurationException(str(err)) from err
        elif isinstance(loader, DataLoader) and _pads_samples(loader):
            rank_zero_warn(
                f"NeuralCollapseCallback(mode='online'): the DistributedSampler pads {len(loader.dataset)} samples "  # type: ignore[arg-type]
                f"to a multiple of {trainer.world_size} ranks, so each epoch counts up to {trainer.world_size - 1} "
                "samples twice. Use mode='exact' to count every sample exactly once.",
                category=RuntimeWarning,
            )
        if trainer.is_global_zero:
            log_dashboard(trainer.loggers, self.prefix)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active:
            self._epoch_pending = True
            self._epoch_broken = False

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        if self._capture is not None:
            self._capture.clear()
        if self._first_pending:
            self._pending_batch = batch  # for the checks after the first forward (on_before_backward)
            if self._probe is not None:
                self._probe.start()
        if not self._batch_checked:
            self._check_first_batch(batch)

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._active and self._first_pending:
            self._check_first_forward(loss)  # before the first backward and optimizer step

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or self._capture is None:
            return
        if self._first_pending:
            self._check_first_forward()  # no backward ran in this step: check now
        captured = self._capture.take()
        if captured is None:
            self._warn_once(
                "no-forward",
                f"NeuralCollapseCallback: the classifier `{self._classifier_name}` did not run in a training step; "
                "that batch is not measured. Set `classifier=` to the layer the training step uses.",
            )
            return
        features, logits = captured
        if self._error is None:
            self._allocate(features, logits)
            if not self._batch_checked:
                self._check_first_batch(batch)
        try:
            self._accumulate(trainer, batch, features, logits)
        except Exception as err:  # after the checks of the first step, never stop the run
            self._epoch_broken = True
            self._warn_once(
                "batch-error",
                f"NeuralCollapseCallback: a training batch of epoch {trainer.current_epoch} could not be measured "
                f"({type(err).__name__}: {err}); nothing is logged for such an epoch. If the batch format changes "
                "during training, pass `label_getter=` (and `input_getter=` for mode='exact').",
            )

    def _accumulate(self, trainer: Trainer, batch: Any, features: Tensor, logits: Tensor) -> None:
        labels = self._labels(batch, features.device)
        if labels.shape[0] != features.shape[0]:
            self._warn_once(
                "batch-size",
                f"NeuralCollapseCallback: {labels.shape[0]} labels for {features.shape[0]} features in a batch "
                "(mixup, several views, several forwards?); such batches are skipped. Use `label_getter=`.",
            )
            return
        if self._epoch_pending:
            self._begin_epoch(trainer)
        assert self._error is not None
        self._error.update(logits, labels)
        if self._measuring and self._stats is not None:
            self._stats.update(features, labels)
            if self._ncc is not None:
                self._ncc.update(_only_labelled(features, labels, self._num_classes), logits)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active:
            return
        if self._epoch_pending and self._error is not None:
            self._begin_epoch(trainer)  # no batch on this rank this epoch: take part in the collectives with nothing
        epoch = trainer.current_epoch
        # one decision for all ranks (a rank that returned alone would leave the others hanging in a collective)
        unready = self._error is None or self._epoch_pending  # this rank has not run a single batch yet
        if trainer.strategy.reduce_boolean_decision(self._epoch_broken or unready, all=False):
            if trainer.world_size > 1 and not self._epoch_broken:
                self._warn_once("other-rank", f"NeuralCollapseCallback: epoch {epoch} is not measured: a rank "
                                "could not measure a batch or has not run a training batch yet.")
            return  # some batch could not be measured (warned): log nothing rather than a partial number
        assert self._error is not None
        errors, total = self._error.counts()
        if total == 0:
            return
        record: dict[str, float] = {"epoch": epoch, "step": trainer.global_step, "train_error": errors / total}
        stats, weight = None, None
        measured = self._measuring or (self.mode == "exact" and self._wants_exact(trainer, epoch, errors / total))
        if measured:
            try:
                stats, weight, values = self._measure(trainer, pl_module)
                record.update(values)
            except Exception as err:  # a measurement problem must never stop the run
                self._warn_once("measure", f"NeuralCollapseCallback: epoch {epoch} not measured: {err!r}")
                stats = None
        if self._tpt.update(epoch, record["train_error"]):
            record["tpt_epoch"] = epoch
            rank_zero_info(
                f"NeuralCollapseCallback: the Terminal Phase of Training begins at epoch {epoch} "
                f"(training error {record['train_error']:.4g} <= {self._tpt.threshold})."
            )
            self.on_tpt_start(trainer, pl_module, epoch)
        self.history.append(record)
        try:
            self._report(trainer, record, stats, weight)
        except Exception as err:  # reporting never stops the run
            self._warn_once("report", f"NeuralCollapseCallback: epoch {epoch} not fully reported: {err!r}")
        if stats is not None:
            self._reference_means = stats.means.detach().cpu()
            self._reference_present = stats.present.detach().cpu()

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._active and self.log_figure and trainer.is_global_zero and trainer.loggers and self.history):
            return
        try:
            figure = plot_history(self.history, self.tpt_epoch, title=f"Neural Collapse ({self.mode} mode)")
            log_figure(trainer.loggers, figure, step=trainer.global_step, tag=f"{self.prefix}/figure")
            # not `trainer.log_dir`: it broadcasts (a collective) and only rank 0 gets here, so DDP would hang
            log_dir = logger_dir(trainer.loggers[0]) or trainer.default_root_dir
            if log_dir is not None:
                self.figure_path = save_figure(figure, os.path.join(log_dir, FIGURE_NAME))
        except Exception as err:  # a lost figure must not fail a finished run
            self._warn_once(
                "figure", f"NeuralCollapseCallback: no figure ({type(err).__name__}: {err}); set `log_figure=False` "
                "to skip it. The scalars and `history` are complete."
            )

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach()  # the history of the finished epochs stays
        self._restored = False

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._detach()
            self._restored = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [dict(r) for r in self.history],
            **self._tpt.state_dict(),
            "reference_means": self._reference_means,
            "reference_present": self._reference_present,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state_dict.get("history", [])]
        self._tpt.load_state_dict(state_dict)
        self._reference_means = state_dict.get("reference_means")
        self._reference_present = state_dict.get("reference_present")
        self._restored = True

    # ------------------------------------------------------------------ internals

    def _new_run(self) -> None:
        """Forget an earlier fit (history, TPT, class means): a new ``fit`` from step 0 is a new run."""
        self.history = []
        self._tpt = TPTDetector(self._tpt.threshold)
        self._reference_means = self._reference_present = None
        self.figure_path = None

    def _reset_run_state(self) -> None:
        self._active = False
        self._capture = None
        self._classifier_name = ""
        self._classifier_module = None
        self._num_classes = None
        self._dim = None
        self._error = None
        self._stats = None
        self._ncc = None
        self._measuring = False
        self._epoch_pending = False
        self._epoch_broken = False
        self._batch_checked = False
        self._first_pending = True
        self._pending_batch = None
        self._probe = None
        self._warned = set()

    def _detach(self) -> None:
        if self._probe is not None:
            self._probe.stop()
        self._probe = self._pending_batch = None
        if self._capture is not None:
            self._capture.remove()
        self._capture = None
        self._active = False
        self._stats = self._ncc = self._error = None

    def _check_first_batch(self, batch: Any) -> None:
        """Validate labels (and inputs in exact mode) once, before the first optimizer step when possible."""
        if self._num_classes is None:
            return  # known after the first forward; checked then
        try:
            check_targets(self.label_getter(batch), self._num_classes, self.ignore_index)
        except ClassCountError as err:  # say where the number of classes comes from
            source = "`num_classes`" if self.num_classes is not None else f"the outputs of `{self._classifier_name}`"
            hint = "" if self.num_classes is not None else (
                " If that layer is not the one producing the logits, set `classifier=`."
            )
            raise ClassCountError(
                f"NeuralCollapseCallback ({self._num_classes} classes from {source}): {err}{hint}"
            ) from None
        except BatchFormatError as err:
            raise BatchFormatError(f"NeuralCollapseCallback: {err}") from None
        if self.mode == "exact":
            self.input_getter(batch)
        self._batch_checked = True

    def _check_first_forward(self, loss: Tensor | None = None) -> None:
        """Once, after the first training forward: the found classifier is the final layer, the logits match
        the classes, the labels are valid. Raises before the first backward when the step has one."""
        self._first_pending = False
        probe, self._probe = self._probe, None
        batch, self._pending_batch = self._pending_batch, None
        if probe is not None:
            try:
                others = probe.other_heads(loss)
            finally:
                probe.stop()
            if others and not probe.consumers:
                self._warn_once(
                    "other-heads",
                    f"NeuralCollapseCallback took `{self._classifier_name}` as the classifier (the last nn.Linear), "
                    f"but {', '.join(f'`{n}`' for n in others)} also feed(s) the loss (auxiliary or projection "
                    "heads?). If the logits come from another layer, set `classifier=` to it; set "
                    f"`classifier='{self._classifier_name}'` to confirm this choice and silence this warning.",
                )
            if probe.consumers:
                assert self._classifier_module is not None
                after = probe.consumers[-1]
                raise MisconfigurationException(
                    f"NeuralCollapseCallback found `{self._classifier_name}` "
                    f"({type(self._classifier_module).__name__}) as the classifier, but `{after}` runs on its output "
                    f"in the training step, so its output is not the logits. Set `classifier='{after}'` (and "
                    "`features=` if the penultimate features are not that layer's input); if "
                    f"`{self._classifier_name}` is the classifier after all, set "
                    f"`classifier='{self._classifier_name}'`."
                )
        assert self._capture is not None
        captured = self._capture.peek()
        if captured is None:
            return  # the classifier did not run: warned in on_train_batch_end
        if self._error is None:
            self._allocate(*captured)
        if not self._batch_checked and batch is not None:
            self._check_first_batch(batch)

    def _allocate(self, features: Tensor, logits: Tensor) -> None:
        num_classes = logits.shape[1]
        if self._num_classes is not None and num_classes != self._num_classes:
            raise MisconfigurationException(
                f"the classifier `{self._classifier_name}` outputs {num_classes} values per sample but "
                f"`num_classes={self._num_classes}`; set `classifier=` to the layer producing the logits."
            )
        if num_classes < 2:
            raise MisconfigurationException(
                f"the classifier `{self._classifier_name}` outputs {num_classes} value(s) per sample; Neural "
                "Collapse needs a multi-class classifier. Set `classifier=` to the layer producing the logits."
            )
        self._num_classes, self._dim = num_classes, features.shape[1]
        if self._weight_and_bias()[0] is None:
            self._warn_once(
                "no-weight",
                f"NeuralCollapseCallback: `{self._classifier_name}` has no ({num_classes} x {self._dim}) weight; "
                "NC2 of the weights and NC3 are not measured.",
            )
        self._error = ClassificationError(num_classes).to(features.device)

    def _labels(self, batch: Any, device: torch.device) -> Tensor:
        """Class indices; ``-1`` for ``ignore_index`` (dropped silently), ``num_classes`` for an invalid target
        (dropped and counted), without host-device sync."""
        assert self._num_classes is not None
        return class_indices(self.label_getter(batch), self._num_classes, self.ignore_index).to(
            device, non_blocking=True
        )

    def _new_statistics(self, device: torch.device) -> NeuralCollapse:
        assert self._num_classes is not None and self._dim is not None
        stats = NeuralCollapse(
            self._num_classes,
            self._dim,
            global_mean=self.global_mean,
            ignore_index=-1,
            accumulate_dtype=_DTYPES[self.accumulate_dtype],
        ).to(device)
        if self._reference_means is not None and self._reference_means.shape == stats.shift.shape:
            stats.set_shift(self._reference_means.to(device), self._reference_present)
        return stats

    def _begin_epoch(self, trainer: Trainer) -> None:
        self._epoch_pending = False
        assert self._error is not None
        self._error.reset()
        device = self._error.errors.device
        epoch = trainer.current_epoch
        self._measuring = self.mode == "online" and self._scheduled(trainer, epoch) and self._tpt_allows(epoch)
        self._stats = self._new_statistics(device) if self._measuring else None
        self._ncc = None
        if self._measuring and self._reference_means is not None:
            if self._reference_means.shape == (self._num_classes, self._dim):
                self._ncc = NCCMismatch(self._reference_means, self._reference_present).to(device)

    def _scheduled(self, trainer: Trainer, epoch: int) -> bool:
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return epoch % self.every_n_epochs == 0 or last

    def _tpt_allows(self, epoch: int) -> bool:
        return self.measure == "always" or (self._tpt.epoch is not None and self._tpt.epoch <= epoch)

    def _wants_exact(self, trainer: Trainer, epoch: int, online_error: float) -> bool:
        if not self._scheduled(trainer, epoch):
            return False
        return self.measure == "always" or self._tpt.started or online_error <= self._tpt.threshold

    def _weight_and_bias(self) -> tuple[Tensor | None, Tensor | None]:
        assert self._classifier_module is not None and self._num_classes is not None and self._dim is not None
        return classifier_parameters(self._classifier_module, self._num_classes, self._dim)

    def _measure(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[ClassStatistics, Tensor | None, dict[str, float]]:
        """Statistics, classifier weight and metric values of this epoch (collectives on every rank)."""
        if self.mode == "exact":
            stats, error, ncc, skipped = self._exact_pass(trainer, pl_module)
        else:
            assert self._stats is not None
            stats = self._stats.statistics()
            skipped = self._stats.skipped()
            ncc = self._ncc.fraction() if self._ncc is not None else math.nan
            error = math.nan
        weight, _ = self._weight_and_bias()
        values = metrics_from_statistics(stats, weight, global_mean=self.global_mean)
        if math.isfinite(ncc):
            values[NC4_KEY] = ncc
        if math.isfinite(error):
            values["train_error"] = error
        values["skipped_samples"] = float(skipped["nonfinite"] + skipped["bad_label"])
        epoch = trainer.current_epoch
        if skipped["nonfinite"]:
            self._warn_once(
                "nonfinite",
                f"NeuralCollapseCallback: {skipped['nonfinite']} samples of epoch {epoch} had NaN/Inf features and "
                f"were left out of every metric (the count is logged as `{self.prefix}/skipped_samples` each "
                "epoch). The model produced them; if the captured layer is not the one meant, set `features=` "
                "or `classifier=`.",
            )
        if skipped["bad_label"]:
            self._warn_once(
                "bad-label",
                f"NeuralCollapseCallback: {skipped['bad_label']} samples of epoch {epoch} had invalid labels (outside "
                f"[0, {self._num_classes}), negative but not `ignore_index`, or float targets that are not one-hot "
                f"or probabilities) and were left out of every metric (counted in `{self.prefix}/skipped_samples`). "
                "Set `num_classes=` (and `classifier=`), `ignore_index=` or `label_getter=`.",
            )
        present = stats.present.tolist()
        absent = [c for c, here in enumerate(present) if not here]
        if sum(present) == 1:
            self._warn_once(
                "one-class",
                f"NeuralCollapseCallback: only class {present.index(True)} has samples in epoch {epoch}; NC1, NC2 "
                "of the means and NC3 need two classes and are not logged. Check the data or `label_getter=`.",
            )
        elif absent:
            self._warn_once(
                "absent",
                f"NeuralCollapseCallback: class(es) {absent[:10]}{'...' if len(absent) > 10 else ''} had no sample "
                f"in epoch {epoch} and are left out of every metric (C = {sum(present)} present classes). Expected "
                "on a subset of the data; otherwise check the labels (`label_getter=`).",
            )
        return stats, weight, values

    def _exact_pass(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[ClassStatistics, float, float, dict[str, int]]:
        assert self._error is not None and self._num_classes is not None
        loader = exact_loader(trainer.train_dataloader, trainer.world_size, trainer.global_rank)  # type: ignore[arg-type]
        device = self._error.errors.device
        stats_metric = self._new_statistics(device)
        error = ClassificationError(self._num_classes).to(device)
        with observing(pl_module), trainer.precision_plugin.forward_context():
            for batch in loader:
                features, logits, labels = self._forward(trainer, pl_module, batch)
                stats_metric.update(features, labels)
                error.update(logits, labels)
            stats = stats_metric.statistics()
            ncc = NCCMismatch(stats.means, stats.present).to(device)
            for batch in loader:
                features, logits, labels = self._forward(trainer, pl_module, batch)
                ncc.update(_only_labelled(features, labels, self._num_classes), logits)
        errors, total = error.counts()
        return stats, errors / max(total, 1), ncc.fraction(), stats_metric.skipped()

    def _forward(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        assert self._capture is not None
        batch = trainer.strategy.batch_to_device(batch)
        self._capture.clear()
        pl_module(self.input_getter(batch))
        captured = self._capture.take()
        if captured is None:
            raise RuntimeError(f"the classifier `{self._classifier_name}` did not run in the model's forward")
        features, logits = captured
        return features, logits, self._labels(batch, features.device)

    def _report(
        self, trainer: Trainer, record: dict[str, float], stats: ClassStatistics | None, weight: Tensor | None
    ) -> None:
        scalars = {f"{self.prefix}/{k}": float(v) for k, v in record.items() if k not in ("epoch", "step")}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in scalars.items()})
        step = trainer.global_step
        log_scalars(trainer.loggers, scalars, step)
        if stats is None or not self.log_histograms or not trainer.is_global_zero:
            return
        values = etf_deviation(stats, weight, global_mean=self.global_mean)
        num_present = int(stats.present.sum())
        log_histograms(trainer.loggers, values, step, prefix=self.prefix, ideal=ideal_values(num_present))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)


def _only_labelled(features: Tensor, labels: Tensor, num_classes: int | None) -> Tensor:
    """``features`` with NaN rows for ignored or invalid labels, which NC4 then skips like the other metrics."""
    counted = (labels >= 0) & (labels < (num_classes or 0))
    return torch.where(counted[:, None].to(features.device), features, torch.full_like(features, math.nan))


def _check_choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MisconfigurationException(f"`{option}` must be one of {choices}, got {value!r}")


def _pads_samples(loader: DataLoader) -> bool:
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last:
        return False
    try:
        return len(loader.dataset) % sampler.num_replicas != 0  # type: ignore[arg-type]
    except TypeError:
        return False

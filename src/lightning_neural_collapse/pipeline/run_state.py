"""The callback's state: what a checkpoint keeps (:class:`SavedState`) and what lives for one fit (:class:`FitState`).

:class:`SavedState` is the run's record: the history (one dict per finished epoch), the TPT detector, the
class means of the latest measurement (next shift, online NC4 centres) and the last finished epoch. It is
the callback's ``state_dict``, so a checkpoint written at the end of epoch ``e`` (at its last batch, at
validation end or at epoch end) holds epoch ``e``, and resuming from it neither repeats nor loses an epoch.

:class:`FitState` lives from ``on_fit_start`` to ``teardown``: the binding to the model, the first-step
checks, the epoch being accumulated (:class:`OpenEpoch`) and the one held on standby.

Epochs are opened by the first training batch seen with a new ``trainer.current_epoch`` (Lightning calls
no ``on_train_epoch_start`` when it resumes mid-epoch), and an epoch opened at a batch index other than 0
is *partial*: its first batches ran before the checkpoint and their sums are lost.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_neural_collapse.functional.collapse import NC4_KEY
from lightning_neural_collapse.pipeline import diagnostics as say
from lightning_neural_collapse.pipeline.accumulate import COUNT_KEYS, Accumulator, Reference
from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.compute import EpochOutcome, LocalEpoch
from lightning_neural_collapse.pipeline.diagnostics import WarnOnce
from lightning_neural_collapse.pipeline.first_step import FirstStep, Shapes
from lightning_neural_collapse.pipeline.labels import LabelReader
from lightning_neural_collapse.pipeline.layer_sums import LayerCentres
from lightning_neural_collapse.pipeline.samples import CaptureShapeError
from lightning_neural_collapse.pipeline.schedule import EpochPlan
from lightning_neural_collapse.tpt import TPTDetector

if TYPE_CHECKING:
    from lightning_neural_collapse.pipeline.held_out import HeldOutRun

LAGGED_NC4_KEY = "nc4_ncc_mismatch_prev_means"
"""Online NC4: the mismatch against the class means of the previous measurement (SPEC.md: say which in the tag;
with ``ncc_samples=`` the key is ``Config.lagged_nc4_key``)."""
EVAL_ERROR_KEY = "train_error_eval"
"""Exact mode: the training error of the eval-mode pass (``train_error`` is always that of the training steps)."""
EVAL_SKIPPED_KEY = "skipped_samples_eval"
"""Exact mode: samples the eval-mode pass left out (``skipped_samples`` is always that of the training steps)."""
STATE_VERSION = 2


class SavedState:
    """What a checkpoint keeps of the callback.

    Example:
        >>> saved = SavedState(tpt_threshold=0.0)
        >>> saved.commit({"epoch": 0, "step": 7, "train_error": 0.1})
        >>> restored = SavedState(0.0)
        >>> restored.load_state_dict(saved.state_dict())
        >>> restored.history, restored.finished_epoch
        ([{'epoch': 0, 'step': 7, 'train_error': 0.1}], 0)
    """

    def __init__(self, tpt_threshold: float, unit_key: str = "epoch") -> None:
        self.unit_key = unit_key
        """The record key of the unit of measurement: ``"epoch"``, or ``"window"`` with ``every_n_train_steps``."""
        self.history: list[dict[str, float]] = []
        self.val_history: list[dict[str, float]] = []
        """One dict per measured validation run: ``epoch``, ``step`` and the held-out keys (``<loader>/<key>`` with
        several validation dataloaders)."""
        self.tpt = TPTDetector(tpt_threshold)
        self.reference: Reference | None = None
        self.subset: list[int] | None = None
        """The classes measured when ``classes=`` chose them from the data (``classes_from="frequent"``)."""
        self.layer_references: dict[str, LayerCentres] = {}
        """``layers=``: each layer's class means, present classes and NC1 directions of the latest measurement
        (CPU): the next measurement's shift, online mode's centres and ``P``, validation's centres."""
        self.finished_epoch: int | None = None
        self.restored = False
        """Whether :meth:`load_state_dict` ran since the last fit (the next fit continues that run)."""

    def clear(self) -> None:
        """Forget everything (a new run)."""
        self.history = []
        self.val_history = []
        self.tpt = TPTDetector(self.tpt.threshold)
        self.reference = None
        self.subset = None
        self.layer_references = {}
        self.finished_epoch = None

    def finished(self, epoch: int) -> bool:
        """Whether ``epoch`` was finished already (for example before the checkpoint this run resumed from)."""
        return self.finished_epoch is not None and epoch <= self.finished_epoch

    def commit(self, record: dict[str, float]) -> None:
        """Append an epoch's record and mark the epoch finished."""
        self.history.append(record)
        self.finished_epoch = int(record[self.unit_key])

    def mark_finished(self, epoch: int) -> None:
        """Mark ``epoch`` finished without a record (it was skipped)."""
        self.finished_epoch = epoch

    def record(self, epoch: int) -> dict[str, float] | None:
        """The history record of ``epoch``, or ``None``."""
        for row in reversed(self.history):
            if int(row[self.unit_key]) == epoch:
                return row
        return None

    def state_dict(self) -> dict[str, Any]:
        """Plain values and CPU tensors only."""
        reference = self.reference
        return {
            "version": STATE_VERSION,
            "history": [dict(row) for row in self.history],
            "val_history": [dict(row) for row in self.val_history],
            **self.tpt.state_dict(),
            "reference_means": None if reference is None else reference.means,
            "reference_present": None if reference is None else reference.present,
            "finished_epoch": self.finished_epoch,
            "subset": self.subset,
            "layer_references": {
                name: {"means": ref.means, "present": ref.present, "directions": ref.directions}
                for name, ref in self.layer_references.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (older checkpoints without some keys load too)."""
        self.history = [dict(row) for row in state.get("history", [])]
        self.val_history = [dict(row) for row in state.get("val_history", [])]
        self.tpt.load_state_dict(state)
        means, present = state.get("reference_means"), state.get("reference_present")
        self.reference = Reference(means, present) if means is not None and present is not None else None
        finished = state.get("finished_epoch")
        if finished is None and self.history:
            finished = int(self.history[-1][self.unit_key])
        self.finished_epoch = finished
        self.subset = state.get("subset")
        layers = state.get("layer_references") or {}
        self.layer_references = {
            name: LayerCentres(entry["means"], entry["present"], entry["directions"]) for name, entry in layers.items()
        }
        self.restored = True


class Sums(Protocol):
    """What :meth:`FitState.add_batch` adds to: an accumulator allocated at the first batch, a failure, and which
    loop the samples come from (``"training"`` or ``"validation"``)."""

    accumulator: Accumulator | None
    failure: str | None

    @property
    def loop(self) -> str: ...


@dataclass
class OpenEpoch:
    """The unit of measurement (an epoch, or a window of training steps) being accumulated on this rank.

    Attributes:
        epoch: the unit's index: ``trainer.current_epoch``, or the window index ``global_step // K`` with
            ``every_n_train_steps=K``.
        plan: what online mode accumulates (see :class:`~lightning_neural_collapse.pipeline.schedule.EpochPlan`).
        partial: opened after its start (resumed mid-epoch or mid-window): its first batches are missing.
        accumulator: the sums, allocated at the first batch whose shapes are known.
        failure: why a batch could not be measured, or ``None``.
        step: the logging step of the unit's end, set when its last training batch has ended (windows: after
            every batch).
        current_epoch: ``trainer.current_epoch`` at the unit's last batch (for windows' records).
    """

    epoch: int
    plan: EpochPlan
    partial: bool = False
    accumulator: Accumulator | None = None
    failure: str | None = None
    step: int | None = None
    current_epoch: int = 0
    loop: str = "training"

    def local(self, device: torch.device, *, statistics: bool) -> LocalEpoch:
        """What this rank brings to :func:`~lightning_neural_collapse.pipeline.compute.finish_epoch`: its counts
        (zeros without an accumulator, which is then this rank's failure), and its statistics if asked for."""
        acc = self.accumulator
        failure = self.failure or (None if acc is not None else "no training batch measured on this rank yet")
        counts: dict[str, Any] = dict(acc.local_counts()) if acc is not None else dict.fromkeys(COUNT_KEYS, 0)
        stats = acc.statistics if acc is not None and statistics else None
        layers = acc.layers if acc is not None and statistics else None
        return LocalEpoch(counts, failure, stats, device, layers)


@dataclass
class FitState:
    """Everything that lives for one fit (rebuilt by every ``fit``); see the module docstring.

    Attributes:
        binding: the classifier hooks.
        shift_labels: for token samples, whether position ``t``'s target is ``labels[:, t + 1]``.
        first_step: the pending first-step checks, ``None`` once done.
        shapes: ``C`` and ``D``, known after the first forward.
        layer_dims: ``layers=``: each listed layer's width ``D_l``, known after the first forward (depth order).
        labels: reads class indices, once ``C`` is known.
        exact_loader: the exact pass's loader (built at the first exact measurement).
        open: the epoch being accumulated.
        held: online mode's standby epoch: measured only if the fit ends with it.
        exact_measured: an exact pass succeeded in this fit (before that, a failing pass is an error).
        subset: the ``(C,)`` mask of the classes measured (``classes=``), once chosen.
        last_finished: the latest epoch this fit recorded, and ``last_measured`` the latest it measured NC in.
        validation: the validation run being accumulated
            (:class:`~lightning_neural_collapse.pipeline.held_out.HeldOutRun`), or ``None``.
        warn: the warnings of this fit (each once).
    """

    binding: Binding
    shift_labels: bool = False
    first_step: FirstStep | None = None
    shapes: Shapes | None = None
    layer_dims: dict[str, int] | None = None
    labels: LabelReader | None = None
    exact_loader: Any = None
    open: OpenEpoch | None = None
    held: OpenEpoch | None = None
    exact_measured: bool = False
    subset: Tensor | None = None
    last_finished: int | None = None
    last_measured: int | None = None
    validation: HeldOutRun | None = None
    warn: WarnOnce = field(default_factory=WarnOnce)

    def finish_first_step(
        self, loss: Any, label_getter: Callable[[Any], Any] | None, ignore_index: int | None, shift: bool = False
    ) -> None:
        """Run the pending first-step checks after a forward (they raise on a wrong configuration); once they know
        the shapes, the labels can be read and the first step is done."""
        assert self.first_step is not None
        shapes = self.first_step.finish(loss)
        if shapes is None:
            return  # the classifier did not run: check again at the next step
        self.layer_dims = self._layer_dims()
        self.first_step, self.shapes = None, shapes
        self.labels = LabelReader(label_getter, shapes.num_classes, ignore_index, shift=shift)
        if not self.binding.has_weight(shapes.num_classes, shapes.dim):  # metadata only: inside the step
            self.warn("no-weight", say.no_weight(self.binding.name, shapes.num_classes, shapes.dim))

    def _layer_dims(self) -> dict[str, int] | None:
        """The listed layers' widths from the first forward (``None`` without ``layers=``).

        Raises:
            MisconfigurationException: for a layer that did not run in that forward, or whose output is not one row
                per sample.
        """
        taps = self.binding.taps
        if taps is None:
            return None
        try:
            captured = self.binding.peek()
        except CaptureShapeError as err:
            raise MisconfigurationException(f"NeuralCollapseCallback: {err}") from err
        rows = {} if captured is None else captured.layers
        missing = [name for name in taps.names if name not in rows]
        if missing:
            raise MisconfigurationException(
                f"NeuralCollapseCallback: the layers {missing} listed in `layers=` did not run in the first training "
                "step's forward (or returned no tensor); list modules that run in every forward"
            )
        return {name: int(rows[name].shape[1]) for name in taps.names}

    def accumulate(self, batch: Any, new_accumulator: Callable[[torch.device, bool], Accumulator]) -> None:
        """Add the step's captured features, logits and ``batch``'s labels to the open epoch (no host sync).

        After the first step nothing here raises: a batch that cannot be measured marks the epoch as failed
        (it is then skipped on every rank), with one warning.
        """
        epoch = self.open
        if epoch is None:
            return
        failure = self.add_batch(epoch, batch, lambda device: new_accumulator(device, epoch.plan.accumulates))
        if failure is not None:
            self.warn("batch-error", say.batch_error(epoch.epoch, failure))

    def add_batch(self, sums: Sums, batch: Any, new_accumulator: Callable[[torch.device], Accumulator]) -> str | None:
        """Add the latest forward's samples and ``batch``'s labels to ``sums`` (an open epoch, or a validation
        loader's sums), allocating its accumulator with ``new_accumulator`` at the first batch; no host sync.

        Returns:
            The cause when this batch marked ``sums`` as failed (nothing raises after the first step), else ``None``.
        """
        if sums.failure is not None:
            return None
        training = sums.loop == "training"
        try:
            calls = self.binding.capture.calls
            captured = self.binding.take()
            if captured is None:
                self.warn(f"no-forward-{sums.loop}", say.no_forward(self.binding.name, sums.loop))
                return None
            if calls > 1 and training:
                self.warn("forwards", say.several_forwards(self.binding.name, calls))
            if self.shapes is None or self.labels is None:
                return None
            labels = self.labels.read(batch, captured.features.device, captured.layout)
            if labels.shape[0] != captured.num_samples:
                self.warn("batch-size", say.batch_size_mismatch(labels.shape[0], captured.num_samples))
                return None
            if sums.accumulator is None:
                sums.accumulator = new_accumulator(captured.features.device)
            sums.accumulator.add(captured, labels)
        except Exception as err:  # after the first step's checks, never stop the run
            sums.failure = str(err) if isinstance(err, CaptureShapeError) else f"{type(err).__name__}: {err}"
            return sums.failure
        return None

    def close(self) -> None:
        """Remove the hooks (and a first-step probe still watching)."""
        if self.first_step is not None and self.first_step.probe is not None:
            self.first_step.probe.stop()
        self.binding.close()


def build_record(
    outcome: EpochOutcome,
    epoch: int,
    step: int,
    *,
    exact: bool,
    partial: bool,
    unit_key: str = "epoch",
    current_epoch: int | None = None,
    lagged_key: str = LAGGED_NC4_KEY,
) -> dict[str, float]:
    """An epoch's history record from its :class:`~lightning_neural_collapse.pipeline.compute.EpochOutcome`.

    Keys: ``epoch`` (for windows: ``window``, with ``epoch`` the trainer's epoch at its end), ``step`` (the
    logging step of the unit's end), ``train_error`` (the training steps'
    error; absent for a partial epoch), ``skipped_samples`` (left out of the training steps' counts), and
    when measured the metric values, NC4 (``nc4_ncc_mismatch`` from the exact pass,
    ``nc4_ncc_mismatch_prev_means`` online) and, in exact mode, ``train_error_eval`` and
    ``skipped_samples_eval`` of the eval-mode pass.

    Example:
        >>> outcome = EpochOutcome("counted", {"errors": 1, "total": 4, "nonfinite": 0, "bad_label": 0,
        ...                                    "ncc_mismatches": 0, "ncc_total": 0})
        >>> build_record(outcome, 3, 31, exact=False, partial=False)
        {'epoch': 3, 'step': 31, 'train_error': 0.25, 'skipped_samples': 0.0}
    """
    counts = outcome.counts
    record: dict[str, float] = {unit_key: epoch, "step": step}
    if unit_key != "epoch" and current_epoch is not None:
        record = {unit_key: epoch, "epoch": current_epoch, "step": step}
    if not partial and counts.get("total", 0) > 0:
        record["train_error"] = counts["errors"] / counts["total"]
    record["skipped_samples"] = float(counts.get("nonfinite", 0) + counts.get("bad_label", 0))
    if outcome.status == "measured":
        record.update(outcome.values)
        if exact:
            extra = outcome.exact_counts
            if extra.get("total", 0) > 0:
                record[EVAL_ERROR_KEY] = extra["errors"] / extra["total"]
            if extra.get("ncc_total", 0) > 0:
                record[NC4_KEY] = extra["ncc_mismatches"] / extra["ncc_total"]
            record[EVAL_SKIPPED_KEY] = float(extra.get("nonfinite", 0) + extra.get("bad_label", 0))
        elif counts.get("ncc_total", 0) > 0:
            record[lagged_key] = counts["ncc_mismatches"] / counts["ncc_total"]
    return {key: value for key, value in record.items() if not isinstance(value, float) or math.isfinite(value)}


def reference_of(outcome: EpochOutcome) -> Reference | None:
    """The class means a measured outcome leaves for the next measurement (on the CPU), or ``None``."""
    stats = outcome.statistics
    if stats is None:
        return None
    means: Tensor = stats.means.detach().cpu()
    return Reference(means, stats.present.detach().cpu())

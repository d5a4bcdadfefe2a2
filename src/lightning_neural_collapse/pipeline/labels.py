"""Reading labels and model inputs out of a batch, and the one definition of which sample counts.

A sample *counts* (is measured by every metric) when its label is a class index in ``[0, C)`` (not
``ignore_index``, not invalid) and its features and logits are finite: :func:`counted_samples`. Labels are
turned into class indices on the device without host-device synchronisation (:func:`class_indices`); only
the first batch of a fit is validated on the host (:func:`check_targets`), so that a wrong configuration
stops the run before its first optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

LABEL_KEYS: tuple[str, ...] = ("label", "labels", "y", "target", "targets")
"""Keys searched, in order, in a dict batch for the labels."""

INPUT_KEYS: tuple[str, ...] = ("x", "input", "inputs", "image", "images", "pixel_values", "data", "features")
"""Keys searched, in order, in a dict batch for the model input (exact mode only)."""

TOKEN_KEYS: tuple[str, ...] = ("input_ids", "attention_mask")
"""Keys of a tokenised dict batch passed to the model by keyword (``model(input_ids=..., attention_mask=...)``)."""


class BatchFormatError(ValueError):
    """A batch the callback cannot read; the message names the option that fixes it."""


class ClassCountError(BatchFormatError):
    """Labels that disagree with the number of classes (out of range, negative, too many columns)."""


def default_label_getter(batch: Any) -> Any:
    """The labels of a batch: ``batch[1]`` of a tuple or list, or the first of :data:`LABEL_KEYS` of a dict.

    Example:
        >>> default_label_getter((torch.zeros(2, 3), torch.tensor([0, 1]))).tolist()
        [0, 1]
        >>> default_label_getter({"image": torch.zeros(1), "target": torch.tensor([2])}).tolist()
        [2]
    """
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            if key in batch:
                return batch[key]
        raise BatchFormatError(
            f"cannot find labels in a batch dict with keys {sorted(map(str, batch))}: expected one of "
            f"{LABEL_KEYS}. Pass `label_getter=` (a function batch -> labels) to NeuralCollapseCallback."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[1]
    raise BatchFormatError(
        f"cannot find labels in a batch of type {type(batch).__name__}: expected an (inputs, labels) tuple or list "
        f"or a dict with one of {LABEL_KEYS}. Pass `label_getter=` (a function batch -> labels) to "
        "NeuralCollapseCallback."
    )


def default_input_getter(batch: Any) -> Any:
    """The model input of a batch, for the exact pass: ``batch[0]`` of a tuple or list; for a dict, its
    ``input_ids`` (with ``attention_mask``) as keyword arguments, else the first of :data:`INPUT_KEYS`.

    Example:
        >>> default_input_getter((torch.ones(1), torch.tensor([0]))).tolist()
        [1.0]
        >>> sorted(default_input_getter({"input_ids": torch.ones(1, 3), "attention_mask": torch.ones(1, 3),
        ...                              "labels": torch.ones(1, 3)}))
        ['attention_mask', 'input_ids']
    """
    if isinstance(batch, Mapping):
        if "input_ids" in batch:
            return {key: batch[key] for key in TOKEN_KEYS if key in batch}
        for key in INPUT_KEYS:
            if key in batch:
                return batch[key]
        raise BatchFormatError(
            f"cannot find the model input in a batch dict with keys {sorted(map(str, batch))}: expected one of "
            f"{('input_ids', *INPUT_KEYS)}. Pass `input_getter=` (a function batch -> model input) to "
            "NeuralCollapseCallback, or use mode='online'."
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 1:
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    raise BatchFormatError(
        f"cannot find the model input in a batch of type {type(batch).__name__}. Pass `input_getter=` "
        "(a function batch -> model input) to NeuralCollapseCallback, or use mode='online'."
    )


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` the way ``inputs`` asks: a tensor (or anything else) as ``model(inputs)``, a tuple or
    list as ``model(*inputs)``, a dict as ``model(**inputs)``; returns what the model returns.

    Example:
        >>> call_model(lambda a, b=0: a + b, {"a": 1, "b": 2}), call_model(lambda a, b: a * b, (3, 4))
        (3, 12)
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def class_indices(targets: Any, num_classes: int, ignore_index: int | None = None) -> Tensor:
    """``(B,)`` class indices in ``[0, num_classes)``, ``-1`` for ``ignore_index`` and ``num_classes`` for an
    invalid target, without host-device synchronisation (for batches after the first, validated one).

    Invalid: an integer label outside ``[0, num_classes)`` that is not ``ignore_index``; a float row that is
    not one-hot or a probability vector (negative, non-finite, not summing to 1: multi-label targets); float
    targets of another shape than ``(B, num_classes)``; integer targets that are not ``(B,)``. Such samples
    are then skipped and counted by the metrics, never assigned to a wrong class.

    Example:
        >>> class_indices(torch.tensor([0, 2, -100, 5, -3]), 3, ignore_index=-100).tolist()
        [0, 2, -1, 3, 3]
        >>> class_indices(torch.tensor([[0.2, 0.8], [1.0, 1.0]]), 2).tolist()
        [1, 2]
    """
    if not isinstance(targets, Tensor):
        raise BatchFormatError(
            f"labels must be a tensor, got {type(targets).__name__}. Pass `label_getter=` to NeuralCollapseCallback."
        )
    batch = targets.shape[0] if targets.ndim else 1
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            return torch.full((batch,), num_classes, dtype=torch.long, device=targets.device)
        rows = targets.float()
        valid = torch.isfinite(rows).all(dim=1) & (rows >= 0).all(dim=1) & ((rows.sum(dim=1) - 1).abs() <= 1e-3)
        return torch.where(valid, rows.argmax(dim=1), num_classes)
    if targets.ndim != 1 or targets.is_complex() or targets.dtype == torch.bool:
        return torch.full((batch,), num_classes, dtype=torch.long, device=targets.device)
    labels = targets.long()
    labels_out = torch.where((labels < 0) | (labels >= num_classes), num_classes, labels)
    if ignore_index is not None:
        labels_out = torch.where(labels == ignore_index, -1, labels_out)
    return labels_out


def check_targets(targets: Any, num_classes: int, ignore_index: int | None) -> None:
    """Validate one batch of targets (synchronises with the device; call it once, not every step).

    Raises:
        BatchFormatError: naming the option to change (``num_classes``, ``ignore_index`` or ``label_getter``).
    """
    if not isinstance(targets, Tensor):
        raise BatchFormatError(
            f"labels must be a tensor, got {type(targets).__name__}. Pass `label_getter=` to NeuralCollapseCallback."
        )
    if targets.is_floating_point():
        if targets.ndim != 2:
            raise BatchFormatError(
                f"float labels of shape {tuple(targets.shape)} are neither class indices nor (batch, classes) "
                "one-hot/probability targets. Convert them in `label_getter=`."
            )
        if targets.shape[1] != num_classes:
            raise ClassCountError(
                f"targets of shape {tuple(targets.shape)} have {targets.shape[1]} columns but the classifier has "
                f"{num_classes} classes. Set `num_classes=` or `label_getter=`."
            )
        rows = targets.float()
        if bool((rows < 0).any()) or not torch.allclose(rows.sum(dim=1), torch.ones_like(rows[:, 0]), atol=1e-3):
            raise BatchFormatError(
                "float targets must be one-hot or class probabilities (non-negative rows summing to 1); multi-label "
                "or unnormalised targets are not single-class labels. Convert them with `label_getter=`."
            )
        return
    if targets.ndim != 1:
        raise BatchFormatError(
            f"integer labels must have shape (batch,), got {tuple(targets.shape)}. Convert them with `label_getter=`."
        )
    if targets.is_complex() or targets.dtype == torch.bool:
        raise BatchFormatError(f"labels of dtype {targets.dtype} are not class indices. Use `label_getter=`.")
    labels = targets.long()
    if ignore_index is not None:
        labels = labels[labels != ignore_index]
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ClassCountError(
            f"label {low} is negative; set `ignore_index={low}` if it marks samples to skip, or fix `label_getter=`."
        )
    if high >= num_classes:
        raise ClassCountError(
            f"label {high} is out of range for {num_classes} classes; set `num_classes=` to at least {high + 1} "
            "(and make sure the classifier has that many outputs)."
        )


def counted_samples(labels: Tensor, num_classes: int, features: Tensor, finite_logits: Tensor | None = None) -> Tensor:
    """``(B,)`` bool: the samples every metric measures, the one definition used everywhere. A sample counts
    when its class index (from :func:`class_indices`) lies in ``[0, num_classes)`` and its features (and
    logits, as ``finite_logits`` says) are finite. No host-device synchronisation.

    Example:
        >>> feats = torch.tensor([[1.0], [float("nan")], [2.0], [3.0]])
        >>> counted_samples(torch.tensor([0, 1, -1, 2]), 2, feats).tolist()
        [True, False, False, False]
    """
    keep = (labels >= 0) & (labels < num_classes) & torch.isfinite(features).all(dim=1).to(labels.device)
    if finite_logits is not None:
        keep = keep & finite_logits.to(labels.device)
    return keep


def token_positions(batch: Any, layout: tuple[int, int], shift: bool) -> Tensor | None:
    """``(B, T)`` bool: the positions of a sequence batch that have a target, from its ``attention_mask`` (a position
    counts when its input token is real and, with ``shift``, so is the next one); ``None`` without a mask."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != layout:
        return None
    real = mask.to(torch.bool)
    if shift:
        real = real & torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], dim=1)
    return real


def shifted(labels: Tensor, shift: bool) -> Tensor:
    """``(B, T)`` targets: with ``shift``, position ``t`` gets ``labels[:, t + 1]`` (the Hugging Face causal-LM
    convention) and the last position a copy of its own label, which :func:`token_positions` or the caller marks
    as having no target.

    Example:
        >>> shifted(torch.tensor([[5, 6, 7]]), True).tolist(), shifted(torch.tensor([[5, 6, 7]]), False).tolist()
        ([[6, 7, 7]], [[5, 6, 7]])
    """
    if not shift:
        return labels
    return torch.cat([labels[:, 1:], labels[:, -1:]], dim=1)


class LabelReader:
    """Labels of a batch as class indices, on the features' device, for a fixed number of classes.

    For the token samples of a sequence model (``layout = (B, T)``) the labels are ``(B, T)`` token ids, shifted
    by one position when ``shift`` (Hugging Face causal LMs shift inside their loss; the last position then has
    no target), with the positions outside the batch's ``attention_mask`` left out.

    Args:
        getter: ``batch -> labels`` (default :func:`default_label_getter`).
        num_classes: ``C``.
        ignore_index: a label value that marks samples to leave out, or ``None``.
        shift: for token samples, whether the target of position ``t`` is ``labels[:, t + 1]``.

    Example:
        >>> reader = LabelReader(None, num_classes=3, ignore_index=-100)
        >>> reader.read((torch.zeros(3, 2), torch.tensor([2, -100, 7])), torch.device("cpu")).tolist()
        [2, -1, 3]
        >>> tokens = {"input_ids": torch.zeros(1, 4), "labels": torch.tensor([[0, 1, 2, -100]]),
        ...           "attention_mask": torch.tensor([[1, 1, 1, 0]])}
        >>> LabelReader(None, 3, -100, shift=True).read(tokens, torch.device("cpu"), layout=(1, 4)).tolist()
        [1, 2, -1, -1]
    """

    def __init__(
        self, getter: Callable[[Any], Any] | None, num_classes: int, ignore_index: int | None, shift: bool = False
    ) -> None:
        self.getter = getter or default_label_getter
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.shift = shift

    def read(
        self, batch: Any, device: torch.device, layout: tuple[int, int] | None = None, targets: Any = None
    ) -> Tensor:
        """``(N,)`` int64 class indices: ``-1`` for ``ignore_index`` (and positions without a target),
        ``num_classes`` for an invalid target (see :func:`class_indices`); no host-device synchronisation.
        ``targets`` may pass ``getter(batch)`` when it is at hand (the getter is called once per batch)."""
        targets = self.getter(batch) if targets is None else targets
        if layout is None:
            labels = class_indices(targets, self.num_classes, self.ignore_index)
            return labels.to(device, non_blocking=True)
        if not isinstance(targets, Tensor) or tuple(targets.shape) != layout or targets.is_floating_point():
            raise BatchFormatError(self._token_message(targets, layout))
        tokens = shifted(targets.long(), self.shift)
        labels = class_indices(tokens.reshape(-1), self.num_classes, self.ignore_index)
        has_target = token_positions(batch, layout, self.shift)
        if has_target is None and self.shift:
            has_target = torch.ones(layout, dtype=torch.bool, device=tokens.device)
            has_target[:, -1] = False
        if has_target is not None:
            labels = torch.where(has_target.reshape(-1).to(labels.device), labels, -1)
        return labels.to(device, non_blocking=True)

    def check(self, batch: Any, layout: tuple[int, int] | None = None, targets: Any = None) -> None:
        """Validate one batch on the host (the first of a fit); raises :class:`BatchFormatError`. ``targets`` may
        pass ``getter(batch)`` when it is at hand."""
        targets = self.getter(batch) if targets is None else targets
        if layout is None:
            check_targets(targets, self.num_classes, self.ignore_index)
            return
        labels = self.read(batch, torch.device("cpu"), layout, targets)
        bad = labels == self.num_classes
        if bool(bad.any()):
            flat = shifted(targets.long(), self.shift).reshape(-1).cpu()
            check_targets(flat[bad.cpu()], self.num_classes, self.ignore_index)  # raises, naming the option

    def _token_message(self, targets: Any, layout: tuple[int, int]) -> str:
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        return (
            f"the classifier gives one output per position of a {layout} (batch, positions) sequence, so the labels "
            f"must be integer token ids of shape {layout} (or -100 where there is no target), got {shape}. Pass "
            "`label_getter=` (batch -> (batch, positions) labels); `shift_labels=` says whether position t is "
            "labelled by labels[:, t] or, as in Hugging Face causal LMs, by labels[:, t + 1]."
        )


def needs_layout(targets: Any) -> bool:
    """Whether ``targets`` can only be checked once the output's layout is known: ``(B, T)`` integer labels of a
    sequence model (a classifier would refuse them as multi-label targets; a ``(B, 1)`` column is checked at once)."""
    return (
        isinstance(targets, Tensor) and targets.ndim == 2 and targets.shape[1] > 1 and not targets.is_floating_point()
    )

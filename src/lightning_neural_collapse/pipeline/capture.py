"""Binding to the model: finding the classifier and capturing its input (features) and output (logits).

One forward hook per module, registered once before training; the hook only keeps a detached
reference to the latest tensors, so it adds no computation, no host-device sync and no autograd
state, stays correct when it fires twice per step (activation checkpointing) and works under
``torch.compile`` (hooks present at compile time are traced). The shapes are checked on every read
(host metadata only) when the samples are read (:mod:`~lightning_neural_collapse.pipeline.samples`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_neural_collapse.pipeline.layer_taps import LayerReduce, LayerTaps, resolve_layers
from lightning_neural_collapse.pipeline.samples import Captured, samples_from_weight, samples_of
from lightning_neural_collapse.pipeline.sharding import full_parameters, is_sharded


class ClassifierNotFoundError(ValueError):
    """No usable classifier layer; the message names the option to set."""


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The classifier of ``model``: by dotted ``name``, else timm's ``get_classifier()``, else the last ``nn.Linear``.

    A ``get_classifier()`` that returns a module without weights (timm's ``nn.Identity`` for a backbone
    with ``num_classes=0``) is skipped.

    Returns:
        ``(dotted name, module)``.

    Raises:
        ClassifierNotFoundError: when nothing matches; the message says to set ``classifier=``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> find_classifier(net)[0]
        '2'
    """
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules:
            raise ClassifierNotFoundError(
                f"`classifier={name!r}` is not a submodule of {type(model).__name__}; "
                f"some candidates: {_linear_names(model)[-5:] or sorted(modules)[-5:]}"
            )
        return name, modules[name]
    for owner in modules.values():
        getter = getattr(owner, "get_classifier", None)
        if not callable(getter):
            continue
        found = getter()
        candidates = [found] if not isinstance(found, str) else []
        owner_name = _name_of(model, owner)
        if isinstance(found, str) and owner_name is not None:
            candidates.append(f"{owner_name}.{found}" if owner_name else found)
        for candidate in candidates:
            found_name = candidate if isinstance(candidate, str) else _name_of(model, candidate)
            # a timm backbone built with num_classes=0 returns an nn.Identity: the real head is elsewhere
            if found_name is not None and found_name in modules and _has_weight(modules[found_name]):
                return found_name, modules[found_name]
    linears = _linear_names(model)
    if linears:
        return linears[-1], modules[linears[-1]]
    raise ClassifierNotFoundError(
        f"no classifier found in {type(model).__name__}: it has no `nn.Linear` and no `get_classifier()`. "
        "Set `classifier=` to the dotted name of the final layer (its output must be the logits), and "
        "`features=` to the module whose output is the penultimate features if they are not the classifier's input."
    )


def classifier_parameters(
    module: nn.Module, num_classes: int, dim: int, model: nn.Module | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """The classifier's weight as ``(C, D)`` and bias as ``(C,)``, detached, full on every rank, or ``None`` where
    unavailable.

    Works for ``nn.Linear`` and any module whose ``weight`` has ``C * D`` entries (a 1x1 ``Conv2d`` head), and for
    sharded parameters (:func:`~lightning_neural_collapse.pipeline.sharding.full_parameters`): a collective then,
    so call it on every rank, outside forward and backward.
    """
    copy = is_sharded(module, model)  # a gathered parameter is resharded when the context ends: keep a copy
    with full_parameters(module, model):
        weight = _full(getattr(module, "weight", None))
        bias = _full(getattr(module, "bias", None))
        w = b = None
        if weight is not None and weight.numel() == num_classes * dim:
            w = weight.detach().reshape(num_classes, dim)
        if bias is not None and bias.numel() == num_classes:
            b = bias.detach().reshape(num_classes)
        if copy:
            w, b = (None if w is None else w.clone()), (None if b is None else b.clone())
    return w, b


class FeatureCapture:
    """Keeps the latest features and logits seen by forward hooks.

    Args:
        classifier: the final layer; its output are the logits, its input the features unless
            ``features`` is given.
        features: optional module whose output are the penultimate features.
        count_calls: count the classifier's forwards between two :meth:`clear` calls (:attr:`calls`), not
            those of a backward recompute (activation checkpointing). Off for compiled models, whose hooks
            must not keep Python counters.
        name: the classifier's dotted name, for messages.
        taps: the hidden layers' hooks (``layers=``), attached, cleared and removed with these.
    """

    def __init__(
        self,
        classifier: nn.Module,
        features: nn.Module | None = None,
        *,
        count_calls: bool = True,
        name: str = "",
        taps: LayerTaps | None = None,
    ) -> None:
        self.classifier = classifier
        self.taps = taps
        self.features_module = features
        self.count_calls = count_calls
        self.name = name
        self.calls = 0
        """Forwards of the classifier since the last :meth:`clear` (0 when not counted)."""
        self._handles: list[RemovableHandle] = []
        self._features: Tensor | None = None
        self._logits: Tensor | None = None

    @property
    def attached(self) -> bool:
        """Whether the hooks are registered."""
        return bool(self._handles)

    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        hook = self._counting_hook if self.count_calls else self._classifier_hook
        self._handles.append(self.classifier.register_forward_hook(hook))
        if self.features_module is not None:
            self._handles.append(self.features_module.register_forward_hook(self._features_hook))
        if self.taps is not None:
            self.taps.attach()

    def remove(self) -> None:
        """Remove the hooks and drop the captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.taps is not None:
            self.taps.remove()
        self.clear()

    def clear(self) -> None:
        """Forget the captured tensors (the layers' too) and the call count."""
        self._features = None
        self._logits = None
        self.calls = 0
        if self.taps is not None:
            self.taps.clear()

    @property
    def features(self) -> Tensor | None:
        """The features captured last, as the hook saw them (not flattened), or ``None``."""
        return self._features

    def set(self, features: Tensor, logits: Tensor) -> None:
        """Hold ``features`` and ``logits`` as if the hooks had captured them (for a re-bound classifier)."""
        self._features, self._logits = features.detach(), logits.detach()

    def peek(self) -> tuple[Tensor, Tensor | None] | None:
        """Like :meth:`take`, but keeps the tensors (for a check before the training step has ended)."""
        if self._features is None:
            return None
        return self._features, self._logits

    def take(self) -> tuple[Tensor, Tensor | None] | None:
        """``(features, logits)`` of the latest forward as the hooks saw them, then forget them; ``None`` if no
        features were captured. The logits are ``None`` when only the features module ran (a fused loss)."""
        captured = self.peek()
        self._features = self._logits = None
        if self.taps is not None:
            self.taps.clear()
        return captured

    def _classifier_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            self._logits = output.detach()
        if self.features_module is None and args and isinstance(args[0], Tensor):
            self._features = args[0].detach()

    def _counting_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch._C._current_graph_task_id() == -1:  # not a recompute inside backward
            self.calls += 1
        self._classifier_hook(module, args, output)

    def _features_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            self._features = output.detach()


class Binding:
    """The classifier (and optional features module) of a model, with their capture hooks attached.

    Args:
        model: the LightningModule (never the DDP/FSDP wrapper).
        classifier: dotted name of the classifier, or ``None`` to find it (:func:`find_classifier`).
        features: dotted name of the features module, or ``None`` for the classifier's input.
        count_calls: see :class:`FeatureCapture`.
        layers: ``layers=``: dotted names or globs of hidden layers to capture too (see
            :func:`~lightning_neural_collapse.pipeline.layer_taps.resolve_layers`), or ``None``.
        layer_reduce: ``"flatten"`` or ``"avgpool"``.

    Raises:
        ClassifierNotFoundError: for a name that is not a submodule, or no classifier to be found.
        LayerNotFoundError: for a ``layers=`` entry that matches no submodule.
    """

    def __init__(
        self,
        model: nn.Module,
        classifier: str | None,
        features: str | None = None,
        *,
        count_calls: bool = True,
        layers: Sequence[str] | None = None,
        layer_reduce: LayerReduce = "flatten",
    ) -> None:
        self.model = model
        self.name, self.module = find_classifier(model, classifier)
        self.automatic = classifier is None
        """Whether the classifier was found by a heuristic (and should be checked in the first step)."""
        self.features_name = features
        self.features_module: nn.Module | None = None
        if features is not None:
            modules = dict(model.named_modules())
            if features not in modules:
                raise ClassifierNotFoundError(
                    f"`features={features!r}` is not a submodule of {type(model).__name__}; some candidates: "
                    f"{sorted(modules)[-5:]}"
                )
            self.features_module = modules[features]
        self.taps: LayerTaps | None = None
        if layers:
            modules = dict(model.named_modules())
            self.taps = LayerTaps({name: modules[name] for name in resolve_layers(model, layers)}, layer_reduce)
        self.capture = FeatureCapture(
            self.module, self.features_module, count_calls=count_calls, name=self.name, taps=self.taps
        )
        self.capture.attach()

    def rebind(self, name: str) -> None:
        """Move the classifier hook to the submodule ``name`` (first step only: never under compile)."""
        self.capture.remove()
        self.name, self.module = find_classifier(self.model, name)
        self.capture = FeatureCapture(
            self.module, self.features_module, count_calls=self.capture.count_calls, name=self.name, taps=self.taps
        )
        self.capture.attach()

    def parameters(self, num_classes: int, dim: int) -> tuple[Tensor | None, Tensor | None]:
        """The classifier's ``(C, D)`` weight and ``(C,)`` bias, full on every rank (a collective when sharded),
        see :func:`classifier_parameters`."""
        return classifier_parameters(self.module, num_classes, dim, self.model)

    def has_weight(self, num_classes: int, dim: int) -> bool:
        """Whether the classifier has a ``(C, D)`` weight, from host metadata (no collective: a sharded weight is
        taken on trust until the measurement gathers it; a ``DTensor`` reports its global size)."""
        weight = getattr(self.module, "weight", None)
        if isinstance(weight, Tensor) and weight.numel() == num_classes * dim:
            return True
        return is_sharded(self.module, self.model)

    def peek(self) -> Captured | None:
        """The samples of the latest forward (kept): see :meth:`take`."""
        return self._samples(self.capture.peek())

    def take(self) -> Captured | None:
        """The samples of the latest forward, then forget them; ``None`` when nothing usable ran.

        When the features module ran but the classifier did not (a fused linear-cross-entropy loss), the decisions
        come from the classifier's weight (see :func:`~lightning_neural_collapse.pipeline.samples.samples_from_weight`).

        Raises:
            CaptureShapeError: for logits that are not one row of class scores per sample (or per position).
        """
        try:
            return self._samples(self.capture.peek())
        finally:
            self.capture.take()  # forget them, the layers' outputs too

    def tied_to(self) -> str | None:
        """The dotted name of another module whose ``weight`` is the classifier's (weight tying), or ``None``."""
        weight = getattr(self.module, "weight", None)
        if not isinstance(weight, Tensor):
            return None
        for name, module in self.model.named_modules():
            other = getattr(module, "weight", None)
            if module is not self.module and isinstance(other, Tensor) and other is weight:
                return name
        return None

    def _samples(self, raw: tuple[Tensor, Tensor | None] | None) -> Captured | None:
        if raw is None:
            return None
        features, logits = raw
        if logits is not None:
            captured = samples_of(features, logits, self.name)
        else:
            weight, bias = (_full(getattr(self.module, "weight", None)), _full(getattr(self.module, "bias", None)))
            if weight is None or weight.ndim != 2 or weight.shape[1] != features.shape[-1]:
                return None
            captured = samples_from_weight(features, weight, bias if bias is not None and bias.ndim == 1 else None)
        if self.taps is None:
            return captured
        batch = captured.layout[0] if captured.layout is not None else captured.num_samples
        return replace(captured, layers=self.taps.samples(batch, captured.layout))

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self.capture.remove()


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), Tensor)


def _name_of(model: nn.Module, target: Any) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _full(tensor: Tensor | None) -> Tensor | None:
    if tensor is None or not isinstance(tensor, Tensor):
        return None
    full_tensor = getattr(tensor, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else tensor

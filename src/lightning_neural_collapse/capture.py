"""Finding the classifier of a model and capturing its input (features) and output (logits).

One forward hook per module, registered once before training; the hook only keeps a detached
reference to the latest tensors, so it adds no computation, no host-device sync and no autograd
state, stays correct when it fires twice per step (activation checkpointing) and works under
``torch.compile`` (hooks present at compile time are traced).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class ClassifierNotFoundError(ValueError):
    """No usable classifier layer; the message names the option to set."""


def find_classifier(model: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The classifier of ``model``: by dotted ``name``, else timm's ``get_classifier()``, else the last ``nn.Linear``.

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
        if callable(getter):
            found = getter()
            found_name = found if isinstance(found, str) else _name_of(model, found)
            if found_name is not None and found_name in modules:
                return found_name, modules[found_name]
            owner_name = _name_of(model, owner)
            if isinstance(found, str) and owner_name is not None:
                full = f"{owner_name}.{found}" if owner_name else found
                if full in modules:
                    return full, modules[full]
    linears = _linear_names(model)
    if linears:
        return linears[-1], modules[linears[-1]]
    raise ClassifierNotFoundError(
        f"no classifier found in {type(model).__name__}: it has no `nn.Linear` and no `get_classifier()`. "
        "Set `classifier=` to the dotted name of the final layer (its output must be the logits), and "
        "`features=` to the module whose output is the penultimate features if they are not the classifier's input."
    )


def classifier_parameters(module: nn.Module, num_classes: int, dim: int) -> tuple[Tensor | None, Tensor | None]:
    """The classifier's weight as ``(C, D)`` and bias as ``(C,)``, detached, or ``None`` where unavailable.

    Works for ``nn.Linear`` and any module whose ``weight`` has ``C * D`` entries (a 1x1 ``Conv2d`` head);
    a sharded ``DTensor`` weight (FSDP2) is gathered, which is a collective: call on every rank.
    """
    weight = _full(getattr(module, "weight", None))
    bias = _full(getattr(module, "bias", None))
    w = None
    if weight is not None and weight.numel() == num_classes * dim:
        w = weight.detach().reshape(num_classes, dim)
    b = bias.detach().reshape(num_classes) if bias is not None and bias.numel() == num_classes else None
    return w, b


class FeatureCapture:
    """Keeps the latest features and logits seen by forward hooks.

    Args:
        classifier: the final layer; its output are the logits, its input the features unless
            ``features`` is given.
        features: optional module whose output are the penultimate features.
    """

    def __init__(self, classifier: nn.Module, features: nn.Module | None = None) -> None:
        self.classifier = classifier
        self.features_module = features
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
        self._handles.append(self.classifier.register_forward_hook(self._classifier_hook))
        if self.features_module is not None:
            self._handles.append(self.features_module.register_forward_hook(self._features_hook))

    def remove(self) -> None:
        """Remove the hooks and drop the captured tensors."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def clear(self) -> None:
        """Forget the captured tensors."""
        self._features = None
        self._logits = None

    def peek(self) -> tuple[Tensor, Tensor] | None:
        """Like :meth:`take`, but keeps the tensors (for a check before the training step has ended)."""
        if self._features is None or self._logits is None:
            return None
        return self._features.flatten(1), self._logits.flatten(1)

    def take(self) -> tuple[Tensor, Tensor] | None:
        """``(features (B, D), logits (B, C))`` of the latest forward, then forget them; ``None`` if none ran."""
        features, logits = self._features, self._logits
        self.clear()
        if features is None or logits is None:
            return None
        return features.flatten(1), logits.flatten(1)

    def _classifier_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            self._logits = output.detach()
        if self.features_module is None and args and isinstance(args[0], Tensor):
            self._features = args[0].detach()

    def _features_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            self._features = output.detach()


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


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


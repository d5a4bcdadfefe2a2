"""Which hidden layers to measure (``layers=``), and the forward hooks that keep their latest outputs.

:func:`resolve_layers` turns dotted names and glob patterns into module names, in the order the model registers
them (its depth order); a name that matches nothing is an error that lists the nearest candidates.
:class:`LayerTaps` keeps a detached reference to each layer's latest output (no computation in the hook, no
host sync, nothing kept for autograd), and :meth:`LayerTaps.samples` turns them into one row per sample, laid out
like the classifier's samples: ``(B, ...)`` flattened (or average-pooled over the spatial dimensions with
``layer_reduce="avgpool"``) for a classifier, ``(B, T, ...)`` to ``B * T`` rows for a sequence model.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_neural_collapse.pipeline.samples import CaptureShapeError

LayerReduce = Literal["flatten", "avgpool"]
LAYER_REDUCES: tuple[str, ...] = ("flatten", "avgpool")


class LayerNotFoundError(ValueError):
    """A ``layers=`` entry that names no submodule; the message lists candidates."""


def _matches(pattern: str, name: str) -> bool:
    """Whether dotted ``name`` matches ``pattern`` segment by segment (a ``*`` does not cross a dot)."""
    parts, pieces = pattern.split("."), name.split(".")
    return len(parts) == len(pieces) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, pieces, strict=True))


def resolve_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """The dotted names of the submodules of ``model`` that ``patterns`` select, in registration (depth) order.

    A pattern is a dotted name (``"layer3"``, ``"blocks.2.mlp"``) or a glob per dot-separated part
    (``"layer*"`` selects ``layer1`` ... ``layer4`` but not ``layer1.0``; ``"blocks.*"`` every block).

    Raises:
        LayerNotFoundError: for a pattern that selects nothing (the message lists the closest names).

    Example:
        >>> net = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), nn.Linear(2, 2))
        >>> resolve_layers(net, ["0.*", "1"])
        ['0.0', '0.1', '1']
    """
    names = [name for name, _ in model.named_modules() if name]
    chosen: set[str] = set()
    for pattern in patterns:
        found = [name for name in names if _matches(pattern, name)]
        if not found:
            close = difflib.get_close_matches(pattern, names, n=8, cutoff=0.5)
            top = [name for name in names if "." not in name]
            candidates = close or top[:12]
            raise LayerNotFoundError(
                f"`layers=` entry {pattern!r} matches no submodule of {type(model).__name__}; candidates: "
                f"{candidates} (dotted names as in `model.named_modules()`, globs such as 'layer*' per dotted part)"
            )
        chosen.update(found)
    return [name for name in names if name in chosen]


def layer_tag(name: str, reduce: LayerReduce) -> str:
    """The tag part of layer ``name``: the name itself, with ``@avgpool`` when pooled.

    Example:
        >>> layer_tag("layer3", "flatten"), layer_tag("layer3", "avgpool")
        ('layer3', 'layer3@avgpool')
    """
    return name if reduce == "flatten" else f"{name}@{reduce}"


class LayerTaps:
    """Forward hooks on the listed layers, each keeping its module's latest output (detached).

    Args:
        modules: the layers by dotted name, in depth order.
        reduce: ``"flatten"`` or ``"avgpool"``.
    """

    def __init__(self, modules: dict[str, nn.Module], reduce: LayerReduce = "flatten") -> None:
        self.modules = modules
        self.reduce = reduce
        self._outputs: dict[str, Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def names(self) -> list[str]:
        """The layers' dotted names, in depth order."""
        return list(self.modules)

    def attach(self) -> None:
        """Register one forward hook per layer (idempotent)."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def keep(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, Tensor):
                self._outputs[name] = first.detach()

        return keep

    def clear(self) -> None:
        """Forget the kept outputs."""
        self._outputs = {}

    def remove(self) -> None:
        """Remove the hooks and forget the outputs."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def samples(self, batch: int, layout: tuple[int, int] | None) -> dict[str, Tensor]:
        """Each layer's latest output as ``(N, D_l)`` rows, laid out like the classifier's ``N`` samples (``batch``
        rows, or ``B * T`` for a ``(B, T)`` token ``layout``); a layer that did not run is absent. Shapes only, no
        host sync.

        Raises:
            CaptureShapeError: for an output whose leading dimensions are not the samples'.
        """
        rows: dict[str, Tensor] = {}
        for name, output in self._outputs.items():
            rows[name] = self._rows(name, output, batch, layout)
        return rows

    def _rows(self, name: str, output: Tensor, batch: int, layout: tuple[int, int] | None) -> Tensor:
        if layout is not None:
            if output.ndim < 3 or tuple(output.shape[:2]) != layout:
                raise CaptureShapeError(
                    f"layer `{name}` outputs {tuple(output.shape)}, not (batch, positions, ...) = {layout} + (...) "
                    "like the classifier's token samples: list in `layers=` the modules whose output has one row "
                    "per token"
                )
            return output.reshape(layout[0] * layout[1], -1)
        if output.ndim < 2 or output.shape[0] != batch:
            raise CaptureShapeError(
                f"layer `{name}` outputs {tuple(output.shape)}, not (batch={batch}, ...): list in `layers=` modules "
                "whose output has one row per sample"
            )
        if self.reduce == "avgpool" and output.ndim > 2:
            return output.flatten(2).mean(dim=2)
        return output.flatten(1)

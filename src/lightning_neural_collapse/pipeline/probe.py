"""A one-step check that an automatically found classifier really is the model's final layer.

``find_classifier`` falls back to the last ``nn.Linear`` of a model. When the real head is something else
that runs after it (a 1x1 ``Conv2d``, a cosine classifier, a custom module with its own weight), that
Linear's output is not the logits and every number would be silently wrong. During the forward pass of
the first training step, :class:`FinalLayerProbe` watches every module call (a global forward hook that
is removed right after) and, through the autograd graph,

- lists the modules with parameters of their own that consume the classifier's output (the classifier
  is then not the final layer: an error), and
- lists the other ``nn.Linear`` layers whose output reaches the loss without passing through another
  layer with parameters (auxiliary or projection heads: the choice is ambiguous), and
- lists the ``nn.Linear`` layers whose output feeds a softmax or a classification loss (cross-entropy,
  NLL, margin losses) directly: the logits path. A projection or auxiliary head defined after the
  classifier is thereby told apart from the head that produces the logits.

Nothing runs after the first step. Compiled models are left alone (:func:`is_compiled`): a global hook
would cost them a recompilation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn
from torch.nn.modules.module import register_module_forward_hook
from torch.utils.hooks import RemovableHandle

_MAX_NODES = 100_000  # bound on one walk of the autograd graph (first step only)
_LOGIT_CONSUMERS = ("Softmax", "NllLoss", "CrossEntropy", "MarginLoss")
"""Substrings of the autograd node names of the operations that take logits (softmax, log-softmax, NLL, ...)."""


class FinalLayerProbe:
    """Watches one training forward for layers that run on, or next to, the assumed ``classifier``.

    Args:
        model: the module whose submodules are watched (others are ignored).
        classifier: the layer assumed to produce the logits.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> probe = FinalLayerProbe(net, net[0])  # not the final layer
        >>> probe.start()
        >>> loss = net(torch.randn(2, 4)).sum()
        >>> probe.consumers, probe.other_heads(loss)
        (['2'], ['2'])
        >>> probe.stop()
    """

    def __init__(self, model: nn.Module, classifier: nn.Module) -> None:
        self._names = {id(module): name for name, module in model.named_modules()}
        self._linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
        self._classifier = classifier
        own = self._names.get(id(classifier), "")
        parts = own.split(".") if own else []
        self._skip = {".".join(parts[:i]) for i in range(len(parts))} | {own}  # the classifier and its ancestors
        self._inside = own + "." if own else None
        self._output_node: Any = None
        self._boundaries: dict[int, tuple[Any, list[str]]] = {}  # outputs of the modules with own parameters
        self._handle: RemovableHandle | None = None
        self.consumers: list[str] = []
        """Dotted names of the modules with own parameters that took the classifier's output, in call order."""
        self.linear_io: dict[str, tuple[Tensor, Tensor]] = {}
        """Detached ``(input, output)`` of the last call of every ``nn.Linear`` in the watched step."""

    def start(self) -> None:
        """Start watching (idempotent)."""
        if self._handle is None:
            self._handle = register_module_forward_hook(self._hook)

    def stop(self) -> None:
        """Stop watching and drop every reference to the step's autograd graph (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._output_node = None
        self._boundaries.clear()
        self.linear_io.clear()

    def other_heads(self, loss: Any) -> list[str]:
        """The ``nn.Linear`` layers other than the classifier whose output reaches ``loss`` directly (not
        through another layer with parameters) and does not feed the classifier (a loss term on the features
        is fine), in no particular order; ``[]`` when unknown."""
        if not isinstance(loss, Tensor) or loss.grad_fn is None or self._output_node is None:
            return []
        found: dict[str, Any] = {}
        output, boundaries = self._output_node, self._boundaries
        stops = lambda node: node is output or id(node) in boundaries  # noqa: E731
        for node in _walk([loss.grad_fn], stop=stops):
            boundary = boundaries.get(id(node))
            if boundary is not None:
                found.update({name: node for name in boundary[1][:1] if name in self._linears})
        return [name for name, node in found.items() if not _reaches(self._output_node, node)]

    def reaches_loss(self, loss: Any) -> bool | None:
        """Whether the classifier's output of the watched step is on the path to ``loss``; ``None`` when
        unknown (no loss with a graph, or the classifier did not run)."""
        if not isinstance(loss, Tensor) or loss.grad_fn is None or self._output_node is None:
            return None
        return _reaches(loss.grad_fn, self._output_node)

    def logit_heads(self, loss: Any) -> list[str]:
        """The ``nn.Linear`` layers (the classifier included) whose output feeds a softmax or a classification
        loss of ``loss`` without another layer with parameters in between, sorted; ``[]`` when unknown."""
        if not isinstance(loss, Tensor) or loss.grad_fn is None:
            return []
        heads: set[str] = set()
        own = self._names.get(id(self._classifier), "")
        for start in _nodes_named(loss.grad_fn, _LOGIT_CONSUMERS):
            for node in _first_boundaries(start, self._boundaries, self._output_node):
                if node is self._output_node:
                    heads.add(own)
                else:
                    heads.update(name for name in self._boundaries[id(node)][1][:1] if name in self._linears)
        return sorted(heads)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        name = self._names.get(id(module))
        if (
            name is not None
            and name in self._linears
            and args
            and isinstance(args[0], Tensor)
            and isinstance(output, Tensor)
        ):
            self.linear_io[name] = (args[0].detach(), output.detach())
        if module is self._classifier:
            node = output.grad_fn if isinstance(output, Tensor) else None
            if node is not None:  # a later call (two forwards per step) replaces an earlier one
                self._output_node = node
                self.consumers.clear()
            return
        if not isinstance(output, Tensor) or output.grad_fn is None:
            return
        if name is None or name in self._skip or (self._inside is not None and name.startswith(self._inside)):
            return
        if next(module.parameters(recurse=False), None) is None:
            return
        node = output.grad_fn
        self._boundaries.setdefault(id(node), (node, []))[1].append(name)
        if self._output_node is not None and name not in self.consumers and _reaches(node, self._output_node):
            self.consumers.append(name)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs through ``torch.compile`` (``Trainer.fit(torch.compile(m))``,
    ``torch.compile(submodule)`` or ``module.compile()``): a global hook there would force a recompilation.

    Example:
        >>> is_compiled(nn.Linear(2, 2))
        False
    """
    if getattr(model, "_compiler_ctx", None):  # Lightning unwrapped a compiled LightningModule
        return True
    return any(
        hasattr(module, "_orig_mod") or getattr(module, "_compiled_call_impl", None) is not None
        for module in model.modules()
    )


def _walk(roots: list[Any], stop: Callable[[Any], bool] = lambda node: False) -> Iterator[Any]:
    """The autograd nodes reachable from ``roots`` (each once, depth first, bounded by ``_MAX_NODES``), not
    going below the nodes for which ``stop`` is true (they are yielded)."""
    stack = list(roots)
    seen: set[int] = set()
    while stack and len(seen) < _MAX_NODES:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        if not stop(node):
            stack.extend(next_node for next_node, _ in getattr(node, "next_functions", ()))


def _reaches(start: Any, target: Any) -> bool:
    """Whether ``target`` is among the autograd nodes ``start`` depends on."""
    return any(node is target for node in _walk([start]))


def _nodes_named(root: Any, patterns: tuple[str, ...]) -> list[Any]:
    """The autograd nodes under ``root`` whose type name contains one of ``patterns``."""
    return [node for node in _walk([root]) if any(pattern in type(node).__name__ for pattern in patterns)]


def _first_boundaries(start: Any, boundaries: dict[int, tuple[Any, list[str]]], output_node: Any) -> list[Any]:
    """The module-output nodes first met below ``start`` (the walk stops at each)."""
    below = [next_node for next_node, _ in getattr(start, "next_functions", ())]
    is_boundary = lambda node: node is output_node or id(node) in boundaries  # noqa: E731
    return [node for node in _walk(below, stop=is_boundary) if is_boundary(node)]

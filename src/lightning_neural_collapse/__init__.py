"""Watch Neural Collapse happen in a PyTorch Lightning training run.

``Trainer(callbacks=[NeuralCollapseCallback()])`` logs NC1-NC4 and the start of the Terminal Phase of
Training; :mod:`lightning_neural_collapse.functional` holds the math and
:mod:`lightning_neural_collapse.metrics` the streaming metrics, both usable without Lightning: importing them
loads no ``lightning``, and :mod:`~lightning_neural_collapse.functional` needs nothing but ``torch``: every name
here is imported when first used (the callback loads ``lightning`` and ``matplotlib``; the metrics load
``torchmetrics``, which itself imports ``matplotlib`` when it is installed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_neural_collapse.callback import NeuralCollapseCallback
    from lightning_neural_collapse.metrics import ClassificationError, NCCMismatch, NeuralCollapse
    from lightning_neural_collapse.tpt import TPTDetector

__version__ = "0.1.0"

__all__ = [
    "ClassificationError",
    "NCCMismatch",
    "NeuralCollapse",
    "NeuralCollapseCallback",
    "TPTDetector",
    "__version__",
]

_LAZY = {
    "ClassificationError": "lightning_neural_collapse.metrics",
    "NCCMismatch": "lightning_neural_collapse.metrics",
    "NeuralCollapse": "lightning_neural_collapse.metrics",
    "NeuralCollapseCallback": "lightning_neural_collapse.callback",
    "TPTDetector": "lightning_neural_collapse.tpt",
}


def __getattr__(name: str) -> Any:
    """Import ``name`` from its module when it is first used (then it is an ordinary attribute)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_neural_collapse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Watch Neural Collapse happen in a PyTorch Lightning training run.

``Trainer(callbacks=[NeuralCollapseCallback()])`` logs NC1-NC4 and the start of the Terminal Phase of
Training; :mod:`lightning_neural_collapse.functional` holds the math and
:mod:`lightning_neural_collapse.metrics` the streaming metrics, both usable without Lightning.
"""

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

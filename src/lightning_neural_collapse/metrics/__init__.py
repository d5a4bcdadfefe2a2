"""Streaming ``torchmetrics.Metric`` shells over the functional core: fixed-shape sum states, summed over ranks.

- :class:`NeuralCollapse`: per-class sufficient statistics, and every SPEC.md key but NC4 from them;
- :class:`NCCMismatch`: NC4, the share of samples where the network and the nearest class centre disagree;
- :class:`ClassificationError`: the share of misclassified samples (what defines TPT).
"""

from lightning_neural_collapse.metrics.base import SumStateMetric, all_reduce_sum
from lightning_neural_collapse.metrics.error import ClassificationError
from lightning_neural_collapse.metrics.ncc import NCCMismatch
from lightning_neural_collapse.metrics.neural_collapse import NeuralCollapse

__all__ = ["ClassificationError", "NCCMismatch", "NeuralCollapse", "SumStateMetric", "all_reduce_sum"]

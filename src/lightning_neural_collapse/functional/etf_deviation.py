"""Per-pair and per-class deviations from a simplex ETF, the values behind the histograms."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_neural_collapse.functional.collapse import centred_class_means
from lightning_neural_collapse.functional.nc2 import pairwise_cosines
from lightning_neural_collapse.functional.nc3 import classwise_cosines
from lightning_neural_collapse.functional.statistics import ClassStatistics, GlobalMean


def etf_deviation(
    stats: ClassStatistics, weight: Tensor | None = None, *, global_mean: GlobalMean = "classes"
) -> dict[str, Tensor]:
    """Finite float64 values whose spread shows the distance to a simplex ETF, by name.

    - ``cosines_means``: pairwise cosines of the centred class means (ideal ``-1/(C-1)``);
    - ``norms_means``: ``||mu_c - mu_G||`` divided by their mean (ideal 1);
    - with ``weight``: ``cosines_weights`` and ``norms_weights`` likewise for the classifier rows, and
      ``cosine_weight_mean``, the per-class ``cos(w_c, mu_c - mu_G)`` (ideal 1).

    Non-finite values (from a zero vector) are dropped, so a tensor may be empty.

    Example:
        >>> from lightning_neural_collapse.functional import class_statistics
        >>> stats = class_statistics(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 2]))
        >>> [round(v, 3) for v in etf_deviation(stats)["norms_means"].tolist()]
        [1.14, 1.14, 0.721]
    """
    centred = centred_class_means(stats, global_mean)
    values = {"cosines_means": pairwise_cosines(centred), "norms_means": _relative_norms(centred)}
    if weight is not None:
        w = weight.to(torch.float64)[stats.present]
        values["cosines_weights"] = pairwise_cosines(w)
        values["norms_weights"] = _relative_norms(w)
        values["cosine_weight_mean"] = classwise_cosines(w, centred)
    return {name: v[torch.isfinite(v)] for name, v in values.items()}


def ideal_values(num_classes: int) -> dict[str, float]:
    """The value each :func:`etf_deviation` entry takes at a simplex ETF of ``num_classes`` classes."""
    cos = -1.0 / (num_classes - 1) if num_classes > 1 else float("nan")
    return {
        "cosines_means": cos,
        "cosines_weights": cos,
        "norms_means": 1.0,
        "norms_weights": 1.0,
        "cosine_weight_mean": 1.0,
    }


def _relative_norms(vectors: Tensor) -> Tensor:
    norms = vectors.norm(dim=1)
    return norms / norms.mean()

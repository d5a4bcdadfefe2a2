"""Per-pair and per-class deviations from a simplex ETF, the values behind the histograms."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neural_collapse.functional.collapse import Geometry, centred_class_means
from lightning_neural_collapse.functional.nc3 import classwise_cosines
from lightning_neural_collapse.functional.pairs import COSINE_EDGES, PairSums, pair_sums
from lightning_neural_collapse.functional.statistics import ClassStatistics, GlobalMean


@dataclass(frozen=True)
class Binned:
    """Values already counted into fixed bins (the ``C (C - 1)`` pairwise cosines: never held one by one).

    Attributes:
        edges: ``(K + 1,)`` bin edges; counts: ``(K,)`` int64 counts; total, sum, sum_sq, min, max: of the values.
    """

    edges: Tensor
    counts: Tensor
    total: int
    sum: float
    sum_sq: float
    min: float
    max: float

    @staticmethod
    def of(sums: PairSums) -> Binned | None:
        """The cosine histogram of ``sums``, or ``None`` when it has none or no finite cosine."""
        if sums.histogram is None or sums.edges is None or sums.count == 0 or not sums.cos_min <= sums.cos_max:
            return None
        return Binned(sums.edges, sums.histogram, sums.count, sums.cos_sum, sums.cos_sq_sum, sums.cos_min, sums.cos_max)


def etf_deviation(
    stats: ClassStatistics,
    weight: Tensor | None = None,
    *,
    global_mean: GlobalMean = "classes",
    geometry: Geometry | None = None,
    edges: Tensor = COSINE_EDGES,
) -> dict[str, Tensor | Binned]:
    """What shows the distance to a simplex ETF, by name: finite float64 values, or :class:`Binned` counts.

    - ``cosines_means``: the pairwise cosines of the centred class means (ideal ``-1/(C-1)``), binned;
    - ``norms_means``: ``||mu_c - mu_G||`` divided by their mean (ideal 1);
    - with ``weight``: ``cosines_weights`` (binned) and ``norms_weights`` likewise for the classifier rows, and
      ``cosine_weight_mean``, the per-class ``cos(w_c, mu_c - mu_G)`` (ideal 1).

    ``geometry`` may pass a :func:`~lightning_neural_collapse.functional.collapse.geometry` computed with these
    ``edges`` (its histograms are used, no second pass). Non-finite values are dropped, so a tensor may be empty,
    and a binned entry is left out when there is no pair.

    Example:
        >>> from lightning_neural_collapse.functional import class_statistics
        >>> stats = class_statistics(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 2]))
        >>> deviation = etf_deviation(stats)
        >>> [round(v, 3) for v in deviation["norms_means"].tolist()], deviation["cosines_means"].total
        ([1.14, 1.14, 0.721], 6)
    """
    centred = centred_class_means(stats, global_mean)
    means = geometry.means if geometry is not None and geometry.means is not None else None
    if means is None or means.histogram is None:
        means = pair_sums(centred, edges=edges)
    values: dict[str, Tensor | Binned | None] = {
        "cosines_means": Binned.of(means),
        "norms_means": _relative_norms(centred),
    }
    if weight is not None:
        w = weight.to(torch.float64)[stats.present]
        rows = geometry.weights if geometry is not None and geometry.weights is not None else None
        if rows is None or rows.histogram is None:
            rows = pair_sums(w, edges=edges)
        values["cosines_weights"] = Binned.of(rows)
        values["norms_weights"] = _relative_norms(w)
        values["cosine_weight_mean"] = classwise_cosines(w, centred)
    out: dict[str, Tensor | Binned] = {}
    for name, value in values.items():
        if isinstance(value, Tensor):
            out[name] = value[torch.isfinite(value)]
        elif value is not None:
            out[name] = value
    return out


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

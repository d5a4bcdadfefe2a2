"""Per-pair and per-class deviations from a simplex ETF, the values behind the histograms."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neural_collapse.functional.collapse import Geometry, centred_class_means
from lightning_neural_collapse.functional.nc3 import classwise_cosines
from lightning_neural_collapse.functional.pairs import PairSums, pair_sums
from lightning_neural_collapse.functional.statistics import ClassStatistics, GlobalMean

BIN_WIDTH = 0.0025
"""Width of every histogram bin: 800 bins span ``[-1, 1]`` (cosines), 800 span ``[0, 2]`` (relative norms)."""


def centred_grid(centre: float, low: float, high: float, width: float = BIN_WIDTH) -> Tensor:
    """Uniform float64 bin edges ``width`` apart that cover ``[low, high]`` and have ``centre`` in the middle of a bin.

    Example:
        >>> edges = centred_grid(1.0, 0.0, 2.0)
        >>> len(edges) - 1, round(float(edges[0]), 5), round(float(edges[-1]), 5)
        (801, -0.00125, 2.00125)
    """
    first = centre - width / 2 - width * math.ceil((centre - width / 2 - low) / width - 1e-9)
    bins = math.ceil((high - first) / width - 1e-9)
    return first + width * torch.arange(bins + 1, dtype=torch.float64)


def cosine_edges(num_classes: int, width: float = BIN_WIDTH) -> Tensor:
    """Bin edges for the pairwise cosines of ``num_classes`` vectors: :func:`centred_grid` over ``[-1, 1]`` with the
    simplex value ``-1/(C-1)`` at a bin's centre (0 for fewer than two classes), so that the collapse is one bin.

    Example:
        >>> edges = cosine_edges(5)
        >>> centre = int(((-0.25 - edges[0]) / 0.0025).floor())
        >>> round(float(edges[centre] + edges[centre + 1]) / 2, 6)
        -0.25
    """
    ideal = -1.0 / (num_classes - 1) if num_classes > 1 else 0.0
    return centred_grid(ideal, -1.0, 1.0, width)


NORM_EDGES = centred_grid(1.0, 0.0, 2.0)
"""Bin edges for norms relative to their mean (ideal 1, at a bin's centre): ``[0, 2]``, larger ones in the last bin."""
CLASS_COSINE_EDGES = centred_grid(1.0, -1.0, 1.0)
"""Bin edges for the per-class ``cos(w_c, mu_c - mu_G)`` (ideal 1, at the centre of the top bin)."""


@dataclass(frozen=True)
class Binned:
    """Values counted into fixed uniform bins (the ``C (C - 1)`` pairwise cosines are never held one by one).

    Attributes:
        edges: ``(K + 1,)`` uniform bin edges; counts: ``(K,)`` int64 counts, values outside the edges in the end
            bins; total, sum, sum_sq, min, max: of the values themselves.
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

    @staticmethod
    def count(values: Tensor, edges: Tensor) -> Binned | None:
        """The finite entries of ``values`` counted into the uniform bins of ``edges``, or ``None`` when none is finite.

        Example:
            >>> binned = Binned.count(torch.tensor([0.1, 0.35, 7.0, float("nan")]), torch.linspace(0, 1, 5))
            >>> binned.counts.tolist(), binned.total, binned.max
            ([1, 1, 0, 1], 3, 7.0)
        """
        v = values.detach().reshape(-1).to(torch.float64)
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return None
        edges = edges.to(device=v.device, dtype=torch.float64)
        bins, low, high = len(edges) - 1, float(edges[0]), float(edges[-1])
        index = ((v - low) * (bins / (high - low))).floor_().clamp_(0, bins - 1).long()
        stats = torch.stack([v.sum(), v.square().sum(), v.min(), v.max()]).tolist()
        return Binned(edges, torch.bincount(index, minlength=bins), v.numel(), *stats)


def etf_deviation(
    stats: ClassStatistics,
    weight: Tensor | None = None,
    *,
    global_mean: GlobalMean = "classes",
    geometry: Geometry | None = None,
) -> dict[str, Binned]:
    """What shows the distance to a simplex ETF, by name, each counted into fixed bins (:class:`Binned`):

    - ``cosines_means``: the pairwise cosines of the centred class means (ideal ``-1/(C-1)``; bins
      :func:`cosine_edges`);
    - ``norms_means``: ``||mu_c - mu_G||`` divided by their mean (ideal 1; bins :data:`NORM_EDGES`);
    - with ``weight``: ``cosines_weights`` and ``norms_weights`` likewise for the classifier rows, and
      ``cosine_weight_mean``, the per-class ``cos(w_c, mu_c - mu_G)`` (ideal 1; bins :data:`CLASS_COSINE_EDGES`).

    ``geometry`` may pass a :func:`~lightning_neural_collapse.functional.collapse.geometry` computed with
    ``edges=cosine_edges(C)`` (its histograms are used, no second pair pass). Non-finite values are left out, and an
    entry with no finite value (or no pair) is left out.

    Example:
        >>> from lightning_neural_collapse.functional import class_statistics
        >>> stats = class_statistics(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 2]))
        >>> deviation = etf_deviation(stats)
        >>> deviation["cosines_means"].total, round(deviation["norms_means"].max, 3)
        (6, 1.14)
    """
    centred = centred_class_means(stats, global_mean)
    edges = cosine_edges(centred.shape[0])
    means = geometry.means if geometry is not None and geometry.means is not None else None
    if means is None or not _same(means.edges, edges):
        means = pair_sums(centred, edges=edges)
    values: dict[str, Binned | None] = {
        "cosines_means": Binned.of(means),
        "norms_means": Binned.count(_relative_norms(centred), NORM_EDGES),
    }
    if weight is not None:
        w = weight.to(torch.float64)[stats.present]
        rows = geometry.weights if geometry is not None and geometry.weights is not None else None
        if rows is None or not _same(rows.edges, edges):
            rows = pair_sums(w, edges=edges)
        values["cosines_weights"] = Binned.of(rows)
        values["norms_weights"] = Binned.count(_relative_norms(w), NORM_EDGES)
        values["cosine_weight_mean"] = Binned.count(classwise_cosines(w, centred), CLASS_COSINE_EDGES)
    return {name: value for name, value in values.items() if value is not None}


def _same(edges: Tensor | None, wanted: Tensor) -> bool:
    return edges is not None and edges.shape == wanted.shape and bool(torch.equal(edges.cpu(), wanted))


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

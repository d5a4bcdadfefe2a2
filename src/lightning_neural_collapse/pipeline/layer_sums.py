"""One rank's per-layer sums for one unit of measurement (``layers=``), and what they give once reduced.

Per listed layer, in depth order, a :class:`~lightning_neural_collapse.metrics.layer.LayerMoments` (the per-class
means and variances: NC1's trace ratio, the CDNV, NC2 of the means) and, where the class means are known before
the samples, a :class:`~lightning_neural_collapse.metrics.layer.LayerProjection` (NCC accuracy, and NC1 through
``P = pinv(M)``). Which, where:

- online training: moments, and projections against the previous measurement's means and ``P`` (keys
  ``nc1_prev_means``, ``ncc_accuracy_prev_means``);
- exact mode: pass 1 the moments; pass 2 the projections against pass 1's means (``nc1``, ``ncc_accuracy``);
- validation: projections against the latest training means, NCC only (``ncc_accuracy``).

:meth:`LayerSums.reduce` runs the same collectives on every rank (for each layer in order: its moments, then its
projection), since the layers, their widths and the references are identical on every rank. It is called from
:mod:`~lightning_neural_collapse.pipeline.compute` only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_neural_collapse.functional.layers import (
    MeanStatistics,
    depth_fit,
    nc1_directions,
    statistics_values,
)
from lightning_neural_collapse.functional.statistics import GlobalMean
from lightning_neural_collapse.metrics.layer import LayerMoments, LayerProjection


@dataclass(frozen=True)
class LayerCentres:
    """One layer's class means of a measurement, identical on every rank: the next measurement's shift and centres.

    Attributes:
        means: ``(C, D_l)`` float64 class means.
        present: ``(C,)`` bool, the classes measured.
        directions: ``(k, D_l)`` NC1's ``P`` of these means
            (:func:`~lightning_neural_collapse.functional.layers.nc1_directions`), computed when the measurement
            finishes, so that no step has to (an SVD reads values on the host).
    """

    means: Tensor
    present: Tensor
    directions: Tensor

    @classmethod
    def of(cls, means: Tensor, present: Tensor, global_mean: GlobalMean = "classes") -> LayerCentres:
        """The centres of ``means`` with their directions (on the means' device)."""
        return cls(means, present, nc1_directions(means, present, global_mean))

    def cpu(self) -> LayerCentres:
        """A copy on the CPU (for the checkpointed state)."""
        return LayerCentres(self.means.detach().cpu(), self.present.detach().cpu(), self.directions.detach().cpu())


Centres = Mapping[str, LayerCentres]
"""Per layer name, its :class:`LayerCentres`."""

FIT_KEYS: tuple[str, ...] = ("nc1_depth_slope", "nc1_depth_ratio", "nc1_depth_pearson_r")
"""He & Su's fit of ``log NC1`` against depth over the listed layers, logged under ``layers/``."""


@dataclass(frozen=True)
class LayerResult:
    """One layer's reduced numbers (identical on every rank)."""

    name: str
    tag: str
    statistics: MeanStatistics | None
    nc1: float
    ncc_accuracy: float


@dataclass(frozen=True)
class LayerResults:
    """Every listed layer's :class:`LayerResult`, in depth order, and how to name and measure them."""

    layers: tuple[LayerResult, ...]
    suffix: str
    global_mean: GlobalMean
    dtype: torch.dtype
    known_centres: dict[str, LayerCentres] | None = field(default=None, compare=False, repr=False)
    """:meth:`centres` once computed (an SVD per layer: exact mode needs them for its second pass and again to
    keep them, and :meth:`merged` passes them on)."""

    def centres(self) -> dict[str, LayerCentres]:
        """The layers' class means, present classes and NC1 directions (the next measurement's shift, centres and
        ``P``), on the statistics' device; computed once, outside any training step."""
        if self.known_centres is None:
            centres = {
                r.name: LayerCentres.of(r.statistics.means, r.statistics.present, self.global_mean)
                for r in self.layers
                if r.statistics is not None
            }
            object.__setattr__(self, "known_centres", centres)  # a cache of values derived from frozen fields
        assert self.known_centres is not None
        return self.known_centres

    def values(self, *, statistics: bool = True) -> dict[str, float]:
        """``layers/<tag>/<key>`` for every defined key (``statistics``: the moments' keys too), and He & Su's depth
        fit of the layers' NC1 (``layers/nc1_depth_*``) when two or more layers have one."""
        values: dict[str, float] = {}
        for result in self.layers:
            head = f"layers/{result.tag}/"
            if statistics and result.statistics is not None:
                measured = statistics_values(result.statistics, self.global_mean, dtype=self.dtype)
                values.update({head + key: value for key, value in measured.items()})
            for key, value in (("nc1", result.nc1), ("ncc_accuracy", result.ncc_accuracy)):
                if math.isfinite(value):
                    values[f"{head}{key}{self.suffix}"] = value
        fit = depth_fit([result.nc1 for result in self.layers])
        if fit is not None:
            for key, value in zip(FIT_KEYS, (fit.slope, fit.ratio, fit.pearson_r), strict=True):
                if math.isfinite(value):
                    values[f"layers/{key}{self.suffix}"] = value
        return {key: value for key, value in values.items() if math.isfinite(value)}

    def merged(self, other: LayerResults) -> LayerResults:
        """These layers' statistics with ``other``'s projections (exact mode: pass 1 and pass 2)."""
        by_name = {r.name: r for r in other.layers}
        layers = tuple(
            LayerResult(
                r.name,
                r.tag,
                r.statistics,
                by_name[r.name].nc1 if r.name in by_name else math.nan,
                by_name[r.name].ncc_accuracy if r.name in by_name else math.nan,
            )
            for r in self.layers
        )
        return LayerResults(layers, other.suffix, self.global_mean, self.dtype, self.known_centres)  # same means


class LayerSums:
    """One rank's per-layer sums for one unit of measurement.

    Args:
        dims: the layers' widths ``D_l`` by dotted name, in depth order.
        tags: the layers' tag parts (``layer3`` or ``layer3@avgpool``) by name.
        num_classes: ``C``.
        device: where the states live.
        moments: accumulate the per-class means and variances.
        references: the class means (and present classes) per layer to shift the moments by and to project
            against, identical on every rank; a layer without one has no projection.
        project: measure the samples against ``references`` (NCC, and with ``directions`` NC1 through ``P``).
        directions: with ``project``, NC1 through ``P`` too (not in validation).
        subset: ``(C,)`` bool, the classes measured (``classes=``), or ``None``.
        suffix: the projection keys' suffix (``"_prev_means"`` online, ``""`` otherwise).
        global_mean: SPEC.md's ``mu_G`` choice.
        accumulate_dtype: dtype of the projection products and of the pair metrics' Gram tiles.
        sum_dtype: dtype of the sums (float32 only on devices without float64).

    Example:
        >>> sums = LayerSums({"a": 1}, {"a": "a"}, 2, torch.device("cpu"), moments=True)
        >>> sums.add({"a": torch.tensor([[0.0], [2.0], [6.0], [8.0]])}, torch.tensor([0, 0, 1, 1]), torch.ones(4) > 0)
        >>> sums.reduce().values()["layers/a/nc1_trace_ratio"]  # within 1, between 3 ** 2
        0.1111111111111111
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        tags: Mapping[str, str],
        num_classes: int,
        device: torch.device,
        *,
        moments: bool,
        references: Centres | None = None,
        project: bool = False,
        directions: bool = True,
        subset: Tensor | None = None,
        suffix: str = "",
        global_mean: GlobalMean = "classes",
        accumulate_dtype: torch.dtype = torch.float64,
        sum_dtype: torch.dtype = torch.float64,
    ) -> None:
        self.dims, self.tags, self.suffix = dict(dims), dict(tags), suffix
        self.global_mean, self.dtype = global_mean, accumulate_dtype
        self.subset = None if subset is None else subset.to(device=device, dtype=torch.bool)
        self.moments: dict[str, LayerMoments] = {}
        self.projections: dict[str, LayerProjection] = {}
        references = references or {}
        for name, dim in self.dims.items():  # no host read here: this runs in a training step
            reference = references.get(name)
            if reference is not None and tuple(reference.means.shape) != (num_classes, dim):
                reference = None  # another model, or the layer changed width
            if moments:
                shift = reference.means.to(device) if reference is not None else None
                self.moments[name] = LayerMoments(num_classes, dim, shift, sum_dtype=sum_dtype).to(device)
            if project and reference is not None:
                means, present = reference.means.to(device), reference.present.to(device=device, dtype=torch.bool)
                if subset is not None:
                    present = present & subset.to(device)
                p = reference.directions.to(device) if directions else None
                self.projections[name] = LayerProjection(means, present, p, accumulate_dtype=accumulate_dtype).to(
                    device
                )

    def add(self, layers: Mapping[str, Tensor], labels: Tensor, counted: Tensor) -> None:
        """Add one forward's ``(N, D_l)`` layer rows with the ``(N,)`` class indices and which samples count.

        Raises:
            RuntimeError: when a listed layer did not run in this forward (the unit is then skipped).
        """
        if self.subset is not None:  # the measured classes only (``classes=``)
            counted = counted & self.subset.index_select(0, labels.clamp(0, self.subset.shape[0] - 1))
        for name in self.dims:
            rows = layers.get(name)
            if rows is None:
                raise RuntimeError(f"the layer `{name}` listed in `layers=` did not run in this forward")
            if name in self.moments:
                self.moments[name].update(rows, labels, counted)
            if name in self.projections:
                self.projections[name].update(rows, labels, counted)

    def reduce(self) -> LayerResults:
        """Every layer's numbers summed over ranks (collectives, the same on every rank: per layer in order, its
        moments, then its projection; the projection's NC1 uses the layer's reduced means when there are moments,
        else the centres themselves, as in exact mode's second pass)."""
        results = []
        for name in self.dims:
            stats = self.moments[name].statistics() if name in self.moments else None
            nc1, accuracy = math.nan, math.nan
            if name in self.projections:
                projection = self.projections[name]
                nc1, accuracy = projection.values(stats.means if stats is not None else projection.centres)
            results.append(LayerResult(name, self.tags[name], stats, nc1, accuracy))
        return LayerResults(tuple(results), self.suffix, self.global_mean, self.dtype)

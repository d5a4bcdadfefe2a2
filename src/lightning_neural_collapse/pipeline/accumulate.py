"""What one rank adds up from the samples of one unit of measurement, without any host-device synchronisation.

A unit is a training epoch (or window of steps), or one validation dataloader's part of a validation run.
Always: the network's error and the samples left out. When NC is measured from these samples (online mode,
the exact pass, validation): the per-class statistics, shifted by the class means of the previous training
measurement, and, when there is one, the NCC rule against those means: the NC4 mismatch (online training: a
*lagged* NC4, the means are one measurement old, which the log tag says) and how often the nearest mean is the
label (validation's ``ncc_accuracy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_neural_collapse.functional.statistics import GlobalMean
from lightning_neural_collapse.metrics import ClassificationError, NCCMismatch, NeuralCollapse
from lightning_neural_collapse.pipeline.labels import counted_samples
from lightning_neural_collapse.pipeline.layer_sums import LayerSums
from lightning_neural_collapse.pipeline.samples import Captured


@dataclass(frozen=True)
class Reference:
    """The class means of the latest measurement (``(C, D)`` and the ``(C,)`` mask of present classes),
    identical on every rank: the next measurement's shift, and online NC4's centres."""

    means: Tensor
    present: Tensor

    def fits(self, num_classes: int, dim: int) -> bool:
        """Whether these means have the shape ``(num_classes, dim)``."""
        return tuple(self.means.shape) == (num_classes, dim)


COUNT_KEYS: tuple[str, ...] = (
    "errors",
    "total",
    "nonfinite",
    "bad_label",
    "ncc_mismatches",
    "ncc_hits",
    "ncc_total",
)
"""The integer counts of :meth:`Accumulator.local_counts`, in the order they travel between ranks."""


class Accumulator:
    """One rank's sums for one unit of measurement (a training epoch or window, a validation loader's run).

    Args:
        num_classes: ``C``.
        dim: ``D``.
        device: where the states live (the features' device).
        statistics: accumulate the per-class statistics (NC is measured from the training steps).
        reference: the previous measurement's means (the shift, and online NC4's centres), or ``None``.
        lagged_ncc: count NC4 against ``reference`` (online mode; the exact pass has its own NC4 pass).
        subset: ``(C,)`` bool mask of the classes measured (``classes=``), or ``None`` for all: samples of other
            classes are left out of the statistics and NC4 (they count in the training error).
        global_mean: see :class:`~lightning_neural_collapse.NeuralCollapse`.
        accumulate_dtype: dtype of the per-batch products.
        sum_dtype: dtype of the sums (float32 only on devices without float64).
        ncc_samples: count NC4 on this many samples of each batch (drawn by a private generator seeded with
            ``ncc_seed``: no global random state is touched), or on all of them (``None``).
        layers: the listed hidden layers' sums (``layers=``), fed the same samples, or ``None``.

    Example:
        >>> acc = Accumulator(2, 1, torch.device("cpu"), statistics=True)
        >>> acc.update(torch.tensor([[1.0], [3.0], [float("nan")]]), torch.tensor([0, 0, 0]),
        ...            torch.tensor([True, True, True]), torch.tensor([0, 1, 0]))
        >>> {k: int(v) for k, v in acc.local_counts().items() if v}
        {'errors': 1, 'total': 2, 'nonfinite': 1}
        >>> acc.statistics.statistics().counts.tolist()  # the NaN sample is left out
        [1.0, 1.0]
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        device: torch.device,
        *,
        statistics: bool,
        reference: Reference | None = None,
        lagged_ncc: bool = True,
        subset: Tensor | None = None,
        global_mean: GlobalMean = "classes",
        accumulate_dtype: torch.dtype = torch.float64,
        sum_dtype: torch.dtype | None = None,
        ncc_samples: int | None = None,
        ncc_seed: int = 0,
        layers: LayerSums | None = None,
    ) -> None:
        self.num_classes = num_classes
        self.layers = layers
        self.ncc_samples = ncc_samples
        self._ncc_generator = torch.Generator().manual_seed(ncc_seed) if ncc_samples is not None else None
        self.dim = dim
        self.device = device
        self.error = ClassificationError(num_classes).to(device)
        self.nonfinite = torch.zeros((), dtype=torch.long, device=device)
        self.bad_label = torch.zeros((), dtype=torch.long, device=device)
        self.statistics: NeuralCollapse | None = None
        self.ncc: NCCMismatch | None = None
        self.batches = 0
        """Batches added (a host-side counter)."""
        self.subset = None if subset is None else subset.to(device=device, dtype=torch.bool)
        if statistics:
            self.statistics = new_statistics(
                num_classes,
                dim,
                device,
                reference,
                global_mean=global_mean,
                accumulate_dtype=accumulate_dtype,
                sum_dtype=sum_dtype,
            )
            if lagged_ncc and reference is not None and reference.fits(num_classes, dim):
                present = reference.present.to(device)
                if self.subset is not None:
                    present = present & self.subset
                self.ncc = NCCMismatch(reference.means.to(device), present).to(device)

    def update(
        self,
        features: Tensor,
        predictions: Tensor,
        finite: Tensor,
        labels: Tensor,
        layers: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Add one batch: ``(N, D)`` features, the network's ``(N,)`` decisions and whether its logits are finite,
        and ``(N,)`` class indices (``-1`` ignored, ``C`` invalid, see
        :func:`~lightning_neural_collapse.pipeline.labels.class_indices`); with ``layers=``, the hidden layers'
        ``(N, D_l)`` rows of the same samples."""
        features = features.to(self.device)
        predictions = predictions.to(self.device)
        labels = labels.to(self.device)
        counted = counted_samples(labels, self.num_classes, features, finite.to(self.device))
        labelled = (labels >= 0) & (labels < self.num_classes)
        self.error.update_decisions(predictions, labels, counted)
        self.nonfinite += (labelled & ~counted).sum()
        self.bad_label += (labels == self.num_classes).sum()
        if self.subset is not None:  # the measured classes only, from here on
            measured = self.subset.index_select(0, labels.clamp(0, self.num_classes - 1)) & labelled
            labels, counted = torch.where(measured, labels, -1), counted & measured
            labelled = labelled & measured
        if self.statistics is not None:
            self.statistics.update(features, labels, finite_logits=counted | ~labelled)
        if self.layers is not None:
            self.layers.add(layers or {}, labels, counted)
        if self.ncc is not None:
            k, batch = self.ncc_samples, features.shape[0]
            if k is not None and self._ncc_generator is not None and batch > k:  # a seeded subsample
                rows = torch.randperm(batch, generator=self._ncc_generator)[:k]
                if self.device.type == "cuda":
                    rows = rows.pin_memory()  # an asynchronous copy: no wait for the device
                rows = rows.to(self.device, non_blocking=True)
                features, predictions = features.index_select(0, rows), predictions.index_select(0, rows)
                counted, labels = counted.index_select(0, rows), labels.index_select(0, rows)
            self.ncc.update_decisions(features, predictions, counted, labels)
        self.batches += 1

    def add(self, captured: Captured, labels: Tensor) -> None:
        """:meth:`update` with the samples of one forward."""
        self.update(captured.features, captured.predictions, captured.finite, labels, captured.layers)

    def local_counts(self) -> dict[str, Tensor]:
        """This rank's integer counts (``int64`` tensors on the device, keys :data:`COUNT_KEYS`); no sync."""
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        ncc = self.ncc
        return {
            "errors": self.error.errors,
            "total": self.error.total,
            "nonfinite": self.nonfinite,
            "bad_label": self.bad_label,
            "ncc_mismatches": ncc.mismatches if ncc is not None else zero,
            "ncc_hits": ncc.label_hits if ncc is not None else zero,
            "ncc_total": ncc.total if ncc is not None else zero,
        }


def new_statistics(
    num_classes: int,
    dim: int,
    device: torch.device,
    reference: Reference | None,
    *,
    global_mean: GlobalMean,
    accumulate_dtype: torch.dtype,
    sum_dtype: torch.dtype | None,
) -> NeuralCollapse:
    """A fresh :class:`~lightning_neural_collapse.NeuralCollapse` on ``device``, shifted by ``reference``
    when it has the right shape. Labels are class indices already (``ignore_index=-1``)."""
    stats = NeuralCollapse(
        num_classes,
        dim,
        global_mean=global_mean,
        ignore_index=-1,
        accumulate_dtype=accumulate_dtype,
        sum_dtype=sum_dtype,
    ).to(device)
    if reference is not None and reference.fits(num_classes, dim):
        stats.set_shift(reference.means.to(device), reference.present.to(device))
    return stats

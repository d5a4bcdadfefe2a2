"""What one forward gives: one row of features and one decision per sample, for classifiers and sequence models.

A classifier's ``(B, C)`` logits give ``B`` samples. A sequence model's ``(B, T, C)`` logits, computed from
``(B, T, D)`` features, give ``B * T``: every position is a sample (a token), in row-major order, and
:attr:`Captured.layout` keeps ``(B, T)`` so that the labels can be laid out the same way. The logits are not
kept: only each sample's decision ``argmax`` and whether its logits are finite. When the classifier does not
run at all (fused linear-cross-entropy kernels use its weight directly), the decisions come from the
features and the weight, a chunk of classes at a time, without the ``N x C`` logits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

DECISION_CHUNK = 8192
"""Classes per matrix product when decisions are computed from the weight."""


class CaptureShapeError(ValueError):
    """Captured tensors that are not one row per sample; the message names ``classifier=`` and ``features=``."""


@dataclass(frozen=True)
class Captured:
    """The samples of one forward.

    Attributes:
        features: ``(N, D)`` features, one row per sample.
        predictions: ``(N,)`` int64, the network's decision ``argmax`` of each sample's logits.
        finite: ``(N,)`` bool, whether each sample's logits are finite.
        num_classes: ``C``, the number of logits per sample.
        layout: ``(B, T)`` when every position of a sequence is a sample, else ``None``.
        layers: the listed hidden layers' outputs (``layers=``), ``(N, D_l)`` rows of the same samples, by name.
    """

    features: Tensor
    predictions: Tensor
    finite: Tensor
    num_classes: int
    layout: tuple[int, int] | None = None
    layers: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """``N``."""
        return int(self.features.shape[0])


def samples_of(features: Tensor, logits: Tensor, name: str = "") -> Captured:
    """The :class:`Captured` samples of the classifier's input ``features`` and output ``logits``.

    ``(B, C)`` or ``(B, C, 1, ..., 1)`` logits: ``B`` samples, features flattened after the batch dimension.
    ``(B, T, C)`` logits of ``(B, T, D)`` features: ``B * T`` token samples. Reads shapes only (no host-device
    sync).

    Raises:
        CaptureShapeError: for scores per position of a feature map (``(B, C, H, W)`` with ``H * W > 1``), or
            batch sizes that differ between features and logits.

    Example:
        >>> tokens = samples_of(torch.zeros(2, 5, 8), torch.zeros(2, 5, 3))
        >>> tokens.features.shape, tokens.predictions.shape, tokens.layout
        (torch.Size([10, 8]), torch.Size([10]), (2, 5))
        >>> samples_of(torch.zeros(4, 8, 1, 1), torch.zeros(4, 3, 1, 1)).features.shape
        torch.Size([4, 8])
    """
    label = f"`{name}`" if name else "the classifier"
    if logits.ndim == 3 and features.ndim == 3 and features.shape[:2] == logits.shape[:2]:
        batch, steps = int(logits.shape[0]), int(logits.shape[1])
        rows = logits.reshape(batch * steps, logits.shape[2])
        return _captured(features.reshape(batch * steps, features.shape[2]), rows, (batch, steps))
    if logits.ndim < 2 or any(size != 1 for size in logits.shape[2:]):
        raise CaptureShapeError(
            f"{label} outputs a tensor of shape {tuple(logits.shape)}, not one row of class scores per sample (or per "
            "position of a (batch, positions, features) sequence): scores per position of a feature map (a 1x1-conv "
            "head applied before pooling, a segmentation head) or no class dimension. Set `classifier=` to the "
            "module whose output is the (batch, classes) logits (for example the pooling after a conv head), and "
            "`features=` to the module whose output is the (batch, features) vector the logits are computed from."
        )
    if features.shape[0] != logits.shape[0]:
        raise CaptureShapeError(
            f"{label} saw {features.shape[0]} feature rows for {logits.shape[0]} logit rows; set `features=` to the "
            "module whose output are the penultimate features of the same samples."
        )
    return _captured(features.flatten(1), logits.reshape(logits.shape[0], logits.shape[1]), None)


def samples_from_weight(features: Tensor, weight: Tensor, bias: Tensor | None, chunk: int = DECISION_CHUNK) -> Captured:
    """The samples of ``features`` (``(B, D)`` or ``(B, T, D)``) when the classifier did not run: decisions from
    ``features @ weight.T + bias``, ``chunk`` classes at a time with a running max (no ``N x C`` logits).

    Example:
        >>> got = samples_from_weight(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.eye(2), None, chunk=1)
        >>> got.predictions.tolist(), got.finite.tolist()
        ([0, 1], [True, True])
    """
    layout = (int(features.shape[0]), int(features.shape[1])) if features.ndim == 3 else None
    rows = features.reshape(-1, features.shape[-1]) if layout is not None else features.flatten(1)
    x = rows.detach().to(weight.dtype)
    best_value: Tensor | None = None
    best_index: Tensor | None = None
    finite = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    num_classes = int(weight.shape[0])
    for start in range(0, num_classes, chunk):
        stop = min(start + chunk, num_classes)
        scores = x @ weight[start:stop].detach().T
        if bias is not None:
            scores = scores + bias[start:stop].detach()
        finite &= torch.isfinite(scores).all(dim=1)
        value, index = scores.max(dim=1)
        index = index + start
        if best_value is None or best_index is None:
            best_value, best_index = value, index
        else:
            better = value > best_value  # strict: the first maximum wins, as argmax
            best_value, best_index = torch.where(better, value, best_value), torch.where(better, index, best_index)
    assert best_index is not None
    return Captured(rows, best_index, finite, num_classes, layout)


def _captured(features: Tensor, logits: Tensor, layout: tuple[int, int] | None) -> Captured:
    return Captured(features, logits.argmax(dim=1), torch.isfinite(logits).all(dim=1), int(logits.shape[1]), layout)

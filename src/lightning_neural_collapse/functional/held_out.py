"""Held-out collapse: how validation features sit against the class means of the training set (SPEC.md).

Two kinds of numbers. *Against the training means*: ``ncc_accuracy`` (the nearest training class mean is the
label), ``nc4_ncc_mismatch`` (it differs from the network's decision), ``mean_shift`` (how far the validation
class means moved from the training ones, relative to the spread of the training means). *On the validation
data alone* (its own class means): the test-collapse keys :data:`TEST_COLLAPSE_KEYS`. ``accuracy`` is the
network's own. Every key is dimensionless.

Example:
    >>> train = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    >>> val = torch.tensor([[1.0, 0.5], [-1.0, 0.5]])
    >>> both = torch.tensor([True, True])
    >>> mean_shift(val, both, train, both)
    0.5
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_neural_collapse.functional.collapse import FEATURE_KEYS

TEST_COLLAPSE_KEYS: tuple[str, ...] = FEATURE_KEYS
"""The metrics of SPEC.md computed on validation features and labels alone (test collapse)."""
AGAINST_TRAIN_KEYS: tuple[str, ...] = ("ncc_accuracy", "nc4_ncc_mismatch", "mean_shift")
"""The keys that need the class means of a training measurement."""
HELD_OUT_KEYS: tuple[str, ...] = ("accuracy", *AGAINST_TRAIN_KEYS, *TEST_COLLAPSE_KEYS)
"""Every key logged under ``<prefix>_val/``."""


def mean_shift(val_means: Tensor, val_present: Tensor, train_means: Tensor, train_present: Tensor) -> float:
    """``Avg_c ||mu_c^val - mu_c^train|| / Avg_c ||mu_c^train - mu_G^train||`` over the classes present in both.

    ``mu_G^train`` is the mean of the training class means (of every class present in training), as SPEC.md's
    global mean. Float64 throughout.

    Args:
        val_means: ``(C, D)`` validation class means (rows of absent classes are ignored).
        val_present: ``(C,)`` bool, classes with a validation sample.
        train_means: ``(C, D)`` training class means.
        train_present: ``(C,)`` bool, classes present in the training measurement.

    Returns:
        The ratio (0 when the validation means equal the training ones), or ``nan`` when no class is present in
        both or the training means all coincide.
    """
    val = val_means.detach().to(torch.float64)
    train = train_means.detach().to(device=val.device, dtype=torch.float64)
    in_train = train_present.to(device=val.device, dtype=torch.bool)
    both = val_present.to(device=val.device, dtype=torch.bool) & in_train
    if not bool(both.any()):
        return math.nan
    centre = train[in_train].mean(dim=0)
    moved = (val[both] - train[both]).norm(dim=1).mean()
    spread = (train[both] - centre).norm(dim=1).mean()
    return float(moved / spread) if float(spread) > 0 else math.nan


def fraction(hits: int, total: int) -> float:
    """``hits / total``, or ``nan`` when ``total`` is 0.

    Example:
        >>> fraction(3, 4), fraction(0, 0)
        (0.75, nan)
    """
    return hits / total if total > 0 else math.nan

"""NC4: the network's decision becomes the nearest-class-centre (NCC) rule."""

from __future__ import annotations

import torch
from torch import Tensor


def ncc_predictions(features: Tensor, means: Tensor, present: Tensor | None = None) -> Tensor:
    """Nearest class centre of each sample, ``argmin_c ||h_i - mu_c||`` over the present classes.

    Args:
        features: ``(N, D)`` features.
        means: ``(C, D)`` class means, one row per class label.
        present: optional ``(C,)`` boolean mask; classes outside it are never chosen.

    Returns:
        ``(N,)`` int64 class labels (indices into ``means``).

    Example:
        >>> means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]])
        >>> ncc_predictions(torch.tensor([[6.0, 1.0], [9.0, 0.0]]), means, torch.tensor([True, True, False])).tolist()
        [1, 1]
    """
    centre = means.to(torch.float64)
    if present is not None:
        centre_of_mass = centre[present].mean(dim=0)
    else:
        centre_of_mass = centre.mean(dim=0)
    mu = centre - centre_of_mass  # centring keeps the expanded distance accurate for large means
    h = features.to(torch.float64) - centre_of_mass
    sq_dist = mu.square().sum(dim=1)[None, :] - 2.0 * h @ mu.T
    if present is not None:
        sq_dist = sq_dist.masked_fill(~present[None, :], float("inf"))
    return sq_dist.argmin(dim=1)


def ncc_mismatch(features: Tensor, means: Tensor, logits: Tensor, present: Tensor | None = None) -> float:
    """Share of samples whose network decision differs from the NCC decision (paper's Fig. 7; 0 when collapsed).

    Args:
        features: ``(N, D)`` features ``h_i``.
        means: ``(C, D)`` class means (from the same data, or from a previous measurement).
        logits: ``(N, C)`` network outputs ``W h_i + b`` (bias included).
        present: optional ``(C,)`` mask of the classes the NCC rule may choose.

    Returns:
        The mismatch fraction in ``[0, 1]``.

    Example:
        >>> means = torch.tensor([[0.0], [4.0]])
        >>> ncc_mismatch(torch.tensor([[1.0], [3.0]]), means, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
        0.5
    """
    if features.shape[0] == 0:
        return float("nan")
    mismatch = logits.argmax(dim=1) != ncc_predictions(features, means, present)
    return float(mismatch.double().mean())

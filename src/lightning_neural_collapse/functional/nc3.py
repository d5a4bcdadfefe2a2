"""NC3: convergence to self-duality, the classifier rows aligning with the centred class means."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def self_duality(weight: Tensor, centred_means: Tensor) -> float:
    """Papyan et al.'s NC3, ``|| W^T / ||W||_F - M / ||M||_F ||_F^2`` (squared, W not centred; in ``[0, 4]``).

    Args:
        weight: ``(C, D)`` classifier rows of the present classes.
        centred_means: ``(C, D)`` class means minus the global mean, same class order.

    Returns:
        A float (0 when ``W`` is proportional to the centred means); ``nan`` if either matrix is zero.

    Example:
        >>> m = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
        >>> round(self_duality(3 * m, m), 12)
        0.0
    """
    w = weight.to(torch.float64)
    m = centred_means.to(torch.float64)
    w_norm, m_norm = w.norm(), m.norm()
    if not (float(w_norm) > 0 and float(m_norm) > 0):
        return math.nan
    return float((w / w_norm - m / m_norm).square().sum())


def classwise_cosines(weight: Tensor, centred_means: Tensor) -> Tensor:
    """Per-class ``cos(w_c, mu_c - mu_G)``, a float64 tensor of shape ``(C,)`` (1 when self-dual).

    Example:
        >>> classwise_cosines(torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])).tolist()
        [0.7071067811865475]
    """
    w = weight.to(torch.float64)
    m = centred_means.to(torch.float64)
    return (w * m).sum(dim=1) / (w.norm(dim=1) * m.norm(dim=1))


def self_duality_cosine(weight: Tensor, centred_means: Tensor) -> float:
    """``Avg_c cos(w_c, mu_c - mu_G)`` (goes to 1 under NC3).

    Returns:
        A float in ``[-1, 1]``; ``nan`` when there is no class or some ``w_c`` or centred mean is zero.

    Example:
        >>> self_duality_cosine(torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
        0.0
    """
    cos = classwise_cosines(weight, centred_means)
    if cos.numel() == 0 or not bool(torch.isfinite(cos).all()):
        return math.nan
    return float(cos.mean())


def cosine_cov(weight: Tensor, centred_means: Tensor) -> float:
    """UNC3, uniform duality: ``Std_c cos(w_c, mu_c - mu_G) / Avg_c cos(w_c, mu_c - mu_G)`` (population Std).

    Wu & Papyan (2024) find it a better sign of duality than NC3 for language models: it falls as the per-class
    alignments become equal, whatever their level.

    Returns:
        A float (0 when every class is equally aligned); ``nan`` when there is no class, a zero row, or the mean
        cosine is 0.

    Example:
        >>> round(cosine_cov(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])), 6)
        0.171573
    """
    cos = classwise_cosines(weight, centred_means)
    if cos.numel() == 0 or not bool(torch.isfinite(cos).all()):
        return math.nan
    mean = float(cos.mean())
    return float(cos.std(correction=0)) / mean if mean != 0 else math.nan

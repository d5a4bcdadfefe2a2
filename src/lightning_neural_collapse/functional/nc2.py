"""NC2: convergence of the centred class means (and of the classifier rows) to a simplex ETF.

Each function takes a ``(C, D)`` matrix of vectors, one row per present class: the centred class means
``mu_c - mu_G`` or the classifier rows ``w_c``. All results are dimensionless and 0 at a simplex ETF.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def equinorm(vectors: Tensor) -> float:
    """Coefficient of variation of the row norms, ``Std_c ||v_c|| / Avg_c ||v_c||`` (population Std).

    Returns:
        A float (0 when all norms are equal); ``nan`` when there is no row or every norm is zero.

    Example:
        >>> equinorm(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        0.5
    """
    norms = vectors.to(torch.float64).norm(dim=1)
    if norms.numel() == 0 or not float(norms.mean()) > 0:
        return math.nan
    return float(norms.std(correction=0) / norms.mean())


def pairwise_cosines(vectors: Tensor) -> Tensor:
    """Cosines between all ordered pairs of distinct rows, a float64 tensor of ``C (C - 1)`` values.

    Rows of norm zero give ``nan`` cosines.

    Example:
        >>> pairwise_cosines(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).tolist()
        [-1.0, -1.0]
    """
    v = vectors.to(torch.float64)
    unit = v / v.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off = ~torch.eye(v.shape[0], dtype=torch.bool, device=v.device)
    return cos[off]


def equiangular(vectors: Tensor, cosines: Tensor | None = None) -> float:
    """Population Std of the pairwise cosines, ``Std_{c != c'} cos(v_c, v_c')`` (paper's Fig. 3).

    ``cosines`` may pass ``pairwise_cosines(vectors)`` when it is already at hand.

    Returns:
        A float (0 when all angles are equal); ``nan`` for fewer than two rows or a zero row.

    Example:
        >>> equiangular(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # cosines 0, -1, 0 (twice)
        0.4714045207910317
    """
    cos = pairwise_cosines(vectors) if cosines is None else cosines
    if cos.numel() == 0 or not bool(torch.isfinite(cos).all()):
        return math.nan
    return float(cos.std(correction=0))


def max_angle(vectors: Tensor, cosines: Tensor | None = None) -> float:
    """Mean distance of the pairwise cosines to the simplex value, ``Avg_{c != c'} |cos + 1/(C-1)|`` (Fig. 4).

    ``cosines`` may pass ``pairwise_cosines(vectors)`` when it is already at hand.

    Returns:
        A float (0 when every pair is at the maximal angle); ``nan`` for fewer than two rows or a zero row.

    Example:
        >>> max_angle(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        0.0
    """
    num = vectors.shape[0]
    cos = pairwise_cosines(vectors) if cosines is None else cosines
    if cos.numel() == 0 or not bool(torch.isfinite(cos).all()):
        return math.nan
    return float((cos + 1.0 / (num - 1)).abs().mean())


def etf_distance(vectors: Tensor) -> float:
    """Zhu et al.'s distance of the Gram matrix to a simplex ETF, ``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F``.

    ``G = V V^T`` for rows ``V``; the result lies in ``[0, 2]``.

    Returns:
        A float (0 at a simplex ETF); ``nan`` for fewer than two rows or all rows zero.

    Example:
        >>> etf_distance(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
        0.0
    """
    num = vectors.shape[0]
    if num < 2:
        return math.nan
    v = vectors.to(torch.float64)
    gram = v @ v.T
    scale = gram.norm()
    if not float(scale) > 0:
        return math.nan
    eye = torch.eye(num, dtype=torch.float64, device=v.device)
    target = (eye - 1.0 / num) / math.sqrt(num - 1)
    return float((gram / scale - target).norm())

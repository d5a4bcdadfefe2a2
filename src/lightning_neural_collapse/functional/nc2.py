"""NC2: convergence of the centred class means (and of the classifier rows) to a simplex ETF.

Each function takes a ``(C, D)`` matrix of vectors, one row per present class: the centred class means
``mu_c - mu_G`` or the classifier rows ``w_c``. All results are dimensionless and 0 at a simplex ETF.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_neural_collapse.functional.pairs import PairSums, pair_sums


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

    This one builds the ``C x C`` matrix: for small ``C`` (a look at the values). The metrics below stream over
    tiles of it instead (:func:`~lightning_neural_collapse.functional.pairs.pair_sums`). Rows of norm zero give
    ``nan`` cosines.

    Example:
        >>> pairwise_cosines(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).tolist()
        [-1.0, -1.0]
    """
    v = vectors.to(torch.float64)
    unit = v / v.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    off = ~torch.eye(v.shape[0], dtype=torch.bool, device=v.device)
    return cos[off]


def equiangular(vectors: Tensor, sums: PairSums | None = None) -> float:
    """Population Std of the pairwise cosines, ``Std_{c != c'} cos(v_c, v_c')`` (paper's Fig. 3).

    ``sums`` may pass ``pair_sums(vectors)`` when it is already at hand.

    Returns:
        A float (0 when all angles are equal); ``nan`` for fewer than two rows or a zero row.

    Example:
        >>> equiangular(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))  # cosines 0, -1, 0 (twice)
        0.4714045207910317
    """
    return (sums or pair_sums(vectors)).equiangular()


def max_angle(vectors: Tensor, sums: PairSums | None = None) -> float:
    """Mean distance of the pairwise cosines to the simplex value, ``Avg_{c != c'} |cos + 1/(C-1)|`` (Fig. 4).

    Returns:
        A float (0 when every pair is at the maximal angle); ``nan`` for fewer than two rows or a zero row.

    Example:
        >>> max_angle(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        0.0
    """
    return (sums or pair_sums(vectors)).max_angle()


def etf_distance(vectors: Tensor, sums: PairSums | None = None) -> float:
    """Zhu et al.'s distance of the Gram matrix to a simplex ETF, ``|| G/||G||_F - (I - 11^T/C)/sqrt(C-1) ||_F``.

    ``G = V V^T`` for rows ``V``; the result lies in ``[0, 2]``.

    Returns:
        A float (0 at a simplex ETF); ``nan`` for fewer than two rows or all rows zero.

    Example:
        >>> etf_distance(torch.tensor([[2.0, 0.0], [-2.0, 0.0]]))
        0.0
    """
    return (sums or pair_sums(vectors)).etf_distance()


def log_energy(vectors: Tensor, sums: PairSums | None = None) -> float:
    """GNC2, the hyperspherical energy: ``Avg_{c != c'} log(1 / ||u_c - u_c'||)`` of the unit rows ``u``.

    Lower is more uniform on the sphere (Liu et al. 2023, used by Wu & Papyan 2024); a simplex ETF minimises it
    for ``C <= D + 1``, where it equals ``-0.5 log(2 C / (C - 1))``.

    Returns:
        A float; ``nan`` for fewer than two rows or a zero row, ``inf`` for two rows with the same direction.

    Example:
        >>> round(log_energy(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])), 6)  # ||u - u'|| = 2
        -0.693147
    """
    return (sums or pair_sums(vectors)).log_energy()

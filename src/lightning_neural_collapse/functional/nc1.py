"""NC1: within-class variability collapse.

``nc1`` is the paper's ``Tr(Sigma_W Sigma_B^+) / C``; ``nc1_cdnv`` is the class-distance normalised
variance of Galanti et al. (2022). Both take per-class statistics, never the samples.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from lightning_neural_collapse.functional.pairs import PairSums, pair_sums


def nc1(within_cov: Tensor, centred_means: Tensor) -> float:
    """Papyan et al.'s NC1, ``Tr(Sigma_W Sigma_B^+) / C`` (dimensionless, 0 when collapsed).

    ``Sigma_B = M^T M / C`` with ``M`` the ``C x D`` matrix of centred class means (one row per class). From
    the thin SVD ``M = U S V^T``, ``Sigma_B^+ = C V S^{-2} V^T``, so ``NC1 = sum_i v_i^T Sigma_W v_i / s_i^2``:
    the SVD of the means (not an eigendecomposition of their Gram, which would square the condition number),
    ``O(C D min(C, D) + D^2 k)`` time, no ``D x D`` inverse; for ``C > D`` the SVD is that of the ``D x D`` ``R``
    of a QR of the means, so no ``C x D`` factor is kept. The pseudo-inverse keeps only the top
    ``k <= min(C-1, D)`` singular values whose squares (the eigenvalues of ``Sigma_B``, up to ``1/C``) also exceed
    ``max(C, D) * eps`` times the largest, so a rounding error in the global mean is never inverted; a
    ``RuntimeWarning`` says so when ``k < min(C-1, D)`` (two classes share a mean, or the means span fewer
    dimensions than ``C`` classes can, as after a LayerNorm without bias). The SVD gives the kept directions
    to full precision, where an eigendecomposition of the Gram would lose half the digits of the small ones.

    Args:
        within_cov: ``(D, D)`` within-class covariance ``Sigma_W``.
        centred_means: ``(C, D)`` class means minus the global mean, present classes only.

    Returns:
        NC1 as a float; ``nan`` when it is undefined (fewer than two classes, or all means equal).

    Example:
        >>> means = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
        >>> round(nc1(0.25 * torch.eye(2, dtype=torch.float64), means), 12)  # Sigma_B = diag(1, 0)
        0.125
    """
    directions, singular = _mean_directions(centred_means)
    if directions is None:
        return math.nan
    quad = ((within_cov.to(torch.float64) @ directions) * directions).sum(dim=0)
    return float((quad / singular.square()).sum())


def _mean_directions(centred_means: Tensor) -> tuple[Tensor | None, Tensor]:
    """``(V_k, s_k)``: the right singular vectors (``D x k``) and singular values of the centred means that
    NC1's pseudo-inverse keeps; ``(None, empty)`` when there is none."""
    num_classes, dim = centred_means.shape
    full_rank = min(num_classes - 1, dim)
    empty = torch.zeros(0, dtype=torch.float64, device=centred_means.device)
    if full_rank < 1:
        return None, empty
    centred = centred_means.to(torch.float64)
    if num_classes > dim:  # the R of a QR has the same singular values and right vectors: no C x D factor kept
        centred = torch.linalg.qr(centred, mode="r")[1]
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    singular, vh = singular[:full_rank], vh[:full_rank]
    largest = float(singular[0])
    if not largest > 0:
        return None, empty
    # SPEC.md's tolerance is on the eigenvalues of Sigma_B, the squared singular values
    keep = int((singular.square() > largest**2 * max(num_classes, dim) * torch.finfo(torch.float64).eps).sum())
    if keep < full_rank:
        warnings.warn(
            f"NC1: the centred means of the {num_classes} classes span only {keep} of the min(C-1, D) = "
            f"{full_rank} dimensions they could (two classes share a mean, or the features lie in a "
            f"lower-dimensional subspace); Sigma_B^+ inverts those {keep} directions only.",
            RuntimeWarning,
            stacklevel=3,
        )
    return vh[:keep].T, singular[:keep]


def nc1_cdnv(centred_means: Tensor, variances: Tensor, sums: PairSums | None = None) -> float:
    """Class-distance normalised variance, ``Avg_{c != c'} (var_c + var_c') / (2 ||mu_c - mu_c'||^2)``.

    Streamed over tiles of the Gram of the means (:func:`~lightning_neural_collapse.functional.pairs.pair_sums`);
    ``sums`` may pass its result when it is already at hand (with these variances).

    Args:
        centred_means: ``(C, D)`` class means (centring does not change the result), present classes only.
        variances: ``(C,)`` ``var_c``, the mean squared distance of class ``c``'s features to ``mu_c``.

    Returns:
        The CDNV as a float (0 when collapsed); ``nan`` for fewer than two classes or two equal means.

    Example:
        >>> nc1_cdnv(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1.0, 3.0]))
        0.5
    """
    return (sums or pair_sums(centred_means, variances)).cdnv()

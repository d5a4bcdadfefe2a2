"""NC1: within-class variability collapse.

``nc1`` is the paper's ``Tr(Sigma_W Sigma_B^+) / C``; ``nc1_cdnv`` is the class-distance normalised
variance of Galanti et al. (2022). Both take per-class statistics, never the samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def nc1(within_cov: Tensor, centred_means: Tensor) -> float:
    """Papyan et al.'s NC1, ``Tr(Sigma_W Sigma_B^+) / C`` (dimensionless, 0 when collapsed).

    ``Sigma_B = M M^T / C`` with ``M`` the ``D x C`` matrix of centred class means. The pseudo-inverse
    keeps only the top ``min(C-1, D)`` eigenpairs of ``Sigma_B`` that also exceed ``max(C, D) * eps``
    times the largest, so a rounding error in the global mean is never inverted. It is computed as
    ``sum_i u_i^T K u_i / lambda_i^2`` from the eigenpairs ``(lambda_i, u_i)`` of the ``C x C`` Gram
    matrix ``G = M^T M`` and ``K = M^T Sigma_W M``: no ``D x D`` inverse, ``O(C D^2 + C^3)`` time.

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
    num_classes, dim = centred_means.shape
    rank = min(num_classes - 1, dim)
    if rank < 1:
        return math.nan
    centred = centred_means.to(torch.float64)
    eigvals, eigvecs = torch.linalg.eigh(centred @ centred.T)
    eigvals, eigvecs = eigvals.flip(0)[:rank], eigvecs.flip(1)[:, :rank]
    largest = float(eigvals[0])
    if not largest > 0:
        return math.nan
    keep = eigvals > largest * max(num_classes, dim) * torch.finfo(torch.float64).eps
    eigvals, eigvecs = eigvals[keep], eigvecs[:, keep]
    directions = eigvecs.T @ centred  # rows M u_i, of squared norm lambda_i
    quad = ((directions @ within_cov.to(torch.float64)) * directions).sum(dim=1)
    return float((quad / eigvals.square()).sum())


def nc1_cdnv(centred_means: Tensor, variances: Tensor) -> float:
    """Class-distance normalised variance, ``Avg_{c != c'} (var_c + var_c') / (2 ||mu_c - mu_c'||^2)``.

    Args:
        centred_means: ``(C, D)`` class means (centring does not change the result), present classes only.
        variances: ``(C,)`` ``var_c``, the mean squared distance of class ``c``'s features to ``mu_c``.

    Returns:
        The CDNV as a float (0 when collapsed); ``nan`` for fewer than two classes or two equal means.

    Example:
        >>> nc1_cdnv(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1.0, 3.0]))
        0.5
    """
    num_classes = centred_means.shape[0]
    if num_classes < 2:
        return math.nan
    means = centred_means.to(torch.float64)
    var = variances.to(torch.float64)
    sq_norms = means.square().sum(dim=1)
    sq_dist = sq_norms[:, None] + sq_norms[None, :] - 2.0 * means @ means.T
    off = ~torch.eye(num_classes, dtype=torch.bool, device=means.device)
    sq_dist = sq_dist[off]
    if not bool((sq_dist > 0).all()):
        return math.nan
    pair_var = (var[:, None] + var[None, :])[off]
    return float((pair_var / (2.0 * sq_dist)).mean())

"""The second moment ``h^T h`` of a batch at half the cost of a matrix product: only its upper triangle.

``Q = sum_i h_i h_i^T`` is symmetric, so a streaming sum needs only its upper triangle (diagonal included). BLAS
has a routine for that (``syrk``) that PyTorch does not expose; :func:`add_upper_gram_` gets most of its saving
from ordinary products: the ``D`` columns are cut into ``panels`` row panels, and panel ``p`` multiplies only
the columns from its own first one to ``D``, ``(D/k) x B`` times ``B x (D - p D/k)``. With ``k`` panels that is
``(k + 1) / (2k)`` of the flops of the full product (0.56 for ``k = 8``), in ``k`` large products.
:func:`symmetric_from_upper` rebuilds the full matrix when it is read.

Example:
    >>> h = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    >>> upper = add_upper_gram_(torch.zeros(3, 3, dtype=torch.float64), h, panels=2)
    >>> torch.equal(symmetric_from_upper(upper), (h.T @ h).double())
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_PANEL = 32
"""Narrowest panel :func:`gram_panels` cuts: narrower products lose more speed than the flops they save."""
MAX_PANELS = 8
"""Most panels :func:`gram_panels` cuts (``(k + 1) / (2k)`` flops: 0.56 at 8, 0.53 at 16)."""


def gram_panels(dim: int) -> int:
    """The number of row panels for a ``dim x dim`` Gram: as many as :data:`MAX_PANELS`, none narrower than
    :data:`MIN_PANEL` columns (1, the plain product, for ``dim < 64``).

    Example:
        >>> gram_panels(16), gram_panels(256), gram_panels(2048)
        (1, 8, 8)
    """
    return max(1, min(MAX_PANELS, dim // MIN_PANEL))


def add_upper_gram_(out: Tensor, h: Tensor, panels: int | None = None) -> Tensor:
    """Add the upper triangle (with the diagonal) of ``h^T h`` into ``out``, in place; returns ``out``.

    The products run in ``h``'s dtype. When ``out`` has that dtype they are added in place by ``addmm_``;
    otherwise (float32 products into float64 sums) each panel's product is added with one conversion. Below
    the diagonal ``out`` receives part of the product too (the blocks left of each panel's diagonal block are
    not computed, those inside it are): read it with :func:`symmetric_from_upper` only.

    Args:
        out: ``(D, D)`` float tensor on ``h``'s device.
        h: ``(B, D)`` batch (rows to leave out must be zero).
        panels: the number of row panels (default :func:`gram_panels`).
    """
    dim = h.shape[1]
    if tuple(out.shape) != (dim, dim):
        raise ValueError(f"out must have shape ({dim}, {dim}), got {tuple(out.shape)}")
    k = gram_panels(dim) if panels is None else max(1, int(panels))
    width = -(-dim // k)
    same = out.dtype == h.dtype
    for start in range(0, dim, width):
        stop = min(start + width, dim)
        rows, cols = h[:, start:stop], h[:, start:]
        if same:
            out[start:stop, start:].addmm_(rows.T, cols)
        else:
            out[start:stop, start:] += rows.T @ cols
    return out


def symmetric_from_upper(upper: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle (with the diagonal) is that of ``upper`` (a new tensor).

    Example:
        >>> symmetric_from_upper(torch.tensor([[1.0, 2.0], [9.0, 3.0]]))
        tensor([[1., 2.],
                [2., 3.]])
    """
    top = torch.triu(upper)
    return top + torch.triu(upper, diagonal=1).T

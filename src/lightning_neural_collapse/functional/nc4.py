"""NC4: the network's decision becomes the nearest-class-centre (NCC) rule."""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CLASS_CHUNK = 4096
"""Classes compared per matrix product in :class:`NearestClassCentre` (bounds the ``(B, chunk)`` distances)."""


class NearestClassCentre:
    """The NCC rule ``argmin_c ||h - mu_c||`` over the present classes, prepared once for many batches.

    The means are centred on the mean of the present ones (which keeps the expanded distance
    ``||mu||^2 - 2 <h, mu>`` accurate for large means) and their squared norms cached; absent classes get an
    infinite norm, so they are never chosen, without any boolean indexing. :meth:`predict` compares a batch
    against ``chunk_size`` classes per matrix product and keeps a running argmin, so nothing of size
    ``(B, C, D)``, and for large ``C`` nothing of size ``(B, C)``, is built. Ties go to the smallest label.

    With ``search_dtype=torch.float32`` the products are float32 (several times faster) and keep the
    ``candidates`` nearest classes of each sample; their distances are then recomputed exactly in float64 and the
    nearest of them is chosen, so the decision is the float64 one unless more than ``candidates`` classes lie
    within float32 rounding of the nearest. No host-device synchronisation either way. :meth:`nearest` also
    tells which rows were finite, read from the distances themselves (a NaN or Inf feature makes them all
    non-finite), so no separate pass over the features is needed.

    Args:
        means: ``(C, D)`` class means, one row per class label.
        present: optional ``(C,)`` boolean mask of the classes that may be chosen (default: all finite rows).
        chunk_size: classes per matrix product.
        search_dtype: dtype of the chunked products (``torch.float64``: exact, no re-ranking).
        candidates: classes re-ranked in float64 per sample (float32 search only).

    Example:
        >>> rule = NearestClassCentre(torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.0]]),
        ...                           torch.tensor([True, True, False]))
        >>> rule.predict(torch.tensor([[6.0, 1.0], [2.0, 0.0]])).tolist()
        [1, 0]
    """

    def __init__(
        self,
        means: Tensor,
        present: Tensor | None = None,
        chunk_size: int = DEFAULT_CLASS_CHUNK,
        search_dtype: torch.dtype = torch.float64,
        candidates: int = 2,
    ) -> None:
        if means.ndim != 2:
            raise ValueError(f"means must have shape (num_classes, dim), got {tuple(means.shape)}")
        centre = means.detach().to(torch.float64)
        mask = torch.isfinite(centre).all(dim=1)
        if present is not None:
            mask = mask & present.to(device=mask.device, dtype=torch.bool)
        weight = mask.to(torch.float64)
        centre = torch.nan_to_num(centre)
        self.centre_of_mass = (centre * weight[:, None]).sum(dim=0) / weight.sum().clamp(min=1.0)
        self.centred = (centre - self.centre_of_mass) * weight[:, None]
        inf = torch.full((), float("inf"), dtype=torch.float64, device=centre.device)
        self.sq_norms = torch.where(mask, self.centred.square().sum(dim=1), inf)
        self.chunk_size = max(1, int(chunk_size))
        self.search_dtype = search_dtype
        self.candidates = max(1, min(int(candidates), self.centred.shape[0]))
        self._search = self.centred.to(search_dtype)
        self._search_norms = self.sq_norms.to(search_dtype)

    @property
    def num_classes(self) -> int:
        """``C``, the number of rows of the means."""
        return int(self.centred.shape[0])

    def to(self, device: torch.device | str) -> NearestClassCentre:
        """This rule with its tensors on ``device`` (``self`` when they are there already)."""
        if self.centred.device == torch.device(device):
            return self
        moved = object.__new__(NearestClassCentre)
        moved.__dict__.update({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.__dict__.items()})
        return moved

    def predict(self, features: Tensor) -> Tensor:
        """``(N,)`` int64 labels of the nearest present class centre of each of the ``(N, D)`` features."""
        return self.nearest(features)[0]

    def nearest(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels, finite)``: the ``(N,)`` int64 nearest present class of each of the ``(N, D)`` features, and
        the ``(N,)`` bool mask of the rows whose distances are finite (the label of another row is meaningless)."""
        h = features.detach().to(self.centred.device, torch.float64) - self.centre_of_mass
        if self.search_dtype == torch.float64:
            return self._argmin(h)
        return self._reranked(h)

    def _argmin(self, h: Tensor) -> tuple[Tensor, Tensor]:
        best_value: Tensor | None = None
        best_index: Tensor | None = None
        for start in range(0, self.num_classes, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_classes)
            dist = torch.addmm(self.sq_norms[start:stop], h, self.centred[start:stop].T, alpha=-2.0)
            value, index = dist.min(dim=1)
            index = index + start
            if best_value is None or best_index is None:
                best_value, best_index = value, index
            else:
                better = value < best_value  # strict: an earlier chunk keeps its ties
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index, best_index)
        assert best_index is not None and best_value is not None  # means has a row (checked by its shape)
        return best_index, torch.isfinite(best_value)

    def _reranked(self, h: Tensor) -> tuple[Tensor, Tensor]:
        h_search = h.to(self.search_dtype)
        k = self.candidates
        kept_value: Tensor | None = None
        kept_index: Tensor | None = None
        for start in range(0, self.num_classes, self.chunk_size):
            stop = min(start + self.chunk_size, self.num_classes)
            dist = torch.addmm(self._search_norms[start:stop], h_search, self._search[start:stop].T, alpha=-2.0)
            value, index = _smallest(dist, min(k, stop - start))
            index = index + start
            if kept_value is not None and kept_index is not None:
                value, index = torch.cat([kept_value, value], dim=1), torch.cat([kept_index, index], dim=1)
                value, order = value.topk(min(k, value.shape[1]), dim=1, largest=False)
                index = index.gather(1, order)
            kept_value, kept_index = value, index
        assert kept_index is not None and kept_value is not None
        labels, _ = kept_index.sort(dim=1)  # so that an exact tie goes to the smallest label
        rows, kept = labels.shape
        flat = labels.reshape(-1)
        norms = self.sq_norms.index_select(0, flat).view(rows, kept, 1)
        centres = self.centred.index_select(0, flat).view(rows, kept, -1)
        exact = torch.baddbmm(norms, centres, h.unsqueeze(2), alpha=-2.0).squeeze(2)  # float64 distances
        return labels.gather(1, exact.argmin(dim=1, keepdim=True)).squeeze(1), torch.isfinite(kept_value[:, 0])


def _smallest(dist: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` smallest values of each row of ``dist`` (NaN rows give NaN) and their columns, smallest first;
    ``k <= 2`` by one or two ``min`` passes (much faster than ``topk`` on the CPU). Overwrites ``dist``."""
    value, index = dist.min(dim=1, keepdim=True)
    if k == 1:
        return value, index
    if k == 2:
        dist.scatter_(1, index, float("inf"))
        second, where = dist.min(dim=1, keepdim=True)
        return torch.cat([value, second], dim=1), torch.cat([index, where], dim=1)
    return dist.topk(k, dim=1, largest=False)


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
    return NearestClassCentre(means, present).predict(features)


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

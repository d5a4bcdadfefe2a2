"""Private helpers shared by the reporting modules: warn-once bookkeeping and value clean-up."""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

_WARNED: set[tuple[str, str]] = set()


def warn_once(source: object, kind: str, cause: BaseException | str) -> None:
    """Emit one ``RuntimeWarning`` per (type of ``source``, ``kind``) per process; returns nothing."""
    name = source if isinstance(source, str) else type(source).__name__
    if (name, kind) in _WARNED:
        return
    _WARNED.add((name, kind))
    reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
    rank_zero_warn(
        f"lightning_neural_collapse could not log {kind} to {name} ({reason}). Skipping {kind} for "
        f"{name}; training goes on. This warning is shown once.",
        category=RuntimeWarning,
    )


def reset_warnings() -> None:
    """Forget which warnings were shown (for tests); returns nothing."""
    _WARNED.clear()


def finite_float(value: Any) -> float | None:
    """``value`` as a Python float, or ``None`` when it is not a finite number (or not a number at all)."""
    try:
        number = float(value.item() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return number if math.isfinite(number) else None

"""Detecting the Terminal Phase of Training: the first epoch with (near) zero training error."""

from __future__ import annotations

from typing import Any


class TPTDetector:
    """Remembers the first epoch whose training error is at or below ``threshold``.

    Example:
        >>> tpt = TPTDetector(threshold=0.0)
        >>> [tpt.update(epoch, err) for epoch, err in enumerate([0.3, 0.0, 0.01, 0.0])]
        [False, True, False, False]
        >>> tpt.epoch
        1
    """

    def __init__(self, threshold: float = 0.0) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"`tpt_threshold` must lie in [0, 1), got {threshold!r}")
        self.threshold = threshold
        self.epoch: int | None = None

    @property
    def started(self) -> bool:
        """Whether TPT has begun."""
        return self.epoch is not None

    def update(self, epoch: int, train_error: float) -> bool:
        """Record an epoch's training error; returns ``True`` only for the epoch where TPT starts."""
        if self.epoch is None and train_error <= self.threshold:
            self.epoch = epoch
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """The detector's state, for checkpoints."""
        return {"tpt_epoch": self.epoch, "tpt_threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their current value)."""
        self.epoch = state.get("tpt_epoch", self.epoch)

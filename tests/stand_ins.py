"""Stand-ins for the parts of a Trainer that the pipeline tests need (no Trainer)."""

from __future__ import annotations


class Recorder:
    """A logger that keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, metrics))

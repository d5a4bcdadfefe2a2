"""The warnings a finished measurement gives (once per fit each): skipped samples, absent classes, one class.

They are computed from the agreed counts and the reduced statistics, so every rank would give the same
ones; the callback shows them on rank 0 only.
"""

from __future__ import annotations

from lightning_neural_collapse.pipeline.compute import EpochOutcome


def epoch_warnings(outcome: EpochOutcome, epoch: int, num_classes: int, prefix: str) -> list[tuple[str, str]]:
    """``(key, message)`` pairs for what the measurement of ``epoch`` left out.

    Example:
        >>> outcome = EpochOutcome("counted", {"nonfinite": 3, "bad_label": 0})
        >>> [key for key, _ in epoch_warnings(outcome, 2, 4, "nc")]
        ['nonfinite']
    """
    found: list[tuple[str, str]] = []
    nonfinite = outcome.counts.get("nonfinite", 0) + outcome.exact_counts.get("nonfinite", 0)
    bad_label = outcome.counts.get("bad_label", 0) + outcome.exact_counts.get("bad_label", 0)
    if nonfinite:
        found.append((
            "nonfinite",
            f"NeuralCollapseCallback: {nonfinite} samples of epoch {epoch} had NaN/Inf features or logits and were "
            f"left out of every metric (the count is logged as `{prefix}/skipped_samples` each epoch). The model "
            "produced them; if the captured layer is not the one meant, set `features=` or `classifier=`.",
        ))
    if bad_label:
        found.append((
            "bad-label",
            f"NeuralCollapseCallback: {bad_label} samples of epoch {epoch} had invalid labels (outside "
            f"[0, {num_classes}), negative but not `ignore_index`, or float targets that are not one-hot or "
            f"probabilities) and were left out of every metric (counted in `{prefix}/skipped_samples`). Set "
            "`num_classes=` (and `classifier=`), `ignore_index=` or `label_getter=`.",
        ))
    stats = outcome.statistics
    if stats is None:
        return found
    present = stats.present.tolist()
    absent = [c for c, here in enumerate(present) if not here]
    if sum(present) == 1:
        found.append((
            "one-class",
            f"NeuralCollapseCallback: only class {present.index(True)} has samples in epoch {epoch}; NC1, NC2 of "
            "the means and NC3 need two classes and are not logged. Check the data or `label_getter=`.",
        ))
    elif absent:
        shown = f"{absent[:10]}{'...' if len(absent) > 10 else ''}"
        found.append((
            "absent",
            f"NeuralCollapseCallback: class(es) {shown} had no sample in epoch {epoch} and are left out of every "
            f"metric (C = {sum(present)} present classes). Expected on a subset of the data; otherwise check the "
            "labels (`label_getter=`).",
        ))
    return found

"""The warnings a finished measurement gives (once per fit each): skipped samples, absent classes, one class.

They are computed from the agreed counts and the reduced statistics, so every rank would give the same
ones; the callback shows them on rank 0 only.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from lightning_neural_collapse.pipeline.compute import EpochOutcome


class WarnOnce:
    """The warnings of one fit: each key once, on global rank 0; or, for a rank's own failure, on that rank.

    Example:
        >>> import warnings
        >>> warn = WarnOnce()
        >>> with warnings.catch_warnings(record=True) as record:
        ...     warnings.simplefilter("always")
        ...     warn("absent", "class 3 had no sample"); warn("absent", "class 3 had no sample")
        >>> len(record)
        1
    """

    def __init__(self) -> None:
        self.given: set[str] = set()

    def __call__(self, key: str, message: str) -> None:
        if key not in self.given:
            self.given.add(key)
            rank_zero_warn(message, category=RuntimeWarning)

    def info(self, key: str, message: str) -> None:
        """Say ``message`` once (an info message on global rank 0)."""
        if key not in self.given:
            self.given.add(key)
            rank_zero_info(message)

    @staticmethod
    def on_rank(rank: int, message: str) -> None:
        """Warn on this rank (prefixed with it), whatever its number."""
        warnings.warn(rank_prefixed_message(message, rank), RuntimeWarning, stacklevel=3)

    def skipped(self, rank: int, own: str | None, key: str, message: str) -> None:
        """A measurement that every rank skips: this rank's own cause ``own`` (if it failed) on this rank, then
        ``message`` once, on global rank 0."""
        if own:
            self.on_rank(rank, own)
        self(key, message)


def epoch_warnings(
    outcome: EpochOutcome, epoch: int, num_classes: int, prefix: str, subset: bool = False, unit: str = "epoch"
) -> list[tuple[str, str]]:
    """``(key, message)`` pairs for what the measurement of ``epoch`` left out (``subset``: ``classes=`` leaves
    classes out on purpose, so absent ones are not warned about).

    Example:
        >>> outcome = EpochOutcome("counted", {"nonfinite": 3, "bad_label": 0})
        >>> [key for key, _ in epoch_warnings(outcome, 2, 4, "nc")]
        ['nonfinite']
    """
    found: list[tuple[str, str]] = []
    nonfinite = outcome.counts.get("nonfinite", 0) + outcome.exact_counts.get("nonfinite", 0)
    bad_label = outcome.counts.get("bad_label", 0) + outcome.exact_counts.get("bad_label", 0)
    if nonfinite:
        found.append(
            (
                "nonfinite",
                f"NeuralCollapseCallback: {nonfinite} samples of {unit} {epoch} had NaN/Inf features or logits and "
                f"were left out of every metric (the count is logged as `{prefix}/skipped_samples` each {unit}). The "
                "model produced them; if the captured layer is not the one meant, set `features=` or `classifier=`.",
            )
        )
    if bad_label:
        found.append(
            (
                "bad-label",
                f"NeuralCollapseCallback: {bad_label} samples of {unit} {epoch} had invalid labels (outside "
                f"[0, {num_classes}), negative but not `ignore_index`, or float targets that are not one-hot or "
                f"probabilities) and were left out of every metric (counted in `{prefix}/skipped_samples`). Set "
                "`num_classes=` (and `classifier=`), `ignore_index=` or `label_getter=`.",
            )
        )
    stats = outcome.statistics
    if stats is None:
        return found
    present = stats.present.tolist()
    absent = [c for c, here in enumerate(present) if not here]
    if sum(present) == 1:
        found.append(
            (
                "one-class",
                f"NeuralCollapseCallback: only class {present.index(True)} has samples in {unit} {epoch}; NC1, NC2 of "
                "the means and NC3 need two classes and are not logged. Check the data or `label_getter=`.",
            )
        )
    elif absent and not subset:
        shown = f"{absent[:10]}{'...' if len(absent) > 10 else ''}"
        found.append(
            (
                "absent",
                f"NeuralCollapseCallback: class(es) {shown} had no sample in {unit} {epoch} and are left out of every "
                f"metric (C = {sum(present)} present classes). Expected on a subset of the data; otherwise check the "
                "labels (`label_getter=`).",
            )
        )
    return found


# ------------------------------------------------------------------------------- the callback's other messages


def no_forward(classifier: str, loop: str = "training") -> str:
    """A training (or validation) step in which the classifier did not run."""
    return (
        f"NeuralCollapseCallback: the classifier `{classifier}` did not run in a {loop} step; that batch is not "
        f"measured. Set `classifier=` to the layer the {loop} step uses."
    )


def several_forwards(classifier: str, calls: int) -> str:
    """A training step that ran the classifier more than once (SAM, FixMatch, several views)."""
    return (
        f"NeuralCollapseCallback: the classifier `{classifier}` ran {calls} times in one training step (SAM, "
        "FixMatch, several views?); each step's last forward is measured, and its samples must pair with the "
        "labels (`label_getter=`)."
    )


def batch_size_mismatch(labels: int, features: int) -> str:
    """Labels that do not pair with the captured features."""
    return (
        f"NeuralCollapseCallback: {labels} labels for {features} features in a batch (mixup, several views, several "
        "forwards?); such batches are skipped. Use `label_getter=`."
    )


def batch_error(epoch: int, cause: str) -> str:
    """A training batch that could not be measured after the first step."""
    return (
        f"NeuralCollapseCallback: a training batch of epoch {epoch} could not be measured ({cause}); nothing is "
        "logged for such an epoch. If the batch format changes during training, pass `label_getter=` (and "
        "`input_getter=` for mode='exact')."
    )


def val_batch_error(step: int, tag: str, cause: str) -> str:
    """A validation batch that could not be measured (``tag``: where its dataloader's keys go)."""
    return (
        f"NeuralCollapseCallback: a validation batch of the validation at step {step} could not be measured "
        f"({cause}); `{tag}` logs nothing for this validation run. If the validation batches differ from the "
        "training ones, pass a `label_getter=` that reads both, or set `measure_val=False`."
    )


def skipped_validation(step: int, tag: str, failed_ranks: int) -> str:
    """A validation run not measured because some rank could not take part."""
    return (
        f"NeuralCollapseCallback: the validation at step {step} is not measured under `{tag}`: {failed_ranks} rank(s) "
        "could not take part (a batch that could not be measured); every rank skips it, and training goes on."
    )


def no_reference(tag: str) -> str:
    """A validation run before any training measurement."""
    return (
        "NeuralCollapseCallback: this validation has no training measurement to compare with yet; "
        f"`{tag}/ncc_accuracy`, `nc4_ncc_mismatch` and `mean_shift` start after the first one (the other "
        f"`{tag}` keys are logged now)."
    )


def no_weight(classifier: str, num_classes: int, dim: int) -> str:
    """A classifier without a ``C x D`` weight."""
    return (
        f"NeuralCollapseCallback: `{classifier}` has no ({num_classes} x {dim}) weight; NC2 of the weights and NC3 are "
        "not measured."
    )


def partial_epoch(epoch: int) -> str:
    """Online mode, an epoch resumed from a mid-epoch checkpoint."""
    return (
        f"NeuralCollapseCallback: epoch {epoch} resumed from a mid-epoch checkpoint; its first batches were "
        "measured before it and their sums are lost, so that epoch is not logged (and TPT is not decided on it). "
        "Measuring goes on with the next epoch; mode='exact' measures resumed epochs in full."
    )


def skipped_epoch(epoch: int, stage: str, failed_ranks: int) -> str:
    """Every rank skips an epoch because some rank could not take part."""
    return (
        f"NeuralCollapseCallback: epoch {epoch} is not measured: {failed_ranks} rank(s) could not take part "
        f"({stage}); every rank skips it, and training goes on."
    )


def exact_failure(stage: str, cause: str | None, failed_ranks: int) -> str:
    """The exact pass failed at the first measured epoch: a configuration problem."""
    reason = cause or f"it failed on {failed_ranks} other rank(s); see their error"
    return (
        f"NeuralCollapseCallback(mode='exact'): the {stage} of the first measured epoch failed: {reason}. Set "
        "`input_getter=` (batch -> model input: a tensor, a tuple of arguments or a dict of keyword arguments) or "
        "`exact_dataloader=` (the data to measure), or use mode='online'."
    )


def padded_val_sampler(tag: str, samples: int, world_size: int) -> str:
    """A validation loader whose DistributedSampler repeats samples."""
    return (
        f"NeuralCollapseCallback: the validation DistributedSampler pads {samples} samples to a multiple of "
        f"{world_size} ranks, so `{tag}` counts up to {world_size - 1} samples twice per validation run (as any "
        "metric of that validation does). A validation set whose size is a multiple of the world size, or a "
        "sampler that does not pad, counts every sample once."
    )


def padded_sampler(samples: int, world_size: int) -> str:
    """Online mode under a DistributedSampler that repeats samples."""
    return (
        f"NeuralCollapseCallback(mode='online'): the DistributedSampler pads {samples} samples to a multiple of "
        f"{world_size} ranks, so each epoch counts up to {world_size - 1} samples twice. Use mode='exact' to count "
        "every sample exactly once."
    )

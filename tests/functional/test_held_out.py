"""``functional.held_out``: the mean shift against a brute-force float64 loop, its invariances, and the edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_neural_collapse.functional.held_out import HELD_OUT_KEYS, TEST_COLLAPSE_KEYS, fraction, mean_shift


def brute_mean_shift(val: Tensor, val_present: Tensor, train: Tensor, train_present: Tensor) -> float:
    """SPEC.md's definition, one class at a time in float64."""
    train_classes = [c for c in range(len(train)) if bool(train_present[c])]
    centre = sum(train[c].double() for c in train_classes) / len(train_classes)
    both = [c for c in train_classes if bool(val_present[c])]
    moved = sum(math.sqrt(float(((val[c].double() - train[c].double()) ** 2).sum())) for c in both) / len(both)
    spread = sum(math.sqrt(float(((train[c].double() - centre) ** 2).sum())) for c in both) / len(both)
    return moved / spread


def _means(seed: int, classes: int = 7, dim: int = 5) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    train = 3 * torch.randn(classes, dim, generator=g, dtype=torch.float64)
    return train, train + 0.4 * torch.randn(classes, dim, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_mean_shift_matches_the_definition(seed: int) -> None:
    train, val = _means(seed)
    train_present = torch.tensor([True, True, True, True, True, False, True])
    val_present = torch.tensor([True, False, True, True, True, True, True])  # 1 and 5 are in one split only
    got = mean_shift(val, val_present, train, train_present)
    assert got == pytest.approx(brute_mean_shift(val, val_present, train, train_present), rel=1e-12)
    assert got > 0


def test_mean_shift_invariances() -> None:
    train, val = _means(11)
    present = torch.ones(7, dtype=torch.bool)
    base = mean_shift(val, present, train, present)
    assert mean_shift(train, present, train, present) == 0.0
    assert mean_shift(17.0 * val, present, 17.0 * train, present) == pytest.approx(base, rel=1e-12)
    offset = torch.randn(5, dtype=torch.float64)
    assert mean_shift(val + offset, present, train + offset, present) == pytest.approx(base, rel=1e-12)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert mean_shift(val[perm], present, train[perm], present) == pytest.approx(base, rel=1e-12)
    # absent classes' rows are ignored, whatever they hold
    absent = present.clone()
    absent[2] = False
    garbage = val.clone()
    garbage[2] = float("nan")
    assert mean_shift(garbage, absent, train, present) == pytest.approx(mean_shift(val, absent, train, present))


def test_mean_shift_float32_inputs_are_computed_in_float64() -> None:
    train, val = _means(3)
    present = torch.ones(7, dtype=torch.bool)
    got = mean_shift(val.float(), present, train.float(), present)
    assert got == pytest.approx(brute_mean_shift(val.float(), present, train.float(), present), rel=1e-12)


def test_mean_shift_is_nan_without_a_shared_class_or_a_spread() -> None:
    train, val = _means(5, classes=3)
    assert math.isnan(mean_shift(val, torch.tensor([True, False, False]), train, torch.tensor([False, True, True])))
    same = torch.zeros(3, 5, dtype=torch.float64)
    assert math.isnan(mean_shift(val, torch.ones(3, dtype=torch.bool), same, torch.ones(3, dtype=torch.bool)))


def test_fraction_and_the_key_lists() -> None:
    assert fraction(1, 3) == pytest.approx(1 / 3) and math.isnan(fraction(0, 0))
    assert len(set(HELD_OUT_KEYS)) == len(HELD_OUT_KEYS)
    assert set(TEST_COLLAPSE_KEYS) <= set(HELD_OUT_KEYS) and "nc3" not in HELD_OUT_KEYS

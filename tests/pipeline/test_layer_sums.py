"""Per-layer sums of one unit: what online mode, the exact pass and validation accumulate, and the keys they give."""

from __future__ import annotations

import math

import pytest
import torch
from reference import layer_reference

from lightning_neural_collapse.functional.layers import PREVIOUS_SUFFIX, mean_statistics
from lightning_neural_collapse.pipeline.layer_sums import LayerCentres, LayerSums

CPU = torch.device("cpu")


def centres(means: torch.Tensor) -> LayerCentres:
    return LayerCentres.of(means, torch.ones(means.shape[0], dtype=torch.bool))


def rows(seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(60) % 3
    a = 2.0 * torch.nn.functional.one_hot(y, 5).double() + 0.3 * torch.randn(60, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 9, generator=g, dtype=torch.float64)[y] + 0.2 * torch.randn(60, 9, generator=g)
    return {"a": a, "b": b.double()}, y


def test_online_sums_give_statistics_and_the_lagged_projection_keys() -> None:
    layers, y = rows(0)
    references = {name: centres(mean_statistics(h, y, 3).means) for name, h in layers.items()}
    sums = LayerSums(
        {"a": 5, "b": 9},
        {"a": "a", "b": "b"},
        3,
        CPU,
        moments=True,
        references=references,
        project=True,
        suffix=PREVIOUS_SUFFIX,
    )
    for part in torch.split(torch.arange(60), 16):
        sums.add({name: h[part] for name, h in layers.items()}, y[part], torch.ones(len(part), dtype=torch.bool))
    values = sums.reduce().values()
    for name, h in layers.items():
        expected = layer_reference(h.numpy(), y.numpy(), 3)
        assert values[f"layers/{name}/nc1_prev_means"] == pytest.approx(expected["nc1"], rel=1e-9)
        assert values[f"layers/{name}/ncc_accuracy_prev_means"] == expected["ncc_accuracy"]
        assert values[f"layers/{name}/nc1_cdnv"] == pytest.approx(expected["nc1_cdnv"], rel=1e-9)
    assert f"layers/nc1_depth_slope{PREVIOUS_SUFFIX}" in values
    assert not any(math.isnan(v) for v in values.values())


def test_validation_sums_count_ncc_only_and_a_subset_leaves_other_classes_out() -> None:
    layers, y = rows(1)
    references = {"a": centres(mean_statistics(layers["a"], y, 3).means)}
    subset = torch.tensor([True, True, False])
    sums = LayerSums(
        {"a": 5},
        {"a": "a"},
        3,
        CPU,
        moments=False,
        references=references,
        project=True,
        directions=False,
        subset=subset,
    )
    sums.add({"a": layers["a"]}, y, torch.ones(60, dtype=torch.bool))
    values = sums.reduce().values(statistics=False)
    assert set(values) == {"layers/a/ncc_accuracy"}
    keep = y < 2
    means = references["a"].means[:2]
    nearest = torch.cdist(layers["a"][keep], means).argmin(dim=1)
    assert values["layers/a/ncc_accuracy"] == float((nearest == y[keep]).double().mean())


def test_a_layer_that_did_not_run_is_an_error_and_a_changed_width_drops_its_reference() -> None:
    sums = LayerSums({"a": 5}, {"a": "a"}, 3, CPU, moments=True)
    with pytest.raises(RuntimeError, match="`a` listed in `layers=` did not run"):
        sums.add({}, torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    stale = {"a": centres(torch.randn(3, 4, dtype=torch.float64))}
    fresh = LayerSums({"a": 5}, {"a": "a"}, 3, CPU, moments=True, references=stale, project=True)
    assert fresh.projections == {} and torch.equal(fresh.moments["a"].shift, torch.zeros(3, 5, dtype=torch.float64))


def test_centres_are_computed_once_and_carried_into_the_merged_results() -> None:
    """Exact mode needs each layer's means and P for its second pass, and again to keep them: one SVD each."""
    layers, y = rows(2)
    sums = LayerSums({"a": 5}, {"a": "a"}, 3, CPU, moments=True)
    sums.add({"a": layers["a"]}, y, torch.ones(60, dtype=torch.bool))
    first = sums.reduce()
    centres = first.centres()
    assert first.centres() is centres
    second = LayerSums({"a": 5}, {"a": "a"}, 3, CPU, moments=False, references=centres, project=True)
    second.add({"a": layers["a"]}, y, torch.ones(60, dtype=torch.bool))
    merged = first.merged(second.reduce())
    assert merged.centres() is centres
    assert torch.equal(centres["a"].means, mean_statistics(layers["a"], y, 3).means)

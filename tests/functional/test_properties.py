"""Invariances of the Neural Collapse metrics, checked with hypothesis on small random problems."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ALL_KEYS, FEATURE_KEYS, NC2_NC3_KEYS, NC4_KEY, compare, simplex_etf

from lightning_neural_collapse.functional import neural_collapse_metrics

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
SCALE_INVARIANT_KEYS: tuple[str, ...] = tuple(k for k in ALL_KEYS if k != NC4_KEY)
"""nc1, nc1_cdnv, every NC2 and NC3 key (the classifier is left unscaled)."""


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features, labels (every class present, unequal sizes), weight and bias of a small random problem."""
    num_classes = draw(st.integers(2, 5))
    dim = draw(st.integers(1, 6))
    counts = draw(st.lists(st.integers(1, 8), min_size=num_classes, max_size=num_classes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    means = 2.0 * rng.standard_normal((num_classes, dim))
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts))
    features = means[labels] + rng.uniform(0.1, 1.0) * rng.standard_normal((len(labels), dim))
    weight = means - means.mean(axis=0) + rng.standard_normal((num_classes, dim))
    bias = rng.standard_normal(num_classes)
    return features, labels, weight, bias


def metrics(features: np.ndarray, labels: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> dict[str, float]:
    return neural_collapse_metrics(
        torch.tensor(features), torch.tensor(labels), torch.tensor(weight), torch.tensor(bias)
    )


@SETTINGS
@given(problems(), st.floats(1e-3, 1e3))
def test_scaling_features_changes_no_scale_free_key(
    problem: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], scale: float
) -> None:
    features, labels, weight, bias = problem
    before = metrics(features, labels, weight, bias)
    after = metrics(scale * features, labels, weight, bias)
    keys = tuple(k for k in SCALE_INVARIANT_KEYS if k in before)
    assert set(before) == set(after)
    problems_found = compare(after, before, 1e-8, floor=1e-6, keys=keys)
    assert not problems_found, problems_found


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_relabelling_classes_changes_no_key(
    problem: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], random: object
) -> None:
    features, labels, weight, bias = problem
    num_classes = weight.shape[0]
    perm = list(range(num_classes))
    random.shuffle(perm)  # type: ignore[attr-defined]
    perm_arr = np.array(perm)
    new_weight, new_bias = np.empty_like(weight), np.empty_like(bias)
    new_weight[perm_arr] = weight  # class c becomes class perm[c], its row and bias move with it
    new_bias[perm_arr] = bias
    before = metrics(features, labels, weight, bias)
    after = metrics(features, perm_arr[labels], new_weight, new_bias)
    assert set(before) == set(after)
    problems_found = compare(after, before, 1e-9, floor=1e-6)
    assert not problems_found, problems_found


@SETTINGS
@given(
    st.integers(2, 6).flatmap(
        lambda c: st.tuples(
            st.just(c),
            st.integers(c - 1, c + 3),
            st.lists(st.integers(1, 20), min_size=c, max_size=c),
            st.floats(0.01, 100.0),
            st.integers(0, 2**32 - 1),
        )
    )
)
def test_exact_simplex_etf_scores_zero(params: tuple[int, int, list[int], float, int]) -> None:
    num_classes, dim, counts, scale, seed = params
    rng = np.random.default_rng(seed)
    vertices = scale * simplex_etf(num_classes, dim, rng)
    offset = scale * rng.standard_normal(dim)
    labels = rng.permutation(np.repeat(np.arange(num_classes), counts))
    features = offset + vertices[labels]
    weight = rng.uniform(0.1, 10.0) * vertices
    got = metrics(features, labels, weight, -weight @ offset)
    assert set(got) == set(ALL_KEYS)
    for key in NC2_NC3_KEYS + FEATURE_KEYS[:2]:
        assert abs(got[key]) <= 1e-10, (key, got[key])
    assert abs(got["nc3_cosine"] - 1.0) <= 1e-12
    assert got[NC4_KEY] == 0.0

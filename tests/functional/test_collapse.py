"""``functional.neural_collapse_metrics`` against the brute-force float64 reference of ``reference.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import (
    ALL_KEYS,
    CASE_NAMES,
    FEATURE_KEYS,
    FLOAT64_TOL,
    FLOOR,
    NC2_NC3_KEYS,
    NC4_KEY,
    Case,
    assert_matches_reference,
    compare,
    exact_etf,
    gaussian_mixture,
    make_case,
    reference_for,
    reference_metrics,
)

from lightning_neural_collapse.functional import neural_collapse_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def package_metrics(case: Case, dtype: torch.dtype, **kwargs: object) -> dict[str, float]:
    return neural_collapse_metrics(
        torch.tensor(case.features, dtype=dtype),
        torch.tensor(case.labels),
        torch.tensor(case.weight, dtype=dtype),
        torch.tensor(case.bias, dtype=dtype),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    case = make_case(name)
    ref = reference_for(name)
    assert set(ref) == set(ALL_KEYS)  # every case here has every key defined
    got = package_metrics(case, dtype)
    assert_matches_reference(got, ref, len(case.labels), float32=dtype == torch.float32)


def test_feature_keys_only_without_weight() -> None:
    case = make_case("gmm_c10_d64")
    got = neural_collapse_metrics(torch.tensor(case.features), torch.tensor(case.labels))
    assert set(got) == set(FEATURE_KEYS)
    assert not compare(got, reference_for("gmm_c10_d64"), FLOAT64_TOL, floor=FLOOR, keys=FEATURE_KEYS)


def test_exact_etf_is_fully_collapsed() -> None:
    got = package_metrics(make_case("exact_etf_c7_d9"), torch.float64)
    for key in NC2_NC3_KEYS + ("nc1", "nc1_cdnv"):
        assert abs(got[key]) <= 1e-12, (key, got[key])
    assert got["nc3_cosine"] == pytest.approx(1.0, abs=1e-12)
    assert got[NC4_KEY] == 0.0


@pytest.mark.parametrize("name", ["gmm_c10_d64", "missing_class_c6_d8", "exact_etf_c7_d9", "c5_d3"])
def test_sample_global_mean_matches_reference(name: str) -> None:
    case = make_case(name)
    ref = reference_for(name, "sample")
    got = package_metrics(case, torch.float64, global_mean="sample")
    assert_matches_reference(got, ref, len(case.labels), float32=False)
    # on imbalanced data the two global means differ (and only "classes" scores an exact ETF as 0)
    default = reference_for(name)
    assert abs(ref["nc2_maxangle_means"] - default["nc2_maxangle_means"]) > 1e-6


def test_unknown_global_mean_raises() -> None:
    case = make_case("c3_d2")
    with pytest.raises(ValueError, match="global_mean"):
        neural_collapse_metrics(torch.tensor(case.features), torch.tensor(case.labels), global_mean="median")  # type: ignore[arg-type]


def test_absent_last_class_uses_weight_rows() -> None:
    """A label value that never occurs, here the last one: ``num_classes`` comes from the weight."""
    case = gaussian_mixture(5, 4, seed=11, absent=(4,))
    assert case.labels.max() == 3
    ref = reference_metrics(case.features, case.labels, case.weight, case.bias, num_classes=5)
    got = package_metrics(case, torch.float64)
    assert_matches_reference(got, ref, len(case.labels), float32=False)


def test_one_class_omits_undefined_keys() -> None:
    rng = np.random.default_rng(0)
    features = rng.standard_normal((20, 3))
    labels = np.zeros(20, dtype=np.int64)
    weight = rng.standard_normal((1, 3))
    bias = rng.standard_normal(1)
    got = neural_collapse_metrics(
        torch.tensor(features), torch.tensor(labels), torch.tensor(weight), torch.tensor(bias)
    )
    ref = reference_metrics(features, labels, weight, bias)
    # only the norm spread of the single weight row (0) and NC4 are defined for one class
    assert set(got) == set(ref) == {"nc2_equinorm_weights", NC4_KEY}
    assert got["nc2_equinorm_weights"] == 0.0 and got[NC4_KEY] == 0.0
    assert neural_collapse_metrics(torch.tensor(features), torch.tensor(labels)) == {}


def test_one_present_class_among_several() -> None:
    rng = np.random.default_rng(1)
    features = rng.standard_normal((10, 4))
    labels = np.full(10, 2, dtype=np.int64)
    weight = rng.standard_normal((4, 4))
    got = neural_collapse_metrics(torch.tensor(features), torch.tensor(labels), torch.tensor(weight))
    ref = reference_metrics(features, labels, weight)
    assert set(got) == set(ref)
    assert not any(k.startswith(("nc1", "nc3")) for k in got)
    assert_matches_reference(got, ref, 10, float32=False)


def test_two_classes_define_every_key() -> None:
    case = gaussian_mixture(2, 5, [7, 30], seed=12, name="c2_d5")
    ref = reference_metrics(case.features, case.labels, case.weight, case.bias)
    got = package_metrics(case, torch.float64)
    assert set(got) == set(ref) == set(ALL_KEYS)
    assert_matches_reference(got, ref, len(case.labels), float32=False)
    # two centred means (mean of means) are exactly opposite: every NC2-means key is 0
    for key in (
        "nc2_equinorm_means",
        "nc2_equiangular_means",
        "nc2_maxangle_means",
        "nc2_etf_distance_means",
    ):
        assert abs(got[key]) <= 1e-12, (key, got[key])


def test_exact_etf_imbalanced_d_equals_c_minus_1() -> None:
    case = exact_etf(4, 3, [1, 9, 3, 30], seed=13)
    got = package_metrics(case, torch.float64)
    for key in NC2_NC3_KEYS + ("nc1", "nc1_cdnv"):
        assert abs(got[key]) <= 1e-12, (key, got[key])
    # the sample global mean does not score the same ETF as collapsed (SPEC.md)
    assert package_metrics(case, torch.float64, global_mean="sample")["nc2_maxangle_means"] > 1e-3


@pytest.mark.parametrize("shape", [(11, 64), (10, 63), (10,), (1, 10, 64)])
def test_wrong_weight_shape_raises(shape: tuple[int, ...]) -> None:
    case = make_case("gmm_c10_d64")
    with pytest.raises(ValueError):
        neural_collapse_metrics(
            torch.tensor(case.features),
            torch.tensor(case.labels),
            torch.randn(*shape, dtype=torch.float64),
            num_classes=10,
        )

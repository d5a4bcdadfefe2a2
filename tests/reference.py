"""An independent brute-force float64 reference for every key of SPEC.md, and the test data sets.

Nothing here imports the package: every quantity is written out from its definition in SPEC.md with
numpy in float64, as plainly as possible (explicit outer products, explicit pairs, explicit distances),
so that a shared mistake between this file and ``lightning_neural_collapse.functional`` is unlikely.
Only the classes with at least one sample take part; keys whose quantity is undefined (an empty set of
pairs, a zero denominator) are left out of the result, as the package does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

GlobalMeanKind = Literal["classes", "sample"]

FEATURE_KEYS: tuple[str, ...] = (
    "nc1",
    "nc1_cdnv",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_distance_means",
    "nc2_log_energy_means",
)
CLASSIFIER_KEYS: tuple[str, ...] = (
    "nc2_equinorm_weights",
    "nc2_equiangular_weights",
    "nc2_maxangle_weights",
    "nc2_etf_distance_weights",
    "nc3_self_duality",
    "nc3_cosine",
    "nc3_cosine_cov",
)
NC4_KEY = "nc4_ncc_mismatch"
ALL_KEYS: tuple[str, ...] = FEATURE_KEYS + CLASSIFIER_KEYS + (NC4_KEY,)
NC2_NC3_KEYS: tuple[str, ...] = tuple(
    k for k in ALL_KEYS if k.startswith(("nc2_", "nc3_self", "nc3_cosine_cov")) and k != "nc2_log_energy_means"
)
"""Keys that are exactly 0 at a simplex ETF (``nc3_cosine`` is 1 there, the log energy -0.5 log(2C/(C-1)))."""


# ----------------------------------------------------------------------------------------------------------
# The reference metrics
# ----------------------------------------------------------------------------------------------------------


def _std(values: list[float]) -> float:
    """Population standard deviation, written out."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    denom = math.sqrt(float(np.dot(a, a))) * math.sqrt(float(np.dot(b, b)))
    return float(np.dot(a, b)) / denom if denom > 0 else math.nan


def _pairs(num: int) -> list[tuple[int, int]]:
    """All ordered pairs ``(c, c')`` with ``c != c'``."""
    return [(a, b) for a in range(num) for b in range(num) if a != b]


def _equinorm(vectors: np.ndarray) -> float:
    norms = [float(np.linalg.norm(v)) for v in vectors]
    if not norms:
        return math.nan
    avg = sum(norms) / len(norms)
    return _std(norms) / avg if avg > 0 else math.nan


def _pair_cosines(vectors: np.ndarray) -> list[float]:
    return [_cosine(vectors[a], vectors[b]) for a, b in _pairs(len(vectors))]


def _equiangular(vectors: np.ndarray) -> float:
    cos = _pair_cosines(vectors)
    if not cos or not all(math.isfinite(c) for c in cos):
        return math.nan
    return _std(cos)


def _max_angle(vectors: np.ndarray) -> float:
    num = len(vectors)
    cos = _pair_cosines(vectors)
    if not cos or not all(math.isfinite(c) for c in cos):
        return math.nan
    return sum(abs(c + 1.0 / (num - 1)) for c in cos) / len(cos)


def _etf_distance(vectors: np.ndarray) -> float:
    num = len(vectors)
    if num < 2:
        return math.nan
    gram = np.array([[float(np.dot(a, b)) for b in vectors] for a in vectors])
    scale = math.sqrt(float((gram**2).sum()))
    if not scale > 0:
        return math.nan
    target = (np.eye(num) - np.ones((num, num)) / num) / math.sqrt(num - 1)
    return math.sqrt(float(((gram / scale - target) ** 2).sum()))


def _log_energy(vectors: np.ndarray) -> float:
    """``Avg_{c != c'} log(1 / ||u_c - u_c'||)`` with ``u`` the unit vectors, from explicit differences."""
    norms = [float(np.linalg.norm(v)) for v in vectors]
    if len(vectors) < 2 or not all(n > 0 for n in norms):
        return math.nan
    units = [v / n for v, n in zip(vectors, norms, strict=True)]
    terms = [-math.log(float(np.linalg.norm(units[a] - units[b]))) for a, b in _pairs(len(vectors))]
    return sum(terms) / len(terms)


def _pinv_capped(sigma_b: np.ndarray, num_classes: int) -> np.ndarray | None:
    """Pseudo-inverse from the top ``min(C-1, D)`` eigenpairs above ``lambda_max * max(C, D) * eps``."""
    dim = sigma_b.shape[0]
    rank = min(num_classes - 1, dim)
    eigvals, eigvecs = np.linalg.eigh(sigma_b)
    order = np.argsort(eigvals)[::-1][:rank]
    eigvals, eigvecs = eigvals[order], eigvecs[:, order]
    if len(eigvals) == 0 or not eigvals[0] > 0:
        return None
    tol = eigvals[0] * max(num_classes, dim) * np.finfo(np.float64).eps
    pinv = np.zeros_like(sigma_b)
    for lam, vec in zip(eigvals, eigvecs.T, strict=True):
        if lam > tol:
            pinv += np.outer(vec, vec) / lam
    return pinv


def _squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``(N, K)`` squared distances ``||p_i - c_k||^2`` from explicit differences (never the expansion)."""
    try:
        from scipy.spatial.distance import cdist
    except ImportError:  # pragma: no cover - scipy comes with the dev extras (scikit-learn)
        return np.stack([((points - c) ** 2).sum(axis=1) for c in centres], axis=1)
    return cdist(points, centres, "sqeuclidean")


def reference_metrics(
    features: np.ndarray,
    labels: np.ndarray,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    global_mean: GlobalMeanKind = "classes",
    num_classes: int | None = None,
) -> dict[str, float]:
    """Every SPEC.md key, brute force in float64; undefined keys left out.

    Args:
        features: ``(N, D)`` features.
        labels: ``(N,)`` integer labels.
        weight: optional ``(C, D)`` classifier weight (all label values, present or not).
        bias: optional ``(C,)`` bias, used by NC4 only.
        global_mean: ``"classes"`` (mean of the class means) or ``"sample"`` (mean of all samples).
        num_classes: ``C``; default ``weight.shape[0]`` or ``labels.max() + 1``.
    """
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    num_samples, dim = h.shape
    if num_classes is None:
        num_classes = weight.shape[0] if weight is not None else int(y.max()) + 1
    present = [c for c in range(num_classes) if (y == c).sum() > 0]
    num = len(present)

    # class means, by class, two-pass
    mu = {c: h[y == c].mean(axis=0) for c in present}
    if global_mean == "classes":
        mu_g = sum(mu[c] for c in present) / num
    elif global_mean == "sample":
        mu_g = h.mean(axis=0)
    else:
        raise ValueError(global_mean)
    centred = np.stack([mu[c] - mu_g for c in present])  # rows; M = centred.T (D x C)

    # Sigma_W = (1/N) sum_i (h_i - mu_yi)(h_i - mu_yi)^T, a sum of outer products
    resid = h - np.stack([mu[int(c)] for c in y])
    sigma_w = np.einsum("ni,nj->ij", resid, resid) / num_samples
    # Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T
    sigma_b = np.zeros((dim, dim))
    for row in centred:
        sigma_b += np.outer(row, row)
    sigma_b /= num

    out: dict[str, float] = {}
    pinv = _pinv_capped(sigma_b, num)
    out["nc1"] = float(np.trace(sigma_w @ pinv)) / num if pinv is not None else math.nan

    # CDNV with explicit pairwise differences
    var = {c: float(((h[y == c] - mu[c]) ** 2).sum(axis=1).mean()) for c in present}
    terms = []
    for a, b in _pairs(num):
        ca, cb = present[a], present[b]
        dist2 = float(((mu[ca] - mu[cb]) ** 2).sum())
        terms.append((var[ca] + var[cb]) / (2.0 * dist2) if dist2 > 0 else math.nan)
    out["nc1_cdnv"] = sum(terms) / len(terms) if terms else math.nan

    out["nc2_equinorm_means"] = _equinorm(centred)
    out["nc2_equiangular_means"] = _equiangular(centred)
    out["nc2_maxangle_means"] = _max_angle(centred)
    out["nc2_etf_distance_means"] = _etf_distance(centred)
    out["nc2_log_energy_means"] = _log_energy(centred)

    if weight is not None:
        w_all = np.asarray(weight, dtype=np.float64)
        w = np.stack([w_all[c] for c in present])
        out["nc2_equinorm_weights"] = _equinorm(w)
        out["nc2_equiangular_weights"] = _equiangular(w)
        out["nc2_maxangle_weights"] = _max_angle(w)
        out["nc2_etf_distance_weights"] = _etf_distance(w)
        w_norm = math.sqrt(float((w**2).sum()))
        m_norm = math.sqrt(float((centred**2).sum()))
        if w_norm > 0 and m_norm > 0:
            out["nc3_self_duality"] = float(((w.T / w_norm - centred.T / m_norm) ** 2).sum())
        cos = [_cosine(w[i], centred[i]) for i in range(num)]
        out["nc3_cosine"] = sum(cos) / num if num else math.nan
        if num and all(math.isfinite(c) for c in cos) and sum(cos) != 0:
            out["nc3_cosine_cov"] = _std(cos) / (sum(cos) / num)  # UNC3, population Std over the mean

        # NC4: network decision over all C rows (bias included) vs the nearest present class mean
        b = np.zeros(num_classes) if bias is None else np.asarray(bias, dtype=np.float64)
        logits = h @ w_all.T + b
        network = logits.argmax(axis=1)
        dist = _squared_distances(h, np.stack([mu[c] for c in present]))
        ncc = np.array(present)[dist.argmin(axis=1)]
        out[NC4_KEY] = float((network != ncc).mean())
    return {k: v for k, v in out.items() if math.isfinite(v)}


HELD_OUT_COLLAPSE_KEYS = FEATURE_KEYS  # test collapse: the metrics of the validation features alone


def held_out_reference(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    val_features: np.ndarray,
    val_labels: np.ndarray,
    val_logits: np.ndarray,
    num_classes: int,
) -> dict[str, float]:
    """SPEC.md's held-out keys, brute force in float64: validation samples against the training class means
    (``ncc_accuracy``, ``nc4_ncc_mismatch``, ``mean_shift``), the network's ``accuracy``, and the test-collapse
    keys of the validation data alone."""
    train_h = np.asarray(train_features, dtype=np.float64)
    train_y = np.asarray(train_labels, dtype=np.int64)
    val_h = np.asarray(val_features, dtype=np.float64)
    val_y = np.asarray(val_labels, dtype=np.int64)
    in_train = [c for c in range(num_classes) if (train_y == c).sum() > 0]
    mu_train = {c: train_h[train_y == c].mean(axis=0) for c in in_train}
    dist = _squared_distances(val_h, np.stack([mu_train[c] for c in in_train]))
    nearest = np.array(in_train)[dist.argmin(axis=1)]
    network = np.asarray(val_logits).argmax(axis=1)
    out = {
        "accuracy": float((network == val_y).mean()),
        "ncc_accuracy": float((nearest == val_y).mean()),
        "nc4_ncc_mismatch": float((network != nearest).mean()),
    }
    collapse = reference_metrics(val_h, val_y, num_classes=num_classes)
    out.update({key: collapse[key] for key in HELD_OUT_COLLAPSE_KEYS if key in collapse})
    both = [c for c in in_train if (val_y == c).sum() > 0]
    centre = sum(mu_train[c] for c in in_train) / len(in_train)
    moved = [float(np.linalg.norm(val_h[val_y == c].mean(axis=0) - mu_train[c])) for c in both]
    spread = [float(np.linalg.norm(mu_train[c] - centre)) for c in both]
    out["mean_shift"] = (sum(moved) / len(both)) / (sum(spread) / len(both))
    return out


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A labelled feature set with a classifier, all float64 numpy arrays."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def simplex_etf(num_classes: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``(C, D)`` rows forming a randomly rotated simplex ETF of unit norms (needs ``D >= C - 1``)."""
    if dim < num_classes - 1:
        raise ValueError("a simplex ETF of C vertices needs D >= C - 1")
    centring = np.eye(num_classes) - np.ones((num_classes, num_classes)) / num_classes
    eigvals, eigvecs = np.linalg.eigh(centring)
    basis = eigvecs[:, eigvals > 0.5]  # (C, C-1) orthonormal basis of the complement of 1
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    rows = basis @ rotation[: num_classes - 1]  # (C, D)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _shuffle(features: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(len(labels))
    return features[order], labels[order]


def gaussian_mixture(
    num_classes: int,
    dim: int,
    counts: list[int] | np.ndarray | None = None,
    *,
    seed: int = 0,
    name: str | None = None,
    absent: tuple[int, ...] = (),
    separation: float = 3.0,
) -> Case:
    """Gaussian classes of unequal sizes and spreads; ``absent`` label values get no sample.

    Class means have i.i.d. coordinates of std ``separation``, features unit-ish noise around them; the
    classifier is a noisy copy of the centred means, so NC4 is not trivially 0.
    """
    rng = np.random.default_rng(seed)
    if counts is None:
        counts = rng.integers(20, 200, size=num_classes)
    counts = np.array(counts)
    counts[list(absent)] = 0
    means = separation * rng.standard_normal((num_classes, dim))
    spread = rng.uniform(0.5, 1.5, size=num_classes)
    labels = np.repeat(np.arange(num_classes), counts)
    features = means[labels] + spread[labels, None] * rng.standard_normal((len(labels), dim))
    features, labels = _shuffle(features, labels, rng)
    centred = means - means.mean(axis=0)
    weight = centred + 0.5 * separation * rng.standard_normal((num_classes, dim))
    bias = 0.3 * rng.standard_normal(num_classes)
    return Case(name or f"gmm_c{num_classes}_d{dim}", features, labels, weight, bias)


def near_collapse(num_classes: int, dim: int, *, seed: int = 0, noise: float = 0.02, norm: float = 100.0) -> Case:
    """Nearly collapsed features: means of norm ~``norm`` near a simplex ETF, tiny within-class noise."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(50, 150, size=num_classes)
    vertices = norm * simplex_etf(num_classes, min(dim, num_classes + 4), rng)
    vertices = np.concatenate([vertices, np.zeros((num_classes, dim - vertices.shape[1]))], axis=1)
    vertices = vertices + 0.01 * norm * rng.standard_normal(vertices.shape) / math.sqrt(dim)
    offset = 20.0 * rng.standard_normal(dim) / math.sqrt(dim)
    labels = np.repeat(np.arange(num_classes), counts)
    features = offset + vertices[labels] + noise * rng.standard_normal((len(labels), dim))
    features, labels = _shuffle(features, labels, rng)
    centred = vertices - vertices.mean(axis=0)
    weight = centred / norm + 0.01 * rng.standard_normal((num_classes, dim))
    bias = -weight @ (offset + vertices.mean(axis=0)) + 0.01 * rng.standard_normal(num_classes)
    return Case(f"near_collapse_c{num_classes}_d{dim}", features, labels, weight, bias)


def exact_etf(num_classes: int, dim: int, counts: list[int] | np.ndarray, *, seed: int = 0, scale: float = 3.0) -> Case:
    """Features exactly at the vertices of a (rotated, scaled, offset) simplex ETF, imbalanced classes.

    The classifier rows are proportional to the centred vertices and the bias cancels the offset, so every
    NC1/NC2/NC3 key is 0 (``nc3_cosine`` 1) and the network agrees with the NCC rule (NC4 0).
    """
    rng = np.random.default_rng(seed)
    vertices = scale * simplex_etf(num_classes, dim, rng)
    offset = rng.standard_normal(dim)
    labels = np.repeat(np.arange(num_classes), counts)
    features = offset + vertices[labels]
    features, labels = _shuffle(features, labels, rng)
    weight = 0.7 * vertices
    bias = -weight @ offset
    return Case(f"exact_etf_c{num_classes}_d{dim}", features, labels, weight, bias)


CASE_FACTORIES: dict[str, Callable[[], Case]] = {
    "gmm_c10_d64": lambda: gaussian_mixture(10, 64, seed=1, separation=0.4),
    "near_collapse_c10_d32": lambda: near_collapse(10, 32, seed=2),
    "exact_etf_c7_d9": lambda: exact_etf(7, 9, [5, 40, 13, 2, 77, 1, 20], seed=3),
    "missing_class_c6_d8": lambda: gaussian_mixture(6, 8, seed=4, absent=(2,), name="missing_class_c6_d8"),
    "c3_d2": lambda: gaussian_mixture(3, 2, [30, 60, 45], seed=5, name="c3_d2"),
    "c5_d3": lambda: gaussian_mixture(5, 3, [12, 50, 33, 70, 25], seed=6, name="c5_d3"),
    "large_c100_d256": lambda: gaussian_mixture(
        100, 256, np.full(100, 200), seed=7, name="large_c100_d256", separation=0.3
    ),
}
"""Every named test case (``large_c100_d256`` has N = 20000)."""

CASE_NAMES: tuple[str, ...] = tuple(CASE_FACTORIES)


@functools.cache
def make_case(name: str) -> Case:
    """The named case, built once per process."""
    return CASE_FACTORIES[name]()


@functools.cache
def reference_for(name: str, global_mean: GlobalMeanKind = "classes") -> dict[str, float]:
    """The reference metrics of the named case (with its weight and bias), computed once per process."""
    case = make_case(name)
    return reference_metrics(
        case.features,
        case.labels,
        case.weight,
        case.bias,
        global_mean=global_mean,
        num_classes=case.num_classes,
    )


# ----------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------


def relative_error(actual: float, expected: float, floor: float = 1e-12) -> float:
    """``|actual - expected| / max(|expected|, floor)``: relative, with an absolute floor for zeros."""
    return abs(actual - expected) / max(abs(expected), floor)


def compare(
    actual: dict[str, float],
    expected: dict[str, float],
    tolerances: dict[str, float] | float,
    *,
    floor: float = 1e-12,
    keys: tuple[str, ...] | None = None,
) -> list[str]:
    """Mismatches between two metric dicts as readable lines (empty when they agree).

    ``tolerances`` is one relative tolerance or one per key; a key missing from one side is a mismatch.
    """
    problems = []
    for key in keys if keys is not None else tuple(sorted(set(actual) | set(expected))):
        if key not in actual or key not in expected:
            problems.append(f"{key}: actual={actual.get(key)} expected={expected.get(key)}")
            continue
        tol = tolerances if isinstance(tolerances, float) else tolerances[key]
        err = relative_error(actual[key], expected[key], floor)
        if not err <= tol:
            problems.append(f"{key}: actual={actual[key]!r} expected={expected[key]!r} rel_err={err:.3g} > {tol}")
    return problems


# ----------------------------------------------------------------------------------------------------------
# Tolerances of the comparisons with the reference
# ----------------------------------------------------------------------------------------------------------

FLOAT64_TOL = 1e-8
"""Relative tolerance for float64 inputs."""
FLOAT32_TOL = {key: (1e-5 if key.startswith("nc1") else 1e-3) for key in FEATURE_KEYS + CLASSIFIER_KEYS}
"""Relative tolerances for float32 inputs compared with the reference on the float64 originals."""
FLOOR = 1e-6
"""Below this magnitude relative errors are taken against the floor: 1e-8 of it is 1e-14 absolute."""
FLOAT32_FLOOR = 1e-4
"""float32 rounding of the inputs leaves NC2/NC3 values of ~1e-8 where the exact value is 0."""


def assert_matches_reference(got: dict[str, float], ref: dict[str, float], num_samples: int, float32: bool) -> None:
    """Assert the same keys on both sides and agreement within the tolerances above; NC4 within 2/N.

    ``float32``: the inputs of ``got`` were the float32-rounded features (and classifier).
    """
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    assert all(math.isfinite(v) for v in got.values())
    keys = tuple(k for k in got if k != NC4_KEY)
    if float32:
        problems = compare(got, ref, FLOAT32_TOL, floor=FLOAT32_FLOOR, keys=tuple(k for k in keys if k in NC2_NC3_KEYS))
        problems += compare(got, ref, FLOAT32_TOL, floor=FLOOR, keys=tuple(k for k in keys if k not in NC2_NC3_KEYS))
    else:
        problems = compare(got, ref, FLOAT64_TOL, floor=FLOOR, keys=keys)
    assert not problems, "\n".join(problems)
    if NC4_KEY in ref:
        assert abs(got[NC4_KEY] - ref[NC4_KEY]) <= 2.0 / num_samples


LAYER_REFERENCE_KEYS = (
    "nc1",
    "nc1_trace_ratio",
    "nc1_cdnv",
    "ncc_accuracy",
    "nc2_equinorm_means",
    "nc2_equiangular_means",
    "nc2_maxangle_means",
    "nc2_etf_distance_means",
)


def layer_reference(
    features: np.ndarray, labels: np.ndarray, num_classes: int, *, global_mean: GlobalMeanKind = "classes"
) -> dict[str, float]:
    """SPEC.md's per-layer keys, brute force in float64 with ``D x D`` matrices (keep ``D`` small): NC1 from
    ``Sigma_W`` and the capped ``pinv(Sigma_B)``, the trace ratio from both traces, and the NCC accuracy from
    explicit distances to the layer's class means."""
    h = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    full = reference_metrics(h, y, global_mean=global_mean, num_classes=num_classes)
    out = {key: full[key] for key in LAYER_REFERENCE_KEYS if key in full}
    present = [c for c in range(num_classes) if (y == c).sum() > 0]
    mu = np.stack([h[y == c].mean(axis=0) for c in present])
    mu_g = mu.mean(axis=0) if global_mean == "classes" else h.mean(axis=0)
    resid = h - mu[np.searchsorted(present, y)]
    within = float((resid**2).sum()) / len(h)
    between = float(((mu - mu_g) ** 2).sum(axis=1).mean())
    out["nc1_trace_ratio"] = within / between
    nearest = np.array(present)[_squared_distances(h, mu).argmin(axis=1)]
    out["ncc_accuracy"] = float((nearest == y).mean())
    return out

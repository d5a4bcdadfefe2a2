"""Cost of the streaming ``NeuralCollapse`` metric against a plain two-pass float64 computation.

For each (C, D) it prints, as a markdown table (medians of a few repeats):

- ``compute``: one ``NeuralCollapse.compute(weight=W)`` (every key but NC4, from the accumulated states);
- ``two-pass``: a straightforward float64 implementation on the same data held in memory: class means,
  the explicit centred within-class Gram ``Sigma_W``, ``torch.linalg.pinv(Sigma_B, hermitian=True)``,
  ``Tr(Sigma_W Sigma_B^+) / C`` and the NC2/NC3 keys (the SVD-based default ``pinv`` takes ~50 s at
  D = 2048 on a 2-core CPU, so the symmetric eigen-solver variant is used);
- ``update / 1k``: one ``update`` with 1,000 float32 samples, against one D x D float64 matmul (an update
  costs about 1000/D of such a matmul: the ``(h - s)^T (h - s)`` rank-1000 product dominates).

Not a test: nothing asserts on time. Results vary with machine load; run it on an idle machine.

    python benchmarks/bench_metrics.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_metrics.py --quick    # fewer samples and repeats, well under a minute
    python benchmarks/bench_metrics.py --threads 1  # other processes busy: OpenMP waits can cost 10-100x
    python benchmarks/bench_metrics.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from lightning_neural_collapse import NeuralCollapse

CONFIGS: tuple[tuple[int, int, int], ...] = ((10, 512, 20_000), (100, 2048, 10_000), (1000, 2048, 10_000))
"""(C, D, N) of the full run; ``--quick`` uses N = max(2 C, 2000)."""
BATCH = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls (after one untimed warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_data(num_classes: int, dim: int, num_samples: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(num_classes * 7919 + dim)
    means = 3.0 * torch.randn(num_classes, dim, generator=gen)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=gen)]
    features = means[labels] + torch.randn(num_samples, dim, generator=gen)
    weight = means - means.mean(0) + 0.5 * torch.randn(num_classes, dim, generator=gen)
    return features.to(device), labels.to(device), weight.to(device)


def two_pass(features: Tensor, labels: Tensor, weight: Tensor, num_classes: int) -> dict[str, float]:
    """Plain float64 Neural Collapse from features in memory (all classes present)."""
    h = features.to(torch.float64)
    w = weight.to(torch.float64)
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    means = torch.zeros(num_classes, h.shape[1], dtype=torch.float64, device=h.device).index_add_(0, labels, h)
    means = means / counts[:, None]
    centred = h - means[labels]  # second pass
    sigma_w = centred.T @ centred / h.shape[0]
    m = means - means.mean(0)
    sigma_b = m.T @ m / num_classes
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, hermitian=True)) / num_classes
    var = torch.zeros(num_classes, dtype=torch.float64, device=h.device).index_add_(0, labels, centred.square().sum(1))
    var = var / counts
    off = ~torch.eye(num_classes, dtype=torch.bool, device=h.device)
    dist2 = torch.cdist(means, means).square()[off]
    cdnv = ((var[:, None] + var[None, :])[off] / (2 * dist2)).mean()
    out = {"nc1": float(nc1), "nc1_cdnv": float(cdnv)}
    for name, v in (("means", m), ("weights", w)):
        norms = v.norm(dim=1)
        unit = v / norms[:, None]
        cos = (unit @ unit.T)[off]
        gram = v @ v.T
        eye = torch.eye(num_classes, dtype=torch.float64, device=h.device)
        target = (eye - 1.0 / num_classes) / (num_classes - 1) ** 0.5
        out[f"nc2_equinorm_{name}"] = float(norms.std(correction=0) / norms.mean())
        out[f"nc2_equiangular_{name}"] = float(cos.std(correction=0))
        out[f"nc2_maxangle_{name}"] = float((cos + 1.0 / (num_classes - 1)).abs().mean())
        out[f"nc2_etf_distance_{name}"] = float((gram / gram.norm() - target).norm())
    out["nc3_self_duality"] = float((w / w.norm() - m / m.norm()).square().sum())
    out["nc3_cosine"] = float(((w * m).sum(1) / (w.norm(dim=1) * m.norm(dim=1))).mean())
    return out


def bench_config(num_classes: int, dim: int, num_samples: int, repeats: int, device: torch.device) -> dict[str, float]:
    features, labels, weight = make_data(num_classes, dim, num_samples, device)
    metric = NeuralCollapse(num_classes, dim).to(device)
    update_times = []
    for start in range(0, num_samples, BATCH):
        batch_f, batch_l = features[start : start + BATCH], labels[start : start + BATCH]
        sync(device)
        t0 = time.perf_counter()
        metric.update(batch_f, batch_l)
        sync(device)
        if batch_f.shape[0] == BATCH:
            update_times.append(time.perf_counter() - t0)
    update_times = update_times[1:] or update_times  # the first call warms up
    streamed = metric.compute(weight=weight)
    compute_s = timed(lambda: metric.compute(weight=weight), max(repeats, 3), device)
    baseline_times, baseline = [], {}
    for _ in range(repeats):  # no separate warm-up: each call takes seconds and allocates afresh anyway
        sync(device)
        t0 = time.perf_counter()
        baseline = two_pass(features, labels, weight, num_classes)
        sync(device)
        baseline_times.append(time.perf_counter() - t0)
    baseline_s = statistics.median(baseline_times)
    a = torch.randn(dim, dim, dtype=torch.float64, device=device)
    matmul_s = timed(lambda: a @ a, max(repeats, 3), device)
    diff = max(abs(streamed[k] - v) / max(abs(v), 1e-12) for k, v in baseline.items())
    return {
        "compute": compute_s,
        "two_pass": baseline_s,
        "update": statistics.median(update_times),
        "matmul": matmul_s,
        "max_rel_diff": diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3, quick 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a busy machine)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
        f"load average {load:.1f}, repeats {repeats}{' (quick)' if args.quick else ''}\n"
    )
    print(
        "| C | D | N | compute(weight=W) ms | two-pass float64 ms | compute / two-pass "
        "| update per 1k samples ms | D x D float64 matmul ms | update / matmul | max rel. diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    total = time.perf_counter()
    for num_classes, dim, num_samples in CONFIGS:
        if args.quick:
            num_samples = max(2 * num_classes, 2000)
        r = bench_config(num_classes, dim, num_samples, repeats, device)
        print(
            f"| {num_classes} | {dim} | {num_samples} | {1e3 * r['compute']:.1f} | {1e3 * r['two_pass']:.0f} "
            f"| {r['compute'] / r['two_pass']:.4f} | {1e3 * r['update']:.1f} | {1e3 * r['matmul']:.1f} "
            f"| {r['update'] / r['matmul']:.2f} | {r['max_rel_diff']:.1e} |",
            flush=True,
        )
    print(f"\ntotal {time.perf_counter() - total:.0f} s")


if __name__ == "__main__":
    main()

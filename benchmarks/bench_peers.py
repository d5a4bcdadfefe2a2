"""The whole Neural Collapse job, ours against the fastest public implementation and the hardware's floor.

The job: class means, ``Sigma_W`` and NC1, CDNV, NC2, NC3 and NC4 of ``N`` nearly collapsed float32 features in
batches of 1,000 (two passes over the data where the means are needed first). Contestants, each in its own
process with one thread, rounds interleaved (A B C ... A B C ...), median per contestant:

- ``ours``: :class:`~lightning_neural_collapse.NeuralCollapse` (``accumulate_dtype=float32``: float32 products,
  float64 sums, per-class shift) over the batches, then :class:`~lightning_neural_collapse.NCCMismatch` over
  them against the class means, then ``compute(weight)``: what ``NeuralCollapseCallback(mode="exact",
  accumulate_dtype="float32")`` does at an epoch's end. The network's logits come with the batches (the model's
  forward makes them anyway);
- ``ours+logits``: the same, computing the logits ``h W^T + b`` itself, as the peer does;
- ``ours-float64``: ``accumulate_dtype=float64`` (the default), same passes;
- ``rhubarbwu``: rhubarbwu/neural-collapse as its own example uses it (``MeanAccumulator``, then
  ``VarNormAccumulator`` and ``CovarAccumulator``, then ``DecAccumulator``; ``covariance_ratio``,
  ``variability_cdnv``, ``simplex_etf_error``, ``mean_norms``, ``kernel_stats``, ``self_duality_error``,
  ``similarities``, ``clf_ncc_agreement``), float32 as it defaults to;
- ``naive``: a straightforward float64 two-pass (means; centred within-class Gram; NC1 through an eigen-solver
  pseudo-inverse of ``Sigma_B``; NC4 with ``torch.cdist``);
- the floors, measured in the same run: ``floor-f32`` and ``floor-f64``, one product ``h^T h`` over all samples.

Also printed: each contestant's NC1 against the float64 reference (``naive``).

The peer is not on the package index: bring a snapshot of its repository next to your checkout and point the
benchmark at it (never commit it here)::

    git clone https://github.com/rhubarbwu/neural-collapse ../peers/neural-collapse   # or any snapshot of it
    LNC_PEER_NEURAL_COLLAPSE=../peers/neural-collapse python benchmarks/bench_peers.py

Without it the peer's rows say so and the rest runs. Not a test: nothing asserts on time.

    python benchmarks/bench_peers.py                       # both cases, 3 rounds: about 10 minutes
    python benchmarks/bench_peers.py --cases small --rounds 5
    python benchmarks/bench_peers.py --device cuda         # every contestant on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CASES = {"small": (100, 256, 20_000), "large": (1000, 2048, 50_000)}
"""(C, D, N) of each case."""
BATCH = 1000
PEER_ENV = "LNC_PEER_NEURAL_COLLAPSE"
CONTESTANTS = ("floor-f32", "floor-f64", "ours", "ours+logits", "ours-float64", "rhubarbwu", "naive")


# ------------------------------------------------------------------------------------------------- data


def make_data(num_classes: int, dim: int, num_samples: int, device: torch.device) -> dict[str, Tensor]:
    """Nearly collapsed float32 features (tight classes around large means), a classifier close to the means."""
    g = torch.Generator().manual_seed(num_classes * 31 + dim)
    means = 4.0 * torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=g)]
    features = means[labels] + 0.05 * torch.randn(num_samples, dim, generator=g)
    weight = means - means.mean(dim=0) + 0.1 * torch.randn(num_classes, dim, generator=g)
    bias = 0.01 * torch.randn(num_classes, generator=g)
    out = {"features": features, "labels": labels, "weight": weight, "bias": bias}
    return {key: value.to(device) for key, value in out.items()}


def batches(data: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    h, y = data["features"], data["labels"]
    return [(h[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]


# ------------------------------------------------------------------------------------------- contestants


def run_floor(data: dict[str, Tensor], dtype: torch.dtype) -> dict[str, float]:
    h = data["features"].to(dtype)
    _ = h.T @ h
    return {}


def run_ours(data: dict[str, Tensor], dtype: torch.dtype, logits_here: bool) -> dict[str, float]:
    from lightning_neural_collapse import NCCMismatch, NeuralCollapse

    num_classes, dim = data["weight"].shape
    weight, bias = data["weight"], data["bias"]
    parts = batches(data)
    logits = [h @ weight.T + bias for h, _ in parts] if not logits_here else None
    metric = NeuralCollapse(num_classes, dim, accumulate_dtype=dtype).to(data["features"].device)
    start = time.perf_counter()
    for h, y in parts:
        metric.update(h, y)
    stats = metric.statistics()
    ncc = NCCMismatch(stats.means, stats.present).to(data["features"].device)
    for index, (h, _) in enumerate(parts):
        z = h @ weight.T + bias if logits is None else logits[index]
        ncc.update(h, z)
    values = metric.compute(weight=weight)
    values["nc4_ncc_mismatch"] = ncc.compute()
    values["_seconds"] = time.perf_counter() - start
    return values


def run_peer(data: dict[str, Tensor]) -> dict[str, float]:
    from neural_collapse.accumulate import CovarAccumulator, DecAccumulator, MeanAccumulator, VarNormAccumulator
    from neural_collapse.kernels import kernel_stats, log_kernel
    from neural_collapse.measure import (
        clf_ncc_agreement,
        covariance_ratio,
        mean_norms,
        self_duality_error,
        similarities,
        simplex_etf_error,
        variability_cdnv,
    )

    num_classes, dim = data["weight"].shape
    device = data["features"].device
    weights = data["weight"]
    parts = batches(data)
    start = time.perf_counter()
    mean_accum = MeanAccumulator(num_classes, dim, device)
    for h, y in parts:
        mean_accum.accumulate(h, y)
    means, m_g = mean_accum.compute()
    var_accum = VarNormAccumulator(num_classes, dim, device, M=means)
    covar_accum = CovarAccumulator(num_classes, dim, device, M=means)
    for h, y in parts:
        var_accum.accumulate(h, y, means)
        covar_accum.accumulate(h, y, means)
    var_norms, _ = var_accum.compute()
    covar_within = covar_accum.compute()
    dec_accum = DecAccumulator(num_classes, dim, device, M=means, W=weights)
    for h, y in parts:
        dec_accum.accumulate(h, y, weights, means)
    tile = min(64, num_classes)
    norms = mean_norms(means, m_g)
    values = {
        "nc1": covariance_ratio(covar_within, means, m_g) * 1.0,
        "nc1_cdnv": variability_cdnv(var_norms, means, tile_size=tile),
        "nc2_equinorm_means": float(norms.std() / norms.mean()),
        "nc2_etf_distance_means": simplex_etf_error(means, m_g),
        "nc2_log_energy": kernel_stats(means, m_g, kernel=log_kernel, tile_size=tile)[0],
        "nc3_self_duality": self_duality_error(weights, means, m_g),
        "nc3_cosine_var": float(similarities(weights, means, m_g).var()),
        "nc4_agreement": clf_ncc_agreement(dec_accum),
    }
    values["_seconds"] = time.perf_counter() - start
    return values


def run_naive(data: dict[str, Tensor]) -> dict[str, float]:
    """Float64, everything held in memory: the textbook formulas."""
    h, y = data["features"].double(), data["labels"]
    weight, bias = data["weight"].double(), data["bias"].double()
    num_classes = weight.shape[0]
    start = time.perf_counter()
    counts = torch.bincount(y, minlength=num_classes).double()
    means = torch.zeros_like(weight).index_add_(0, y, h) / counts[:, None]
    centre = means.mean(dim=0)
    centred_means = means - centre
    within = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
    for part, labels in batches({"features": h, "labels": y}):
        diff = part - means[labels]
        within += diff.T @ diff
    within /= len(y)
    between = centred_means.T @ centred_means / num_classes
    eigenvalues, vectors = torch.linalg.eigh(between)
    keep = eigenvalues > eigenvalues.max() * 1e-10
    inverse = (vectors[:, keep] / eigenvalues[keep]) @ vectors[:, keep].T
    nc1 = float(torch.trace(within @ inverse)) / num_classes
    nearest = torch.cat([torch.cdist(part, means).argmin(dim=1) for part, _ in batches({"features": h, "labels": y})])
    network = (h @ weight.T + bias).argmax(dim=1)
    return {
        "nc1": nc1,
        "nc4_ncc_mismatch": float((nearest != network).double().mean()),
        "_seconds": time.perf_counter() - start,
    }


def contestant(name: str, case: str, device: str) -> dict[str, Any]:
    """Run one contestant once in this process; returns its seconds and values."""
    torch.set_num_threads(1)
    dev = torch.device(device)
    data = make_data(*CASES[case], dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if name.startswith("floor"):
        dtype = torch.float32 if name == "floor-f32" else torch.float64
        run_floor(data, dtype)  # warm-up
        sync()
        start = time.perf_counter()
        run_floor(data, dtype)
        sync()
        return {"seconds": time.perf_counter() - start, "values": {}}
    if name == "rhubarbwu":
        peer = os.environ.get(PEER_ENV)
        if not peer or not (Path(peer) / "neural_collapse").is_dir():
            return {"missing": f"set {PEER_ENV} to a snapshot of rhubarbwu/neural-collapse"}
        sys.path.insert(0, str(Path(peer).resolve()))
        run = run_peer
    elif name == "naive":
        run = run_naive
    else:
        dtype = torch.float64 if name == "ours-float64" else torch.float32
        logits_here = name == "ours+logits"

        def run(d: dict[str, Tensor]) -> dict[str, float]:
            return run_ours(d, dtype, logits_here)

    small = make_data(CASES[case][0], CASES[case][1], 2 * BATCH, dev)
    run(small)  # warm-up: first calls, allocator
    sync()
    values = run(data)
    sync()
    seconds = values.pop("_seconds")
    return {"seconds": seconds, "values": values}


# ---------------------------------------------------------------------------------------------- driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="small,large", help=f"comma-separated, of {sorted(CASES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(CONTESTANTS), help="comma-separated contestants")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(contestant(args.child[0], args.child[1], args.device)))
        return
    names = [n for n in args.only.split(",") if n]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    peer = env.get(PEER_ENV)
    print(f"peer: {peer if peer else f'absent (set {PEER_ENV})'}; device {args.device}; 1 thread each")
    for case in args.cases.split(","):
        num_classes, dim, num_samples = CASES[case]
        times: dict[str, list[float]] = {n: [] for n in names}
        values: dict[str, dict[str, float]] = {}
        missing: dict[str, str] = {}
        for _ in range(args.rounds):
            for name in names:
                if name in missing:
                    continue
                cmd = [sys.executable, __file__, "--device", args.device, "--child", name, case]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    missing[name] = f"failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '?'}"
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                if "missing" in result:
                    missing[name] = result["missing"]
                    continue
                times[name].append(result["seconds"])
                values[name] = result["values"]
        print(f"\nC = {num_classes}, D = {dim}, N = {num_samples:,} (batches of {BATCH}), {args.rounds} rounds")
        base = statistics.median(times["ours"]) if times.get("ours") else None
        reference = values.get("naive", {}).get("nc1")
        print("| contestant | median s | / ours | NC1 | NC1 vs float64 |")
        print("|---|---:|---:|---:|---:|")
        for name in names:
            if name in missing:
                print(f"| {name} | {missing[name]} | | | |")
                continue
            median = statistics.median(times[name])
            nc1 = values.get(name, {}).get("nc1")
            error = f"{abs(nc1 - reference) / abs(reference):.1e}" if nc1 is not None and reference else ""
            ratio = f"{median / base:.2f}x" if base else ""
            print(f"| {name} | {median:.3f} | {ratio} | {nc1 if nc1 is not None else ''} | {error} |")


if __name__ == "__main__":
    main()

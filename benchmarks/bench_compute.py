"""``NeuralCollapse.compute`` at many classes: time and peak memory above the states (issue 15's C = 10,000).

For each (C, D): a metric fed 4 samples per class of nearly collapsed features (``accumulate_dtype=float32``),
then one ``compute(weight=W)`` timed (median of ``--repeats``) with the peak resident memory above the level
before it (``/proc/self/status`` VmHWM; the CUDA allocator's peak with ``--device cuda``), beside the states'
own bytes. NC1 goes through the R of a QR of the class means and every pair metric through tiles of their
Gram (``functional/nc1.py``, ``functional/pairs.py``): nothing C x C is built, no C x C eigendecomposition.
Not a test: nothing asserts on time.

    python benchmarks/bench_compute.py                  # C = 1000, 5000, 10000 at D = 1024, 1 thread
    python benchmarks/bench_compute.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_vocab import PeakMemory  # noqa: E402

from lightning_neural_collapse import NeuralCollapse  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", default="1000,5000,10000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"D = {args.dim}, {args.threads} thread(s), {device}")
    print("| C | compute (median) | peak above before | states |")
    print("|---:|---:|---:|---:|")
    for num_classes in (int(c) for c in args.classes.split(",")):
        g = torch.Generator().manual_seed(num_classes)
        means = 3.0 * torch.randn(num_classes, args.dim, generator=g)
        weight = (means + 0.1 * torch.randn(num_classes, args.dim, generator=g)).to(device)
        metric = NeuralCollapse(num_classes, args.dim, accumulate_dtype=torch.float32).to(device)
        labels = torch.arange(4 * num_classes) % num_classes
        for start in range(0, len(labels), 2000):
            y = labels[start : start + 2000]
            metric.update((means[y] + 0.1 * torch.randn(len(y), args.dim, generator=g)).to(device), y.to(device))
        states = sum(t.numel() * t.element_size() for t in (metric.count, metric.shifted_sum, metric.shifted_gram))
        times, peaks = [], []
        for _ in range(args.repeats):
            with PeakMemory(device) as peak:
                start = time.perf_counter()
                metric.compute(weight=weight)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            peaks.append(peak.peak)
        print(
            f"| {num_classes:,} | {statistics.median(times):.2f} s | {max(peaks) / 2**30:.2f} GiB | "
            f"{states / 2**30:.2f} GiB |"
        )


if __name__ == "__main__":
    main()

"""Neural Collapse at vocabulary scale: C = 50,257 classes (GPT-2's vocabulary), D = 768, ~150k tokens.

Streams synthetic token features (every class seen at least once, the rest Zipf-distributed like real text)
through ``NeuralCollapse`` and ``NCCMismatch`` and prints, side by side with the floors measured in the same
run (medians of a few repeats):

- ``update`` per 4,096 tokens (float64 and float32 products), against the model's own classifier forward
  for those tokens (a ``4096 x D x C`` float32 matmul, the lm_head);
- ``NC4 update`` per 4,096 tokens (the float32 nearest-class-centre search with exact re-ranking), against
  the same lm_head matmul: it is a product of the same size;
- ``compute`` (every key, with the classifier weight: two tiled pair passes, means and weights), with
  float64 tiles (``NeuralCollapse.compute``) and float32 tiles (the callback's ``dtype=torch.float32``),
  against **one tiled float32 Gram of the class means** (``C x C x D``, the floor of any all-pairs metric);
- peak memory: the states' bytes, and the highest resident memory during ``compute`` above what the
  process held just before (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``; on CUDA
  ``torch.cuda.max_memory_allocated``).

Targets (issue 10): compute within 6x the Gram floor, peak memory at most states + 2.5 GB.
Not a test: nothing asserts on time. Run it on an idle machine.

    python benchmarks/bench_vocab.py                 # about 10 minutes on 2 CPU cores
    python benchmarks/bench_vocab.py --classes 10000 --tokens 40000   # a few minutes
    python benchmarks/bench_vocab.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from lightning_neural_collapse import NCCMismatch, NeuralCollapse
from lightning_neural_collapse.functional.collapse import geometry
from lightning_neural_collapse.functional.pairs import COSINE_EDGES, tile_rows

BATCH = 4096
"""Tokens per update (a GPT-2 batch of 4 x 1,024)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], repeats: int, device: torch.device, warm_up: bool = True) -> float:
    """Median wall time of ``fn`` in seconds over ``repeats`` calls (after one untimed call if ``warm_up``)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PeakMemory:
    """Highest memory in bytes above the level at ``__enter__``: resident set on the CPU, allocator on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.start, self.peak = device, 0, 0

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{field} not in /proc/self/status")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.start = self._status("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.peak = self._status("VmHWM") - self.start


def token_labels(num_classes: int, num_tokens: int, gen: torch.Generator) -> Tensor:
    """Every class once, then Zipf(1.1) draws: rare and frequent tokens, as in text."""
    ranks = torch.arange(1, num_classes + 1, dtype=torch.float64)
    probs = ranks.pow(-1.1)
    rest = torch.multinomial(probs / probs.sum(), max(num_tokens - num_classes, 0), True, generator=gen)
    labels = torch.cat([torch.arange(num_classes), rest])
    return labels[torch.randperm(labels.numel(), generator=gen)]


def tiled_gram_floor(vectors: Tensor) -> None:
    """One Gram of ``vectors`` in the float32 tiles of ``pair_sums`` (a preallocated output, each tile summed once
    in float32 so that the product cannot be skipped): the floor of any metric over all pairs."""
    v = vectors.to(torch.float32)
    columns = v.T
    rows = tile_rows(v.shape[0])
    out = torch.empty(rows, v.shape[0], dtype=torch.float32, device=v.device)
    total = torch.zeros((), dtype=torch.float64, device=v.device)
    for start in range(0, v.shape[0], rows):
        stop = min(start + rows, v.shape[0])
        total += torch.mm(v[start:stop], columns, out=out[: stop - start]).sum()
    float(total)


def time_nc4(metric: NeuralCollapse, features: Tensor, weight: Tensor, device: torch.device) -> float:
    """Median seconds of one ``NCCMismatch.update_decisions`` on ``features`` against the metric's means."""
    stats = metric.statistics()
    ncc = NCCMismatch(stats.means, stats.present).to(device)
    decisions = (features @ weight.T).argmax(dim=1)
    return timed(lambda: ncc.update_decisions(features, decisions), 3, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50_257)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of compute and the floor")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    num_classes, dim = args.classes, args.dim
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, load average {load:.1f}; "
        f"C = {num_classes:,}, D = {dim}, {args.tokens:,} tokens, {BATCH} tokens per update\n",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    centres = (2.0 * torch.randn(num_classes, dim, generator=gen)).to(device)
    weight = (centres + torch.randn(num_classes, dim, generator=gen).to(device)).contiguous()
    labels = token_labels(num_classes, args.tokens, gen).to(device)
    noise_gen = torch.Generator(device=device).manual_seed(1)

    def batch(start: int) -> tuple[Tensor, Tensor]:
        y = labels[start : start + BATCH]
        h = centres[y] + torch.randn(y.numel(), dim, generator=noise_gen, device=device)
        return h, y

    rows: list[tuple[str, float, str, float]] = []
    lm_head = timed(lambda: batch(0)[0] @ weight.T, 3, device)

    metrics = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):
        metric = NeuralCollapse(num_classes, dim, accumulate_dtype=dtype).to(device)
        times = []
        for start in range(0, args.tokens, BATCH):
            h, y = batch(start)
            sync(device)
            t0 = time.perf_counter()
            metric.update(h, y)
            sync(device)
            if y.numel() == BATCH:
                times.append(time.perf_counter() - t0)
        metrics[name] = metric
        update = statistics.median(times[1:] or times)
        rows.append((f"update per {BATCH} tokens, {name} products", update, "lm_head matmul", lm_head))
        print(f"update ({name}) done: {1e3 * update:.1f} ms", flush=True)
    metric = metrics["float64"]
    del metrics["float32"]
    states = sum(t.numel() * t.element_size() for t in (metric.shifted_sum, metric.shifted_gram, metric.shift))
    states += sum(t.numel() * t.element_size() for t in (metric.count, metric.shifted_sq))

    nc4 = time_nc4(metric, batch(0)[0], weight, device)
    rows.append((f"NC4 update per {BATCH} tokens (float32 search)", nc4, "lm_head matmul", lm_head))
    print("NC4 done", flush=True)
    floor = timed(lambda: tiled_gram_floor(metric.statistics().means), args.repeats, device, warm_up=False)
    print(f"floor done: {floor:.1f} s", flush=True)
    peaks: dict[str, int] = {}
    values: dict[str, dict[str, float]] = {}
    for name, dtype in (("float64", torch.float64), ("float32", torch.float32)):

        def run(name: str = name, dtype: torch.dtype = dtype) -> None:
            values[name] = geometry(metric.statistics(), weight, edges=COSINE_EDGES, dtype=dtype).values

        with PeakMemory(device) as peak:
            seconds = timed(run, args.repeats, device, warm_up=False)
        peaks[name] = peak.peak
        rows.append((f"compute with weight, {name} tiles", seconds, "one float32 tiled Gram of the means", floor))
        print(f"compute ({name}) done: {seconds:.1f} s", flush=True)

    print()
    print("| measured | time | baseline | baseline time | ratio |")
    print("|---|---:|---|---:|---:|")
    for label, seconds, base, base_seconds in rows:
        print(f"| {label} | {fmt(seconds)} | {base} | {fmt(base_seconds)} | {seconds / base_seconds:.2f} |")
    gib = 1024**3
    print(f"\nstates: {states / gib:.3f} GiB; classes present: {int((metric.count > 0).sum()):,}")
    for name, extra in peaks.items():
        print(f"peak memory during compute ({name} tiles): states + {extra / gib:.2f} GiB")
    exact, fast = values["float64"], values["float32"]
    worst = max(abs(fast[k] - v) / max(abs(v), 1e-12) for k, v in exact.items())
    print(", ".join(f"{key} {exact[key]:.4g}" for key in ("nc1", "nc1_cdnv", "nc2_log_energy_means", "nc3_cosine_cov")))
    print(f"float32 tiles against float64 tiles: largest relative difference {worst:.1e}")


def fmt(seconds: float) -> str:
    return f"{1e3 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.1f} s"


if __name__ == "__main__":
    main()

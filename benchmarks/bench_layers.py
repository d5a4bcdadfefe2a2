"""Per-layer collapse on a ResNet-18-style CNN: time per training step and peak memory with ``layers=`` listing all
four stages, against the same run with the callback but no layers, and without the callback.

Each configuration runs in its own process (so that its peak resident memory is its own), the configurations
alternate over rounds (load drifts hit all alike), each run's first epoch is dropped (warm-up), and the median
over rounds is reported with its ratio to the baseline. Online mode: no extra forward; every epoch is measured.
Not a test: nothing here asserts on time.

    python benchmarks/bench_layers.py                   # CPU, about 4 minutes on 2 cores
    python benchmarks/bench_layers.py --device cuda --samples 8192 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from typing import Any

STAGES = ["net.4", "net.6", "net.8", "net.10"]
"""The last block of each of the four stages of ``resnet18_like`` (64x32x32, 128x16x16, 256x8x8, 512x4x4)."""

CONFIGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "callback": {},
    "callback + 4 stages (flatten)": {"layers": STAGES},
    "callback + 4 stages (avgpool)": {"layers": STAGES, "layer_reduce": "avgpool"},
}


def _resident_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one(config: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one configuration in this process: mean seconds per step (first epoch dropped), peak memory growth."""
    import lightning as L
    import torch
    from bench_callback import Classifier, EpochTimer, resnet18_like, timed_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_neural_collapse import NeuralCollapseCallback

    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(args.samples, 3, 32, 32, generator=g), torch.randint(0, 10, (args.samples,), generator=g)
    )
    L.seed_everything(0, verbose=False)
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    timer = EpochTimer(device)
    options = CONFIGS[config]
    callbacks: list[Any] = [] if options is None else [NeuralCollapseCallback(log_figure=False, **options)]
    trainer = timed_trainer(args.device, args.epochs, [*callbacks, timer])
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = _resident_kib()
    trainer.fit(Classifier(resnet18_like()), loader)
    steps = len(loader)
    result = {
        "step_s": statistics.fmean(timer.times[1:]) / steps,
        "peak_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
    }
    if device.type == "cuda":
        result["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is dropped")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds over the configurations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    forwarded = [
        f"--device={args.device}",
        f"--samples={args.samples}",
        f"--batch-size={args.batch_size}",
        f"--epochs={args.epochs}",
    ] + ([f"--threads={args.threads}"] if args.threads else [])
    results: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    for _ in range(args.repeats):
        for config in CONFIGS:
            done = subprocess.run(
                [sys.executable, __file__, *forwarded, "--one", config],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            )
            results[config].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["step_s"] for r in results["none"])
    print(
        f"\nResNet-18-style on {args.device}, {args.samples} samples of 3x32x32, batch {args.batch_size}, online mode, "
        f"{args.repeats} alternating rounds of {args.epochs} epochs (first dropped)"
    )
    memory = "peak CUDA memory (MiB)" if args.device == "cuda" else "peak RSS growth (MiB)"
    print(f"| configuration | s / step | ratio to none | {memory} |")
    print("|---|---|---|---|")
    for config, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        key = "cuda_peak_mib" if args.device == "cuda" else "peak_growth_mib"
        peak = statistics.median(r[key] for r in runs)
        print(f"| {config} | {step:.3f} | {step / base:.3f} | {peak:.0f} |")


if __name__ == "__main__":
    main()

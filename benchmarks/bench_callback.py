"""Epoch time of a small CNN with NeuralCollapseCallback (online, exact) against the same run without it.

Runs the configurations alternately (none, online, exact, none, ...) so that machine load drifts hit all
of them alike, drops each run's first epoch (warm-up), averages the other epochs of the run, and prints
the median over runs of that epoch time for each configuration and its ratio to the baseline.
Not a test: nothing here asserts on time.

    python benchmarks/bench_callback.py             # CPU, about 2 minutes on 2 cores
    python benchmarks/bench_callback.py --model resnet18 --device cuda \
        --samples 20000 --batch-size 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neural_collapse import NeuralCollapseCallback


class EpochTimer(Callback):
    """Wall time of each training epoch, measured after every other callback's epoch-end work."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._start = device, [], 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._start)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def small_cnn(num_classes: int = 10) -> nn.Module:
    """Three conv blocks on 32x32 inputs, penultimate width 256, linear classifier."""

    def block(c_in: int, c_out: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(3, 32),
        block(32, 64),
        block(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 256),
        nn.ReLU(),
        nn.Linear(256, num_classes),
    )


def resnet18_like(num_classes: int = 10) -> nn.Module:
    """A ResNet-18-sized network (11M parameters) without torchvision: 4 stages of 2 basic blocks."""

    class Basic(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
            )
            self.skip = (
                nn.Identity()
                if stride == 1 and c_in == c_out
                else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(c_in, c_out, stride), Basic(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)


def timed_trainer(device: str, epochs: int, callbacks: list[Callback], precision: str = "32-true") -> L.Trainer:
    """A one-device Trainer without logger, progress bar, summary or checkpoints (nothing but the work timed)."""
    return L.Trainer(
        accelerator=device,
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        precision=precision,  # type: ignore[arg-type]
    )


def run(config: str, args: argparse.Namespace, data: TensorDataset) -> float:
    """Mean epoch time of one fit, first epoch excluded."""
    L.seed_everything(0, verbose=False)
    net = resnet18_like() if args.model == "resnet18" else small_cnn()
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    timer = EpochTimer(device)
    callbacks: list[Callback] = []
    if config != "none":
        mode, _, every = config.partition("/")
        callbacks.append(NeuralCollapseCallback(mode=mode, every_n_epochs=int(every or 1), log_figure=False))
    trainer = timed_trainer(args.device, args.epochs, [*callbacks, timer], precision=args.precision)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True)
    trainer.fit(Classifier(net), loader)
    return statistics.fmean(timer.times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cnn", "resnet18"], default="cnn")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=6, help="epochs per run; the first is dropped")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds over the configurations")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (1 is steadier on a shared or busy CPU)"
    )
    parser.add_argument(
        "--configs",
        default="none,online,exact,exact/5",
        help="comma-separated: none, online, exact, or MODE/N for every_n_epochs=N",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(args.samples, 3, 32, 32, generator=g), torch.randint(0, 10, (args.samples,), generator=g)
    )
    configs = args.configs.split(",")
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(args.repeats):
        for config in configs:
            times[config].append(run(config, args, data))
    base = statistics.median(times[configs[0]])
    print(
        f"\n{args.model} on {args.device}, {args.samples} samples of 3x32x32, batch {args.batch_size}, "
        f"{args.repeats} alternating rounds of {args.epochs} epochs (first dropped), torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"| configuration | median epoch time (s) | ratio to {configs[0]} |")
    print("|---|---|---|")
    for config in configs:
        median = statistics.median(times[config])
        print(f"| {config} | {median:.3f} | {median / base:.3f} |")


if __name__ == "__main__":
    main()

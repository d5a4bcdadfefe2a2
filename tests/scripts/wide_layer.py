"""A fit with a listed layer of D = 32,768 values per sample, exact mode; writes the peak memory growth as JSON.

Run by tests/callback/test_layers.py in its own process, so that the peak resident size is this fit's alone.
Usage: python wide_layer.py OUT.json
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neural_collapse import NeuralCollapseCallback

DIM = 32_768


class Wide(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Sequential(nn.Linear(16, DIM), nn.ReLU())
        self.narrow = nn.Sequential(nn.Linear(DIM, 32), nn.ReLU())
        self.fc = nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.narrow(self.wide(x)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def resident_kib() -> int:
    """The resident set size now, in KiB (``/proc/self/status``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(out: str) -> None:
    torch.manual_seed(0)
    y = torch.arange(256) % 4
    x = torch.randn(256, 16) + 2.0 * nn.functional.one_hot(y, 16).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Wide()
    nc = NeuralCollapseCallback(mode="exact", layers=["wide"], log_figure=False, log_histograms=False)
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[nc],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    before = resident_kib()
    trainer.fit(model, loader)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    record = nc.history[-1]
    result = {
        "dim": DIM,
        "peak_growth_bytes": (peak - before) * 1024,
        "nc1": record["layers/wide/nc1"],
        "nc1_trace_ratio": record["layers/wide/nc1_trace_ratio"],
    }
    with open(out, "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main(sys.argv[1])

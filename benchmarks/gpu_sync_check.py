"""No host-device synchronisation in the callback's per-step hooks, checked on one CUDA GPU.

``tests/callback/test_hot_path.py`` proves it on the CPU by tracing every op; this runs the same fits on CUDA
with ``torch.cuda.set_sync_debug_mode("error")`` around the per-step hooks (``on_train_batch_start``,
``on_before_backward``, ``on_train_batch_end``) from the second step on, so any synchronising call raises. The
once-per-epoch measurement inside the last batch's hook is left out. Prints one JSON line per configuration and
exits with status 1 when one failed.

    python benchmarks/gpu_sync_check.py            # needs a CUDA device
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_neural_collapse import NeuralCollapseCallback


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(32, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.fc = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class Checked(NeuralCollapseCallback):
    """The callback with ``set_sync_debug_mode("error")`` around its per-step hooks from the second step on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps = 0
        self.inside_finish = False

    @contextmanager
    def _strict(self) -> Iterator[None]:
        if self.steps > 1 and not self.inside_finish:
            torch.cuda.set_sync_debug_mode("error")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            yield

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.steps += 1
        with self._strict():
            super().on_train_batch_start(trainer, pl_module, batch, idx)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        with self._strict():
            super().on_before_backward(trainer, pl_module, loss)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        with self._strict():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self.inside_finish = True
        try:
            super()._finish(trainer, pl_module)
        finally:
            self.inside_finish = False


def check(options: dict[str, Any]) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    x = torch.randn(4096, 32)
    y = torch.randint(0, 10, (4096,))
    x += 3 * torch.nn.functional.one_hot(y, 32).float()
    nc = Checked(**options)
    trainer = L.Trainer(
        accelerator="cuda",
        devices=1,
        max_epochs=3,
        callbacks=[nc],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    try:
        trainer.fit(Net(), DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True))
    except RuntimeError as err:  # what set_sync_debug_mode("error") raises
        return {"options": options, "ok": False, "error": str(err)[:500]}
    return {"options": options, "ok": len(nc.history) == 3 and nc.steps == 48, "epochs": len(nc.history)}


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "error": "no CUDA device"}))
        return 2
    results = [
        check(options)
        for options in (
            {"mode": "online"},
            {"mode": "online", "accumulate_dtype": "float32"},
            {"mode": "exact"},
        )
    ]
    for result in results:
        print(json.dumps(result))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

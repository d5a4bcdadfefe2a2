"""No host-device synchronisation in any per-step hook, proven on the CPU by tracing every op they run.

A ``TorchDispatchMode`` sees each ATen op of the callback's per-step hooks (``on_train_batch_start``,
``on_before_backward``, ``on_train_batch_end``) from the second training step on (the first step validates the
labels once, on purpose). Ops that synchronise on an accelerator fail the test: reading a value on the host
(``_local_scalar_dense``: ``.item()``, ``float()``, ``bool()``, Python branches on tensor values), ops whose
output shape depends on the data (``nonzero``, ``masked_select``, ``unique``, ``bincount``, boolean-mask
indexing), and the Python-level reads that do not dispatch (``tolist``, ``numpy``, ``cpu``). The measurement that
finishes an epoch (inside the last batch's ``on_train_batch_end``) is excluded: it runs once per epoch.
``benchmarks/gpu_ddp_check.sh`` repeats the check on CUDA with ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset, TensorDataset
from toy import ToyClassifier, blobs

from lightning_neural_collapse import NeuralCollapseCallback

SYNCING_OPS = {
    "aten._local_scalar_dense",
    "aten.is_nonzero",
    "aten.item",
    "aten.equal",
    "aten.allclose",
    "aten.nonzero",
    "aten.nonzero_static",
    "aten.argwhere",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.unique_dim",
    "aten.unique_consecutive",
    "aten.bincount",
    "aten.repeat_interleave",
}
INDEXING_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
HOST_READS = ("tolist", "numpy", "cpu", "item")


class SyncTracer(TorchDispatchMode):
    """Records every op, and the ones that would synchronise with the host on an accelerator."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []
        self.enabled = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)  # "aten.index_add_" for aten.index_add_.default
        self.ops.append(name)
        if name in SYNCING_OPS:
            self.syncs.append(name)
        elif name in INDEXING_OPS and _bool_index(args):
            self.syncs.append(f"{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


def _bool_index(args: Any) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, Tensor) and i.dtype == torch.bool for i in (indices or ()))


@contextmanager
def traced(tracer: SyncTracer) -> Iterator[None]:
    originals = {name: getattr(Tensor, name) for name in HOST_READS}

    def recording(name: str) -> Any:
        def read(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if tracer.enabled:
                tracer.syncs.append(f"Tensor.{name}")
            return originals[name](self, *args, **kwargs)

        return read

    for name in HOST_READS:
        setattr(Tensor, name, recording(name))
    try:
        with tracer:
            yield
    finally:
        for name, original in originals.items():
            setattr(Tensor, name, original)


class Traced(NeuralCollapseCallback):
    """The callback with its per-step hooks traced from the second training step on."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tracer = SyncTracer()
        self.batches = 0

    @contextmanager
    def _maybe(self) -> Iterator[None]:
        if self.batches > 1:
            with traced(self.tracer):
                yield
        else:
            yield

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.batches += 1
        with self._maybe():
            super().on_train_batch_start(trainer, pl_module, batch, idx)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        with self._maybe():
            super().on_before_backward(trainer, pl_module, loss)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        with self._maybe():
            super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # once per epoch: not per step
        enabled, self.tracer.enabled = self.tracer.enabled, False
        try:
            with torch.utils._python_dispatch._disable_current_modes():
                super()._finish(trainer, pl_module)
        finally:
            self.tracer.enabled = enabled


class SoftTargets(Dataset):
    """Dict batches with one-hot targets and some ignored samples."""

    def __init__(self) -> None:
        self.x, self.y = blobs(96)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"x": self.x[index], "target": torch.nn.functional.one_hot(self.y[index], 4).float()}


class SoftClassifier(ToyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return torch.nn.functional.cross_entropy(self(batch["x"]), batch["target"])


@pytest.mark.parametrize(
    "options",
    [
        {"mode": "online"},
        {"mode": "online", "accumulate_dtype": "float32", "ignore_index": -100},
        {"mode": "exact"},
        {"mode": "online", "soft": True},
        {"mode": "online", "layers": ["body.0", "body.4"]},
    ],
    ids=["online", "online float32", "exact", "soft dict targets", "online layers"],
)
def test_no_per_step_hook_synchronises_with_the_host(options: dict[str, Any], one_thread: None) -> None:
    soft = options.pop("soft", False)
    nc = Traced(**options)
    L.seed_everything(0, verbose=False)
    if soft:
        model: ToyClassifier = SoftClassifier()
        loader = DataLoader(SoftTargets(), batch_size=16, shuffle=True)
    else:
        model = ToyClassifier()
        features, labels = blobs(96)
        loader = DataLoader(TensorDataset(features, labels), batch_size=16, shuffle=True)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[nc],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(model, loader)
    assert nc.batches == 18 and len(nc.history) == 3
    if options["mode"] == "online":
        assert "nc4_ncc_mismatch_prev_means" in nc.history[-1]  # the NC4 update ran in the traced steps
        assert "aten.addmm_" in nc.tracer.ops or "aten.mm" in nc.tracer.ops  # the second moment, traced
        assert "aten.index_add_" in nc.tracer.ops  # the per-class sums, traced
    if "layers" in options:
        assert "layers/body.4/nc1_prev_means" in nc.history[-1]  # the layers' projections ran in the traced steps
    assert "aten.argmax" in nc.tracer.ops  # the training error, traced
    assert nc.tracer.syncs == []


def test_the_tracer_catches_what_it_looks_for() -> None:
    tracer = SyncTracer()
    x = torch.randn(5)
    with traced(tracer):
        _ = x[x > 0]
        _ = float(x.sum())
        _ = x.tolist()
        _ = torch.where(x > 0, x, 0.0)  # fine: no sync
        _ = x[torch.tensor([0, 2])]  # fine: integer indices
    assert tracer.syncs == ["aten.index with a boolean mask", "aten._local_scalar_dense", "Tensor.tolist"]

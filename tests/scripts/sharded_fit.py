"""A fit under Lightning's ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` on every block and the classifier), on
the CPU with 2 gloo processes, lr=0; rank 0 writes what the callbacks measured and a one-process reference.

Run by tests/callback/test_sharded.py (CPU, ``--strategy fsdp2``) and by benchmarks/gpu_sharded_check.sh (CUDA:
``fsdp2``, Lightning's ``FSDPStrategy`` as ``fsdp``, ``DeepSpeedStrategy(stage=3)`` as ``deepspeed``).
Usage: python sharded_fit.py OUTDIR [--samples N] [--layers] [--strategy S] [--accelerator A] [--check]

Both instances measure the same frozen model: ``nc`` in exact mode (the eval pass runs sharded forwards, which are
collectives: with an odd number of samples the ranks' shards differ by one batch, so the padding is exercised),
``nco`` online (its samples are those the distributed sampler fed, the padded duplicate included).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.functional import neural_collapse_metrics
from lightning_neural_collapse.pipeline.capture import classifier_parameters

CLASSES, DIM, WIDTH = 4, 12, 16


class Indexed(Dataset):
    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


class Sharded(L.LightningModule):
    def __init__(self, x: Tensor, y: Tensor, fully_shard_blocks: bool = True) -> None:
        super().__init__()
        self.x, self.y, self.fully_shard_blocks = x, y, fully_shard_blocks
        self.body = nn.Sequential(nn.Linear(DIM, 32), nn.Tanh(), nn.Linear(32, WIDTH), nn.Tanh())
        self.fc = nn.Linear(WIDTH, CLASSES)
        self.fed: list[int] = []

    def configure_model(self) -> None:
        if not self.fully_shard_blocks:  # FSDPStrategy and DeepSpeed shard the model themselves
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.body[0], self.body[2], self.fc):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, index = batch
        if self.current_epoch == self.trainer.max_epochs - 1:
            self.fed += index.tolist()
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def data(samples: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = 2.0 * torch.randn(CLASSES, DIM, generator=g)
    y = torch.arange(samples) % CLASSES
    return centres[y] + torch.randn(samples, DIM, generator=g), y


def strategy(name: str) -> Any:
    """The Lightning strategy of ``--strategy``."""
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy={nn.Linear})
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(stage=3)


def check(out: dict[str, Any], rtol: float = 1e-6) -> list[str]:
    """What differs from the one-process reference: the ranks' histories, every exact key, every online key."""
    failures = [] if out["histories"][0] == out["histories"][1] else ["the ranks' histories differ"]
    pairs = [
        ("nc", out["reference"], {}),
        ("nco", out["online_reference"], {"nc4_ncc_mismatch": "nc4_ncc_mismatch_prev_means"}),
    ]
    for prefix, reference, renamed in pairs:
        record = out["histories"][0][prefix][-1]
        for key, value in reference.items():
            got = record.get(renamed.get(key, key))
            if got is None or abs(got - value) > rtol * max(abs(value), 1e-9):
                failures.append(f"{prefix}/{key}: {got} != {value}")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--samples", type=int, default=241)
    parser.add_argument("--layers", action="store_true")
    parser.add_argument("--strategy", choices=("fsdp2", "fsdp", "deepspeed"), default="fsdp2")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--check", action="store_true", help="compare with the reference; exit 1 on a mismatch")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    x, y = data(args.samples)
    model = Sharded(x, y, fully_shard_blocks=args.strategy == "fsdp2")
    layers = ["body.1", "body.3"] if args.layers else None
    exact = NeuralCollapseCallback(mode="exact", prefix="nc", log_figure=False, layers=layers)
    online = NeuralCollapseCallback(prefix="nco", log_figure=False, layers=layers)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=2,
        strategy=strategy(args.strategy),
        max_epochs=2,
        callbacks=[exact, online],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(Indexed(x, y), batch_size=30))
    fed: list[Any] = [None, None]
    dist.all_gather_object(fed, model.fed)
    weight, bias = classifier_parameters(model.fc, CLASSES, WIDTH, model)  # a collective: both ranks
    assert weight is not None and bias is not None
    weight, bias = weight.cpu(), bias.cpu()
    x = x.to(model.device)
    histories = [None, None]
    dist.all_gather_object(histories, {"nc": exact.history, "nco": online.history})
    if trainer.global_rank == 0:
        with torch.no_grad():
            h = model.body(x).cpu()  # a forward of the sharded body: its all-gathers run on rank 1 as well (below)
        x, y = x.cpu(), y.cpu()
        out = {
            "histories": histories,
            "weight_shape": list(weight.shape),
            "reference": neural_collapse_metrics(h.double(), y, weight.double(), bias.double(), num_classes=CLASSES),
        }
        indices = [i for rank in fed for i in rank]
        out["online_reference"] = neural_collapse_metrics(
            h[indices].double(), y[indices], weight.double(), bias.double(), num_classes=CLASSES
        )
        stats = exact.last_statistics
        out["exact_samples"] = None if stats is None else float(stats.counts.sum())
        out["online_samples"] = len(indices)
        if args.layers:
            sys.path.insert(0, str(Path(__file__).parents[1]))
            from reference import layer_reference

            with torch.no_grad():
                h1 = model.body[1](model.body[0](x.to(model.device))).cpu()
            for name, rows in (("body.1", h1), ("body.3", h)):
                for key, value in layer_reference(rows.double().numpy(), y.numpy(), CLASSES).items():
                    out["reference"][f"layers/{name}/{key}"] = value
        args.outdir.mkdir(parents=True, exist_ok=True)
        (args.outdir / "result.json").write_text(json.dumps(out, indent=1))
        if args.check:
            failures = check(out)
            print(json.dumps({"strategy": args.strategy, "ok": not failures, "failures": failures}))
            return 1 if failures else 0
    else:
        with torch.no_grad():
            model.body(x)
            if args.layers:
                model.body[1](model.body[0](x))
    return 0


if __name__ == "__main__":
    sys.exit(main())

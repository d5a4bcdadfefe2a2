"""One multi-process Lightning fit with ``NeuralCollapseCallback``; every rank writes what it measured.

Run in its own process (never inside pytest: a DDP launch re-executes the command line)::

    python tests/scripts/ddp_fit.py OUTDIR --mode exact                    # 2 CPU ranks, gloo
    python tests/scripts/ddp_fit.py OUTDIR --mode online --lr 0             # padding DistributedSampler
    python tests/scripts/ddp_fit.py OUTDIR --mode both --missing-class-on-rank1 --uneven
    python tests/scripts/ddp_fit.py OUTDIR --mode exact --checkpoint-dir CKPTS
    python tests/scripts/ddp_fit.py OUTDIR2 --mode exact --resume CKPTS/epoch=1.ckpt --epochs 4
    python tests/scripts/ddp_fit.py OUTDIR --mode both --val 200              # a validation loop, measured
    python tests/scripts/ddp_fit.py OUTDIR --accelerator cuda --devices 4   # NCCL on 4 GPUs

Data: ``--samples`` (odd by default: 301) generated Gaussian blobs, ``--classes`` classes in ``--dim``
dimensions; model: an MLP body and an ``nn.Linear`` classifier ``fc``. ``--mode both`` attaches two
callbacks, ``prefix="nc"`` in exact mode and ``prefix="nco"`` in online mode. ``--val N`` adds a validation
loop over ``N`` noisier samples around the same centres (Lightning's own non-shuffled DistributedSampler).

Data placement (``W`` ranks):

- default: Lightning's padding ``DistributedSampler`` (``301 = 2 * 151 - 1``: one sample counted twice per
  epoch in online mode);
- ``--missing-class-on-rank1``: ``use_distributed_sampler=False``; the dataset is ordered so that class
  ``C-1`` never sits at an index ``i % W == 1``, and rank ``r`` trains on the indices ``i % W == r``, which is
  also its shard in the exact pass (``UnrepeatedDistributedSampler(shuffle=False)``): rank 1 never sees
  class ``C-1``;
- ``--uneven``: ``use_distributed_sampler=False``; rank 0 also gets the first third of every other rank's
  indices (twice as many samples as rank 1 for W=2) and the smaller shards get smaller batches, so that all
  ranks run the same number of steps (Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every
  training batch: different step counts hang Lightning itself, callback or not). Manual optimisation without
  backward (``lr`` forced to 0; there is no gradient all_reduce). Ranks other than 0 skip the forward pass in
  every other step (fewer measured batches), rank 0 in all steps of epoch 1 (no measured batch at all).
  In exact mode the unpadded shards give the ranks different numbers of batches in any case.

Outputs, in ``OUTDIR``:

- ``rank{R}.json`` from every rank: ``history``, ``tpt_epoch``, ``figure_path`` per callback prefix, the
  classes this rank trained on and had in its exact-pass shard, steps and samples fed per epoch, the metric's
  sync function, the log directories;
- in ``rank0.json`` only, ``reference``: the metrics of SPEC.md computed in one process by
  ``functional.neural_collapse_metrics`` on the features of the full training set from the final model in eval
  mode (plus ``train_error``), and ``seen_reference[epoch]``: the same on the multiset of samples the training
  steps of all ranks fed in that epoch (padding duplicates included), NC4 against the class means of the
  previous epoch's multiset: what online mode measures when the weights do not change (``lr=0``);
- with ``--val``, ``val_history`` per prefix from every rank, and in ``rank0.json`` ``val_reference``: the held-out
  keys of the last validation computed in one process by the tests' brute-force ``held_out_reference`` (training
  means of the full training set and validation features, both from the final model in eval mode);
- ``outcome.json`` from rank 0: the checks (ranks identical, exact == reference, online == seen_reference when
  ``lr=0``, figure on rank 0 only) and ``ok``.

The exit status is non-zero when a rank fails; ``--strict`` makes it non-zero when a check fails too.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_neural_collapse import NeuralCollapse, NeuralCollapseCallback
from lightning_neural_collapse.functional import NC4_KEY, class_statistics, ncc_mismatch, neural_collapse_metrics
from lightning_neural_collapse.pipeline.exact import exact_loader
from lightning_neural_collapse.pipeline.run_state import LAGGED_NC4_KEY

EXACT_PREFIX = "nc"
ONLINE_PREFIX = "nco"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path, help="where every rank writes its JSON (created)")
    parser.add_argument("--mode", choices=("online", "exact", "both"), default="exact")
    parser.add_argument("--strategy", choices=("ddp", "ddp_spawn"), default="ddp")
    parser.add_argument("--accelerator", default="cpu", help="cpu (gloo) or cuda/gpu (NCCL)")
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--samples", type=int, default=301)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16, help="input dimension (features have --width)")
    parser.add_argument("--width", type=int, default=16, help="feature dimension D (input of the classifier)")
    parser.add_argument("--batch-size", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=3, help="max_epochs (total, also when resuming)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val", type=int, default=0, help="validation samples (0: no validation loop)")
    parser.add_argument("--missing-class-on-rank1", action="store_true")
    parser.add_argument("--uneven", action="store_true")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="a checkpoint after every epoch")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to continue from (ckpt_path=)")
    parser.add_argument("--batch-norm", action="store_true", help="a BatchNorm1d in the body (running statistics)")
    parser.add_argument("--layers", action="store_true", help="also measure the body's two Tanh layers (layers=)")
    parser.add_argument(
        "--fail-labels-on-rank1",
        type=int,
        default=None,
        metavar="EPOCH",
        help="the label getter raises on rank 1 in the training steps of EPOCH",
    )
    parser.add_argument(
        "--fail-exact-on-rank1",
        type=int,
        default=None,
        metavar="EPOCH",
        help="the exact pass's input getter raises on rank 1 at EPOCH",
    )
    parser.add_argument("--fail-tpt-hook-on-rank1", action="store_true", help="on_tpt_start raises on rank 1")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance of the outcome checks")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a check fails")
    parser.add_argument(
        "--watchdog",
        type=float,
        default=200.0,
        help="seconds after which every rank prints its stack and exits (a hang)",
    )
    args = parser.parse_args(argv)
    if args.uneven:
        args.lr = 0.0
    return args


# ---------------------------------------------------------------------------------------------- data


def make_data(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """Float32 blobs, int64 labels; ``--missing-class-on-rank1`` keeps the last class off ``i % W == 1``."""
    g = torch.Generator().manual_seed(1234 + args.seed)
    centres = 2.5 * torch.randn(args.classes, args.dim, generator=g)
    labels = torch.randperm(args.samples, generator=g) % args.classes
    features = centres[labels] + torch.randn(args.samples, args.dim, generator=g)
    if args.missing_class_on_rank1:  # no sample of the last class at an index of rank 1's shard
        world = args.devices * args.num_nodes
        last = args.classes - 1
        special = torch.nonzero(labels == last).flatten().tolist()
        others = iter(torch.nonzero(labels != last).flatten().tolist())
        allowed = [i for i in range(args.samples) if world < 2 or i % world != 1]
        if len(special) > len(allowed):
            raise SystemExit("--missing-class-on-rank1: too many samples of the last class")
        order = [-1] * args.samples
        for position, index in zip(allowed, special, strict=False):
            order[position] = index
        order = [index if index >= 0 else next(others) for index in order]
        features, labels = features[order], labels[order]
        assert world < 2 or not (labels[1::world] == last).any()
    return features, labels


def make_val_data(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """``--val`` noisier blobs around the training centres (the first draw of :func:`make_data`'s generator)."""
    centres = 2.5 * torch.randn(args.classes, args.dim, generator=torch.Generator().manual_seed(1234 + args.seed))
    g = torch.Generator().manual_seed(4321 + args.seed)
    labels = torch.randperm(args.val, generator=g) % args.classes
    return centres[labels] + 1.5 * torch.randn(args.val, args.dim, generator=g), labels


class IndexedData(Dataset):
    """``(x, y, index)``: the label is ``batch[1]`` (the callback's default), the index tells what ran."""

    def __init__(self, features: Tensor, labels: Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.features[index], self.labels[index], index


class ShardSampler(Sampler[int]):
    """Fixed indices, reshuffled each epoch (``set_epoch``, which Lightning calls) from a fixed seed."""

    def __init__(self, indices: list[int], seed: int) -> None:
        self.indices, self.seed, self.epoch = indices, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter([self.indices[i] for i in torch.randperm(len(self.indices), generator=g).tolist()])


def shard(args: argparse.Namespace, n: int, rank: int, world: int) -> list[int]:
    """This rank's training indices when Lightning's DistributedSampler is off (a partition of the data)."""
    own = list(range(rank, n, world))  # the rank's shard in the exact pass too
    if not args.uneven or world == 1:
        return own
    if rank == 0:  # plus the first third of every other rank's indices
        others = [list(range(r, n, world)) for r in range(1, world)]
        return own + [i for theirs in others for i in theirs[: len(theirs) // 3]]
    return own[len(own) // 3 :]


class SplitBatches(Sampler[list[int]]):
    """The order of ``sampler`` cut into exactly ``num_batches`` batches of nearly equal size."""

    def __init__(self, sampler: ShardSampler, num_batches: int) -> None:
        if len(sampler) < num_batches:
            raise SystemExit(f"--uneven: {len(sampler)} samples cannot fill {num_batches} batches")
        self.sampler, self.num_batches = sampler, num_batches
        self.batch_size = math.ceil(len(sampler) / num_batches)  # read by the exact pass's loader

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Any:
        order = list(self.sampler)
        bounds = [round(i * len(order) / self.num_batches) for i in range(self.num_batches + 1)]
        return iter([order[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])


def train_steps(args: argparse.Namespace, n: int, world: int) -> int:
    """Training steps per epoch under ``--uneven``, the same on every rank: the largest shard in batches of
    ``--batch-size`` (Lightning 2.6 broadcasts a SIGTERM flag from rank 0 before every training batch, so
    ranks with different step counts hang in Lightning itself); smaller shards get smaller batches."""
    return max(math.ceil(len(shard(args, n, r, world)) / args.batch_size) for r in range(world))


# --------------------------------------------------------------------------------------------- model


class Net(L.LightningModule):
    """MLP body, linear classifier ``fc`` (its input are the penultimate features).

    ``fed[epoch]`` lists the sample indices whose features the training steps of this rank computed. Under
    ``--uneven`` (manual optimisation and no backward, so no gradient all_reduce is involved) the ranks but 0
    skip the forward pass in every other step (they measure fewer batches than rank 0), and rank 0 skips it
    in every step of epoch 1 (no batch measured at all: it still has to take part in the epoch-end sync).
    """

    def __init__(self, args: argparse.Namespace, features: Tensor, labels: Tensor) -> None:
        super().__init__()
        self.args = args
        self.features, self.labels = features, labels
        norm: list[nn.Module] = [nn.BatchNorm1d(32)] if args.batch_norm else []
        self.body = nn.Sequential(nn.Linear(args.dim, 32), *norm, nn.Tanh(), nn.Linear(32, args.width), nn.Tanh())
        self.fc = nn.Linear(args.width, args.classes)
        self.automatic_optimization = not args.uneven
        self.fed: dict[int, list[int]] = {}
        self.steps: dict[int, int] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        x, y, index = batch
        epoch = self.current_epoch
        self.steps[epoch] = self.steps.get(epoch, 0) + 1
        fed = self.fed.setdefault(epoch, [])
        if self.args.uneven and (epoch == 1 if self.global_rank == 0 else batch_idx % 2 == 1):
            return None  # no forward: the callback sees no features in this step
        fed.extend(index.tolist())
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.args.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        data = IndexedData(self.features, self.labels)
        if not (self.args.missing_class_on_rank1 or self.args.uneven):
            # Lightning swaps in a DistributedSampler (padding: 301 samples -> 2 x 151)
            return DataLoader(data, batch_size=self.args.batch_size, shuffle=True)
        n, rank, world = len(data), self.trainer.global_rank, self.trainer.world_size
        sampler = ShardSampler(shard(self.args, n, rank, world), self.args.seed)
        if self.args.uneven:
            return DataLoader(data, batch_sampler=SplitBatches(sampler, train_steps(self.args, n, world)))
        return DataLoader(data, batch_size=self.args.batch_size, sampler=sampler)


# ------------------------------------------------------------------------------------- failures on rank 1


class Where(Callback):
    """Keeps the epoch and rank where the getters below can see them."""

    epoch = 0
    rank = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        Where.epoch, Where.rank = trainer.current_epoch, trainer.global_rank


class Getters:
    """Label and input getters that raise on rank 1 at the epochs of ``--fail-*-on-rank1``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def labels(self, batch: Any) -> Any:
        if Where.rank == 1 and Where.epoch == self.args.fail_labels_on_rank1:
            raise KeyError("labels")  # an edge case of a user's label getter, on one rank only
        return batch[1]

    def inputs(self, batch: Any) -> Any:
        if Where.rank == 1 and Where.epoch == self.args.fail_exact_on_rank1:
            raise RuntimeError("this rank's exact pass failed")
        return batch[0]


class FailingHook(NeuralCollapseCallback):
    def on_tpt_start(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        if trainer.global_rank == 1:
            raise RuntimeError("a user's on_tpt_start failed")


# ------------------------------------------------------------------------------------------ recording


class Recorder(Callback):
    """At the end of fit, on every rank, writes what the callbacks measured and what the rank saw."""

    def __init__(self, args: argparse.Namespace, callbacks: dict[str, NeuralCollapseCallback]) -> None:
        self.args = args
        self.callbacks = callbacks
        self.start = time.time()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        args, rank, world = self.args, trainer.global_rank, trainer.world_size
        net: Net = pl_module  # type: ignore[assignment]
        labels = net.labels
        epochs = sorted(net.fed)
        exact = exact_loader(trainer.train_dataloader, world, rank)  # what the callback's exact pass iterates
        exact_shard = list(exact.sampler)
        mine: dict[str, Any] = {
            "rank": rank,
            "world_size": world,
            "strategy": args.strategy,
            "accelerator": args.accelerator,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "modes": {p: cb.config.mode for p, cb in self.callbacks.items()},
            "history": {p: cb.history for p, cb in self.callbacks.items()},
            "val_history": {p: cb.val_history for p, cb in self.callbacks.items()},
            "tpt_epoch": {p: cb.tpt_epoch for p, cb in self.callbacks.items()},
            "figure_path": {p: cb.figure_path for p, cb in self.callbacks.items()},
            "sync_fn": _sync_fn_name(),
            "train_classes_seen": sorted({int(labels[i]) for e in epochs for i in net.fed[e]}),
            "exact_pass_classes": sorted({int(labels[i]) for i in exact_shard}),
            "exact_pass_batches": len(exact),
            "steps_per_epoch": [net.steps.get(e, 0) for e in epochs],
            "samples_fed_per_epoch": [len(net.fed[e]) for e in epochs],
            "epochs_run": epochs,
            "log_dirs": [lg.log_dir for lg in trainer.loggers],
            "fit_seconds": time.time() - self.start,
        }
        gathered: list[Any] = [None] * world
        if world > 1:
            dist.all_gather_object(gathered, {"record": mine, "fed": net.fed})
        else:
            gathered = [{"record": mine, "fed": net.fed}]
        if rank == 0:
            mine["reference"] = reference(net)
            mine["seen_reference"] = {str(e): seen_reference(net, [g["fed"] for g in gathered], e) for e in epochs}
            if args.val:
                mine["val_reference"] = val_reference(net, *make_val_data(args))
            if args.layers:
                mine["layer_reference"] = layer_reference(net, *make_val_data(args))
        args.outdir.mkdir(parents=True, exist_ok=True)
        (args.outdir / f"rank{rank}.json").write_text(json.dumps(mine, indent=1, sort_keys=True))
        if rank == 0:
            records = [g["record"] for g in gathered]
            records[0] = mine
            outcome = checks(args, records)
            (args.outdir / "outcome.json").write_text(json.dumps(outcome, indent=1, sort_keys=True))


def _sync_fn_name() -> str | None:
    fn = NeuralCollapse(2, 1).dist_sync_fn
    return f"{fn.__module__}.{fn.__qualname__}" if fn is not None else None


@torch.no_grad()
def _features_logits(net: Net, indices: list[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    was_training = net.training
    net.eval()
    x = net.features if indices is None else net.features[indices]
    y = net.labels if indices is None else net.labels[indices]
    h = net.body(x.to(net.device))
    logits = net.fc(h)
    net.train(was_training)
    return h.cpu(), logits.cpu(), y


def _classifier(net: Net) -> tuple[Tensor, Tensor]:
    return net.fc.weight.detach().cpu(), net.fc.bias.detach().cpu()


def reference(net: Net) -> dict[str, float]:
    """SPEC.md metrics of the full training set on the final weights, one process, float64."""
    h, logits, y = _features_logits(net)
    weight, bias = _classifier(net)
    values = neural_collapse_metrics(h, y, weight, bias, num_classes=net.args.classes)
    values["train_error_eval"] = float((logits.argmax(dim=1) != y).double().mean())  # the exact pass's error
    return values


def val_reference(net: Net, val_x: Tensor, val_y: Tensor) -> dict[str, float]:
    """The held-out keys of the last validation (exact mode), one process, float64 brute force."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from reference import held_out_reference  # the tests' own brute-force implementation

    h, _, y = _features_logits(net)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        hv = net.body(val_x.to(net.device))
        zv = net.fc(hv)
    net.train(was_training)
    arrays = (h.double().numpy(), y.numpy(), hv.cpu().double().numpy(), val_y.numpy(), zv.cpu().double().numpy())
    return held_out_reference(*arrays, net.args.classes)


LAYERS = ("body.1", "body.3")
"""The layers ``--layers`` lists: the two Tanh outputs of the body (without ``--batch-norm``)."""


def layer_reference(net: Net, val_x: Tensor, val_y: Tensor) -> dict[str, float]:
    """Per-layer keys of the training set on the final model (``layers/<name>/<key>``), and each layer's validation
    NCC accuracy against its training means (``val:layers/<name>/ncc_accuracy``), one process, float64 brute force."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from reference import layer_reference as brute_force  # the tests' own implementation

    was_training = net.training
    net.eval()
    outputs: dict[str, list[Tensor]] = {}
    hooks = [
        net.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: outputs.setdefault(name, []).append(out)
        )
        for name in LAYERS
    ]
    with torch.no_grad():
        net.body(net.features.to(net.device))
        net.body(val_x.to(net.device))
    for hook in hooks:
        hook.remove()
    net.train(was_training)
    out: dict[str, float] = {}
    y = net.labels.numpy()
    for name, (train, held_out) in outputs.items():
        h, hv = train.cpu().double(), held_out.cpu().double()
        for key, value in brute_force(h.numpy(), y, net.args.classes).items():
            out[f"layers/{name}/{key}"] = value
        means = torch.stack([h[net.labels == c].mean(dim=0) for c in range(net.args.classes)])
        nearest = torch.cdist(hv, means).argmin(dim=1)
        out[f"val:layers/{name}/ncc_accuracy"] = float((nearest == val_y).double().mean())
    return out


def seen_reference(net: Net, seen: list[dict[int, list[int]]], epoch: int) -> dict[str, float]:
    """What online mode must report for ``epoch`` when the weights never change (``lr=0``): the exact metrics
    of the samples the training steps of all ranks fed (duplicates included), NC4 against the class means of
    the previous epoch's samples (``nc4_ncc_mismatch_prev_means``)."""
    indices = [i for rank_seen in seen for i in rank_seen.get(epoch, [])]
    if not indices:
        return {}
    h, logits, y = _features_logits(net, indices)
    weight, bias = _classifier(net)
    values = neural_collapse_metrics(h, y, weight, num_classes=net.args.classes)
    values.pop(NC4_KEY, None)
    values["train_error"] = float((logits.argmax(dim=1) != y).double().mean())
    values["samples"] = float(len(indices))
    previous = [i for rank_seen in seen for i in rank_seen.get(epoch - 1, [])]
    if previous:
        h_prev, _, y_prev = _features_logits(net, previous)
        prev = class_statistics(h_prev, y_prev, net.args.classes)
        values[LAGGED_NC4_KEY] = ncc_mismatch(h, prev.means, logits.double(), prev.present)
    return values


# ------------------------------------------------------------------------------------------- outcome


def _close(a: float, b: float, rtol: float, floor: float = 1e-9) -> bool:
    return abs(a - b) <= rtol * max(abs(b), floor)


def compare(measured: dict[str, float], expected: dict[str, float], rtol: float) -> dict[str, Any]:
    """Keys of ``expected`` that ``measured`` misses or gets wrong (NC4 and training error must be exact)."""
    wrong: dict[str, Any] = {}
    for key, value in expected.items():
        if key == "samples":
            continue
        if key not in measured:
            wrong[key] = ("missing", value)
        elif key in (NC4_KEY, LAGGED_NC4_KEY, "train_error", "train_error_eval"):
            if measured[key] != value:
                wrong[key] = (measured[key], value)
        elif not _close(measured[key], value, rtol):
            wrong[key] = (measured[key], value)
    return wrong


def checks(args: argparse.Namespace, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdicts that ``--strict`` (and ``benchmarks/gpu_ddp_check.sh``) act on."""
    first = records[0]
    out: dict[str, Any] = {
        "world_size": first["world_size"],
        "backend": first["backend"],
        "accelerator": args.accelerator,
        "mode": args.mode,
    }
    out["ranks_identical"] = all(
        r["history"] == first["history"]
        and r["tpt_epoch"] == first["tpt_epoch"]
        and r["val_history"] == first["val_history"]
        for r in records
    )
    others_none = all(v is None for r in records[1:] for v in r["figure_path"].values())
    out["figure_on_rank0_only"] = others_none and all(v is not None for v in first["figure_path"].values())
    out["wrong"] = {}
    for prefix, history in first["history"].items():
        if not history:
            out["wrong"][prefix] = "nothing measured"
        elif first["modes"][prefix] == "exact":  # the last epoch was measured on the final weights
            out["wrong"][prefix] = compare(history[-1], first["reference"], args.rtol)
        elif args.lr == 0:  # online: exact statistics of what the training steps fed, weights fixed
            seen = first["seen_reference"]
            wrong = {r["epoch"]: compare(r, seen[str(r["epoch"])], args.rtol) for r in history}
            out["wrong"][prefix] = {e: w for e, w in wrong.items() if w}
    correct = not any(out["wrong"].values())
    out["ok"] = bool(out["ranks_identical"] and out["figure_on_rank0_only"] and correct)
    return out


# ----------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.watchdog > 0:
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    args.outdir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)
    features, labels = make_data(args)
    net = Net(args, features, labels)
    if args.accelerator == "cpu":
        torch.set_num_threads(1)  # ranks share the cores
    modes = {EXACT_PREFIX: args.mode}
    if args.mode == "both":
        modes = {EXACT_PREFIX: "exact", ONLINE_PREFIX: "online"}
    getters = Getters(args)
    kind = FailingHook if args.fail_tpt_hook_on_rank1 else NeuralCollapseCallback
    layers = list(LAYERS) if args.layers else None
    callbacks = {
        prefix: kind(mode=mode, prefix=prefix, label_getter=getters.labels, input_getter=getters.inputs, layers=layers)
        for prefix, mode in modes.items()
    }
    extra: list[Callback] = [Where(), Recorder(args, callbacks)]
    checkpointing = args.checkpoint_dir is not None
    if checkpointing:
        extra.append(
            ModelCheckpoint(
                dirpath=args.checkpoint_dir,
                filename="{epoch}",
                every_n_epochs=1,
                save_top_k=-1,
                save_on_train_epoch_end=True,
            )
        )
    logs = args.outdir / "logs"
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        max_epochs=args.epochs,
        callbacks=[*callbacks.values(), *extra],
        logger=[TensorBoardLogger(logs, name="tb", version=0), CSVLogger(logs, name="csv", version=0)],
        use_distributed_sampler=not (args.missing_class_on_rank1 or args.uneven),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpointing,
        log_every_n_steps=1,
        deterministic=args.accelerator == "cpu",
    )
    val = DataLoader(TensorDataset(*make_val_data(args)), batch_size=args.batch_size) if args.val else None
    trainer.fit(net, val_dataloaders=val, ckpt_path=str(args.resume) if args.resume else None)
    if trainer.is_global_zero and args.strict:
        outcome = json.loads((args.outdir / "outcome.json").read_text())
        print(json.dumps(outcome, indent=1, sort_keys=True))
        return 0 if outcome["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

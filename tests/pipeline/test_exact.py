"""``pipeline.exact``: the exact pass's loader and the pass itself, without a Trainer."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    SubsetRandomSampler,
    TensorDataset,
)

from lightning_neural_collapse.pipeline.accumulate import Accumulator
from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.exact import (
    ExactLoaderError,
    ExactMeasurement,
    ExactPass,
    batch_limit,
    exact_loader,
    observing,
)
from lightning_neural_collapse.pipeline.labels import LabelReader


def _init_worker(worker_id: int) -> None:
    torch.manual_seed(worker_id)


def _collate(items: list[Any]) -> Any:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


DATA = TensorDataset(torch.randn(20, 3), torch.arange(20) % 2)


def test_the_rebuilt_loader_keeps_every_setting_but_the_order() -> None:
    generator = torch.Generator().manual_seed(3)
    train = DataLoader(
        DATA,
        batch_size=6,
        shuffle=True,
        num_workers=2,
        collate_fn=_collate,
        worker_init_fn=_init_worker,
        generator=generator,
        persistent_workers=True,
        prefetch_factor=3,
        timeout=7.5,
        multiprocessing_context="spawn",
        pin_memory=False,
    )
    loader = exact_loader(train)
    assert loader.batch_size == 6 and loader.collate_fn is _collate and loader.num_workers == 2
    assert loader.worker_init_fn is _init_worker and loader.generator is generator
    assert loader.persistent_workers and loader.prefetch_factor == 3 and loader.timeout == 7.5
    assert loader.multiprocessing_context is not None and loader.multiprocessing_context.get_start_method() == "spawn"
    assert list(loader.sampler) == list(range(20)) and not loader.drop_last
    sharded = exact_loader(DataLoader(DATA, batch_size=6, shuffle=True), world_size=3, rank=2)
    assert isinstance(sharded.sampler, UnrepeatedDistributedSampler) and list(sharded.sampler) == list(range(2, 20, 3))


def test_a_user_loader_or_function() -> None:
    clean = DataLoader(DATA, batch_size=4)
    assert exact_loader(None, user_loader=clean) is clean
    assert exact_loader(None, user_loader=lambda: clean) is clean
    resharded = exact_loader(None, 2, 1, user_loader=clean)  # a plain loader is sharded by the callback
    assert list(resharded.sampler) == list(range(1, 20, 2)) and resharded.batch_size == 4
    distributed = DataLoader(DATA, batch_size=4, sampler=DistributedSampler(DATA, num_replicas=2, rank=0))
    assert exact_loader(None, 2, 0, user_loader=distributed) is distributed  # sharded already
    custom = DataLoader(DATA, batch_size=4, sampler=SubsetRandomSampler(range(10)))
    assert exact_loader(None, user_loader=custom) is custom
    with pytest.raises(ExactLoaderError, match="SubsetRandomSampler under 2 ranks"):
        exact_loader(None, 2, 0, user_loader=custom)
    with pytest.raises(ExactLoaderError, match="must be a DataLoader or return one"):
        exact_loader(None, user_loader=lambda: [1, 2])


class Stream(IterableDataset):
    def __iter__(self) -> Any:
        yield from zip(torch.randn(4, 3), torch.arange(4) % 2, strict=True)


def test_what_cannot_be_re_read() -> None:
    with pytest.raises(ExactLoaderError, match="IterableDataset.*`exact_dataloader=`"):
        exact_loader(DataLoader(Stream(), batch_size=2))
    with pytest.raises(ExactLoaderError, match="single torch DataLoader"):
        exact_loader([DataLoader(DATA)])
    stream = DataLoader(Stream(), batch_size=2)
    assert exact_loader(None, 2, 0, user_loader=stream) is stream  # an IterableDataset shards itself


def test_batch_limit_follows_limit_train_batches() -> None:
    assert batch_limit(1.0, 10) is None and batch_limit(None, 10) is None
    assert batch_limit(4, 10) == 4 and batch_limit(40, 10) is None
    assert batch_limit(0.5, 10) == 5 and batch_limit(0.001, 10) == 1 and batch_limit(0.5, None) is None


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.fc(self.body(x) * scale)


@pytest.mark.parametrize("kind", ["tensor", "tuple", "dict"])
def test_the_pass_calls_the_model_as_the_input_asks(kind: str) -> None:
    model = TwoInputs().train()
    binding = Binding(model, "fc")
    getters = {
        "tensor": lambda batch: batch[0],
        "tuple": lambda batch: (batch[0], 2.0),
        "dict": lambda batch: {"x": batch[0], "scale": 2.0},
    }
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    running = model.body[2].running_mean.clone()
    batches = ExactPass(
        model, DataLoader(DATA, batch_size=8), binding, LabelReader(None, 2, None), getters[kind], max_batches=2
    ).run(lambda captured, y: seen.append((captured.features, y)))
    assert batches == 2 and [len(y) for _, y in seen] == [8, 8]
    scale = 1.0 if kind == "tensor" else 2.0
    with torch.no_grad(), observing(model):
        expected = model.body(DATA.tensors[0][:8]) * scale
    assert torch.allclose(seen[0][0], expected)  # eval mode: no dropout, running statistics
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert np.array_equal(np.random.get_state()[1], before[2])
    assert torch.equal(model.body[2].running_mean, running)  # eval mode: BatchNorm statistics untouched


class Broken(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> Any:
        return {"image": torch.randn(3), "label": torch.tensor(index % 2)}


def test_measurement_runs_both_passes_and_propagates_failures() -> None:
    model = TwoInputs()
    binding = Binding(model, "fc")

    def new_pass(getter: Any = lambda batch: batch[0]) -> ExactPass:
        return ExactPass(model, DataLoader(DATA, batch_size=8), binding, LabelReader(None, 2, None), getter)

    def accumulator(features: torch.Tensor) -> Accumulator:
        return Accumulator(2, 4, features.device, statistics=True)

    measurement = ExactMeasurement(new_pass, accumulator, lambda: torch.zeros(0, 4), 2, model)
    metric, counts = measurement.statistics()
    stats = metric.statistics()
    assert int(counts["total"]) == 20 and stats.counts.tolist() == [10.0, 10.0]
    mismatches, total = measurement.ncc(stats.means, stats.present)
    assert int(total) == 20 and 0 <= int(mismatches) <= 20
    run = measurement.run()
    assert run.model is model
    failing = ExactMeasurement(
        lambda: new_pass(lambda batch: batch["x"]), accumulator, lambda: torch.zeros(0, 4), 2, model
    )
    with pytest.raises(TypeError):
        failing.statistics()
    dict_pass = ExactPass(
        model, DataLoader(Broken(), batch_size=2), binding, LabelReader(None, 2, None), lambda batch: batch["image"]
    )
    assert dict_pass.run(lambda captured, y: None) == 2
    other = Binding(nn.Sequential(nn.Linear(4, 2)), "0")  # hooks on a module this model never calls
    with pytest.raises(RuntimeError, match="`0` did not run"):
        ExactPass(model, DataLoader(DATA, batch_size=8), other, LabelReader(None, 2, None), lambda batch: batch[0]).run(
            lambda captured, y: None
        )


def test_the_pass_pads_to_the_agreed_forwards_without_counting_them() -> None:
    """Under a sharded strategy every forward is a collective: a rank with fewer batches repeats its first one."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    calls: list[int] = []
    model.register_forward_hook(lambda m, a, out: calls.append(out.shape[0]))
    binding = Binding(model, "2")
    loader = DataLoader(DATA, batch_size=8)  # 3 batches: 8, 8, 4
    unsharded = ExactPass(model, loader, binding, LabelReader(None, 2, None), lambda b: b[0], forwards=5)
    assert unsharded.run(lambda captured, labels: None) == 3 and len(calls) == 3  # DDP: nothing to pad
    calls.clear()
    padded = ExactPass(model, loader, binding, LabelReader(None, 2, None), lambda b: b[0], forwards=5)
    padded.sharded = True  # as for a model whose forward is a collective
    consumed: list[int] = []
    assert padded.local_forwards() == 3
    assert padded.run(lambda captured, labels: consumed.append(captured.num_samples)) == 3
    assert consumed == [8, 8, 4] and calls == [8, 8, 4, 8, 8]  # two uncounted repeats of the first batch
    limited = ExactPass(model, loader, binding, LabelReader(None, 2, None), lambda b: b[0], max_batches=2)
    assert limited.local_forwards() == 2
    empty = ExactPass(model, [], binding, LabelReader(None, 2, None), lambda b: b[0], forwards=1)
    assert empty.run(lambda captured, labels: None) == 0  # unsharded: an empty shard takes part with nothing
    empty.sharded = True
    with pytest.raises(RuntimeError, match="shard of the exact pass is empty"):
        empty.run(lambda captured, labels: None)
    binding.close()

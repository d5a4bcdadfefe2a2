"""``pipeline.first_step``: the checks of a fit's first step, on a plain module (no Trainer)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.first_step import FirstStep, Shapes
from lightning_neural_collapse.pipeline.labels import BatchFormatError, ClassCountError


class Model(nn.Module):
    def __init__(self, proj_out: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.proj = nn.Linear(8, proj_out)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.body(batch[0])
        return F.cross_entropy(self.fc(h), batch[1]) + 0.1 * self.proj(h).square().mean()


def _first_step(model: nn.Module, classifier: str | None = None, **kwargs: Any) -> tuple[FirstStep, list[str]]:
    warned: list[str] = []
    options: dict[str, Any] = {"num_classes": None, "label_getter": None, "ignore_index": None, "input_getter": None}
    options.update(kwargs)
    step = FirstStep(Binding(model, classifier), probe=True, warn=lambda key, message: warned.append(key), **options)
    return step, warned


def test_a_projection_head_registered_last_is_not_taken_for_the_classifier() -> None:
    model = Model()
    step, warned = _first_step(model)
    assert step.binding.name == "proj"  # the last nn.Linear: the automatic guess
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    step.begin(batch)
    shapes = step.finish(model.step(batch))
    assert shapes == Shapes(num_classes=3, dim=8) and step.binding.name == "fc" and not warned
    captured = step.binding.capture.take()  # the first batch is measured with the right classifier
    assert captured is not None and captured[1].shape == (6, 3)
    assert not model.proj._forward_hooks and model.fc._forward_hooks


def test_labels_that_only_fit_the_real_head_wait_for_the_probe() -> None:
    model = Model(proj_out=2)  # labels 0..2 are out of range for the 2 outputs of the guess
    step, _ = _first_step(model)
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    step.begin(batch)
    assert step.finish(model.step(batch)) == Shapes(3, 8)


def test_a_consumer_of_the_classifier_output_is_an_error() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    step, _ = _first_step(net, None)
    step.binding.rebind("0")  # as if the guess had been the first layer
    step.probe = type(step.probe)(net, net[0])  # type: ignore[misc]
    batch = (torch.randn(4, 4), torch.arange(4) % 3)
    step.begin(batch)
    with pytest.raises(MisconfigurationException, match=r"`2` runs on its output.*`classifier='2'`"):
        step.finish(F.cross_entropy(net(batch[0]), batch[1]))


def test_num_classes_checks() -> None:
    with pytest.raises(MisconfigurationException, match=r"`num_classes=4` but the classifier `fc` has 3 outputs"):
        _first_step(Model(), "fc", num_classes=4)
    step, _ = _first_step(Model(), "fc")
    step.begin((torch.randn(2, 4), torch.tensor([0, 2])))
    assert step.labels_checked  # known from out_features: checked before the forward
    step, _ = _first_step(Model(), "fc")
    with pytest.raises(ClassCountError, match=r"3 classes from the outputs of `fc`\): label 5"):
        step.begin((torch.randn(2, 4), torch.tensor([0, 5])))


def test_no_forward_yet_and_input_checks() -> None:
    model = Model()
    step, _ = _first_step(model, "fc", input_getter=lambda batch: batch[0])
    step.begin((torch.randn(2, 4), torch.tensor([0, 1])))
    assert step.finish(None) is None  # the classifier did not run: checked at a later step
    step, _ = _first_step(model, "fc", input_getter=lambda batch: batch["x"])
    with pytest.raises(KeyError):
        step.begin({"x_missing": 1, "y": torch.tensor([0])})
    step, _ = _first_step(model, "fc", label_getter=lambda batch: batch[1].float())
    with pytest.raises(BatchFormatError, match="float labels"):
        step.begin((torch.randn(2, 4), torch.tensor([0, 1])))

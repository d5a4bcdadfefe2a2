"""``pipeline.capture``: finding the classifier, the hooks, and the shape checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_neural_collapse.pipeline.capture import (
    Binding,
    ClassifierNotFoundError,
    FeatureCapture,
    classifier_parameters,
    find_classifier,
)
from lightning_neural_collapse.pipeline.samples import CaptureShapeError


class TimmBackbone(nn.Module):
    """Like a timm model built with ``num_classes=0``: ``get_classifier()`` is an ``nn.Identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class WithUserHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = TimmBackbone()
        self.classifier = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(x))


class TimmNamed(nn.Module):
    """``get_classifier()`` returning a name, as some timm models do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.extra = nn.Linear(4, 4)

    def get_classifier(self, name_only: bool = True) -> str:
        return "fc"


def test_find_classifier() -> None:
    assert find_classifier(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))[0] == "2"
    assert find_classifier(WithUserHead())[0] == "classifier"  # the Identity is skipped: the user's head
    assert find_classifier(TimmNamed())[0] == "fc"
    with pytest.raises(ClassifierNotFoundError, match="`classifier='nope'`"):
        find_classifier(WithUserHead(), "nope")
    with pytest.raises(ClassifierNotFoundError, match="no `nn.Linear`.*`features=`"):
        find_classifier(nn.Sequential(nn.Conv2d(3, 4, 1)))


def test_conv_head_before_pooling_is_an_error_naming_both_options() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1))
    binding = Binding(model, "1")
    model(torch.randn(2, 8, 5, 5))
    with pytest.raises(CaptureShapeError, match=r"`1` outputs a tensor of shape \(2, 4, 5, 5\)"):
        binding.take()
    model(torch.randn(2, 8, 1, 1))  # after pooling: one row per sample
    taken = binding.take()
    assert taken is not None and taken.features.shape == (2, 8) and taken.predictions.shape == (2,)


class TiedLM(nn.Module):
    """Embedding, a norm, and a head tied to the embedding; the head is skipped when ``fused`` (a fused loss)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.embed.weight
        self.fused = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(ids))
        return h if self.fused else self.head(h)


def test_tokens_weight_tying_and_a_fused_loss() -> None:
    model = TiedLM()
    binding = Binding(model, "head", "norm")
    assert binding.tied_to() == "embed"
    ids = torch.randint(0, 11, (3, 5))
    model(ids)
    tokens = binding.take()
    assert tokens is not None and tokens.layout == (3, 5) and tokens.features.shape == (15, 6)
    expected = model.head(model.norm(model.embed(ids))).reshape(15, 11).argmax(dim=1)
    assert torch.equal(tokens.predictions, expected)
    model.fused = True  # the head never runs: the decisions come from its weight
    model(ids)
    fused = binding.take()
    assert fused is not None and fused.layout == (3, 5) and torch.equal(fused.predictions, expected)
    assert Binding(nn.Sequential(nn.Linear(2, 3)), None).tied_to() is None


def test_capture_counts_forwards_but_not_recomputes() -> None:
    fc = nn.Linear(4, 3)
    capture = FeatureCapture(fc, name="fc")
    capture.attach()
    x = torch.randn(5, 4, requires_grad=True)
    checkpoint(fc, x, use_reentrant=True).sum().backward()  # forward, then a recompute inside backward
    assert capture.calls == 1
    fc(x)
    assert capture.calls == 2
    capture.clear()
    assert capture.calls == 0 and capture.take() is None
    plain = FeatureCapture(fc, count_calls=False)
    plain.attach()
    fc(x)
    assert plain.calls == 0 and plain.take() is not None
    capture.remove()
    plain.remove()
    assert not fc._forward_hooks


def test_binding_features_module_and_rebind() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3), nn.Linear(3, 3))
    binding = Binding(model, None, "1")
    assert binding.name == "3" and binding.automatic
    model(torch.randn(2, 4))
    taken = binding.take()
    assert taken is not None and taken.features.shape == (2, 6)  # features: the ReLU's output
    binding.rebind("2")
    assert binding.name == "2" and not model[3]._forward_hooks and model[2]._forward_hooks
    binding.close()
    assert not model[2]._forward_hooks and not model[1]._forward_hooks
    with pytest.raises(ClassifierNotFoundError, match="`features='x'`"):
        Binding(model, "2", "x")


def test_classifier_parameters_of_a_1x1_conv() -> None:
    conv = nn.Conv2d(5, 3, 1)
    weight, bias = classifier_parameters(conv, 3, 5)
    assert weight is not None and weight.shape == (3, 5) and bias is not None
    other_weight, other_bias = classifier_parameters(conv, 3, 4)  # another width: no weight for NC3
    assert other_weight is None and other_bias is not None and torch.equal(other_bias, bias)

"""``pipeline.probe``: what runs on, and next to, the assumed classifier in one training forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_neural_collapse.pipeline.probe import FinalLayerProbe, is_compiled


class Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.fc = nn.Linear(8, 3)
        self.proj = nn.Linear(8, 5)  # a projection head, registered after the classifier

    def loss(self, x: torch.Tensor, y: torch.Tensor, *, use_proj: bool = True) -> torch.Tensor:
        h = self.body(x)
        loss = F.cross_entropy(self.fc(h), y)
        z = self.proj(h)
        return loss + (F.normalize(z, dim=1).square().sum(dim=1).mean() if use_proj else 0.0)


def _watch(model: Heads, classifier: nn.Module, **kwargs: bool) -> tuple[FinalLayerProbe, torch.Tensor]:
    probe = FinalLayerProbe(model, classifier)
    probe.start()
    loss = model.loss(torch.randn(6, 4), torch.arange(6) % 3, **kwargs)
    return probe, loss


def test_the_head_feeding_the_cross_entropy_is_found() -> None:
    model = Heads()
    probe, loss = _watch(model, model.proj)
    assert probe.consumers == [] and probe.reaches_loss(loss) is True
    assert probe.logit_heads(loss) == ["fc"]  # the softmax takes fc's output, not proj's
    assert probe.other_heads(loss) == ["fc"]
    assert set(probe.linear_io) == {"body.0", "fc", "proj"}
    x, z = probe.linear_io["fc"]
    assert x.shape == (6, 8) and z.shape == (6, 3) and not z.requires_grad
    probe.stop()
    assert probe.linear_io == {} and not torch.nn.modules.module._global_forward_hooks


def test_an_unused_head_is_not_on_the_loss_path() -> None:
    model = Heads()
    probe, loss = _watch(model, model.proj, use_proj=False)
    assert probe.reaches_loss(loss) is False and probe.logit_heads(loss) == ["fc"]
    probe.stop()


def test_a_layer_after_the_assumed_classifier_is_a_consumer() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    probe = FinalLayerProbe(net, net[0])
    probe.start()
    loss = F.cross_entropy(net(torch.randn(5, 4)), torch.arange(5) % 3)
    assert probe.consumers == ["2"] and probe.logit_heads(loss) == ["2"]
    probe.stop()


def test_no_graph_means_nothing_is_known() -> None:
    model = Heads()
    probe = FinalLayerProbe(model, model.fc)
    probe.start()
    h = model.body(torch.randn(6, 4))
    loss = F.cross_entropy(checkpoint(model.fc, h, use_reentrant=True), torch.arange(6) % 3)
    assert probe.reaches_loss(loss) is None and probe.other_heads(loss) == []
    assert probe.reaches_loss(torch.tensor(1.0)) is None and probe.logit_heads(None) == []
    probe.stop()


def test_is_compiled() -> None:
    model = nn.Linear(2, 2)
    assert not is_compiled(model)
    model.compile(backend="eager")
    assert is_compiled(model)

"""``layers=``: names and globs resolved in depth order, the hooks, and the rows each layer gives."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_neural_collapse.pipeline.capture import Binding
from lightning_neural_collapse.pipeline.layer_taps import LayerNotFoundError, LayerTaps, layer_tag, resolve_layers
from lightning_neural_collapse.pipeline.samples import CaptureShapeError


def net() -> nn.Module:
    model = nn.Sequential()
    model.add_module("layer1", nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()))
    model.add_module("layer2", nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU()))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(3, 4))
    return model


def test_globs_match_per_dotted_part_in_registration_order() -> None:
    model = net()
    assert resolve_layers(model, ["pool", "layer*"]) == ["layer1", "layer2", "pool"]
    assert resolve_layers(model, ["layer?.*"]) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert resolve_layers(model, ["layer1", "layer1"]) == ["layer1"]


def test_a_name_that_matches_nothing_lists_the_closest_candidates() -> None:
    with pytest.raises(LayerNotFoundError, match=r"'layr2'.*candidates.*'layer2'"):
        resolve_layers(net(), ["layr2"])
    with pytest.raises(LayerNotFoundError, match=r"candidates: \['layer1', 'layer2', 'pool', 'flat', 'fc'\]"):
        resolve_layers(net(), ["encoder.*"])


def test_rows_are_flattened_or_pooled_and_the_tag_says_which() -> None:
    model = net()
    for reduce, width in (("flatten", 2 * 5 * 5), ("avgpool", 2)):
        taps = LayerTaps({"layer1": model.layer1}, reduce)  # type: ignore[arg-type]
        taps.attach()
        model(torch.randn(6, 1, 5, 5))
        rows = taps.samples(6, None)["layer1"]
        assert rows.shape == (6, width) and not rows.requires_grad
        taps.remove()
    assert layer_tag("layer1", "avgpool") == "layer1@avgpool"
    pooled = LayerTaps({"a": nn.Identity()}, "avgpool")
    pooled._outputs = {"a": torch.arange(8.0).reshape(1, 2, 4)}
    assert pooled.samples(1, None)["a"].tolist() == [[1.5, 5.5]]


def test_token_layouts_give_one_row_per_position_and_wrong_shapes_are_errors() -> None:
    taps = LayerTaps({"block": nn.Identity()})
    taps._outputs = {"block": torch.zeros(2, 5, 3, 4)}
    assert taps.samples(2, (2, 5))["block"].shape == (10, 12)
    taps._outputs = {"block": torch.zeros(3, 7)}
    with pytest.raises(CaptureShapeError, match="`block`.*one row per token"):
        taps.samples(2, (2, 5))
    with pytest.raises(CaptureShapeError, match="`block`.*batch=2"):
        taps.samples(2, None)


def test_the_binding_hands_the_layers_rows_with_the_samples_and_forgets_them() -> None:
    model = net()
    binding = Binding(model, "fc", layers=["layer*"])
    model(torch.randn(4, 1, 5, 5))
    captured = binding.take()
    assert captured is not None and set(captured.layers) == {"layer1", "layer2"}
    assert captured.layers["layer2"].shape == (4, 3 * 25)
    assert binding.take() is None and binding.taps is not None and binding.taps.samples(4, None) == {}
    binding.close()
    model(torch.randn(4, 1, 5, 5))
    assert binding.taps.samples(4, None) == {}  # hooks removed


def test_tuple_outputs_keep_their_first_tensor() -> None:
    class Block(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
            return 2 * x, None

    block = Block()
    taps = LayerTaps({"block": block})
    taps.attach()
    block(torch.ones(2, 3))
    assert taps.samples(2, None)["block"].tolist() == [[2.0] * 3] * 2

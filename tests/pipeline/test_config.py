"""``pipeline.config``: every option validated once, with an error naming the option."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, TensorDataset

from lightning_neural_collapse import NeuralCollapseCallback
from lightning_neural_collapse.pipeline.config import Config


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("mode", "offline"),
        ("measure", "sometimes"),
        ("global_mean", "median"),
        ("accumulate_dtype", "float16"),
        ("every_n_epochs", 0),
        ("every_n_epochs", 1.5),
        ("every_n_epochs", True),
        ("num_classes", 1),
        ("num_classes", "10"),
        ("ignore_index", 0.5),
        ("tpt_threshold", 1.5),
        ("tpt_threshold", -0.1),
        ("tpt_threshold", "0"),
        ("prefix", ""),
        ("prefix", "nc/"),
        ("prefix", "my nc"),
        ("classifier", ""),
        ("features", 3),
        ("label_getter", "batch[1]"),
        ("input_getter", 7),
        ("log_histograms", "yes"),
        ("log_figure", 1),
        ("measure_val", "no"),
        ("ncc_samples", 0),
        ("ncc_samples", 2.5),
        ("val_names", "clean"),
        ("val_names", ("clean", "clean")),
        ("val_names", ("has space",)),
        ("val_names", ("",)),
        ("val_names", (3,)),
    ],
)
def test_a_wrong_value_names_its_option(option: str, value: Any) -> None:
    with pytest.raises(MisconfigurationException, match=rf"`{option}`"):
        Config(**{option: value})
    with pytest.raises(MisconfigurationException, match=rf"`{option}`"):  # the callback validates at construction
        NeuralCollapseCallback(**{option: value})


def test_ncc_samples_is_online_only() -> None:
    assert Config(ncc_samples=16).lagged_nc4_key == "nc4_ncc_mismatch_prev_means_sampled"
    with pytest.raises(MisconfigurationException, match=r"`ncc_samples`.*mode='online'"):
        Config(mode="exact", ncc_samples=16)


def test_exact_dataloader_needs_exact_mode_and_a_loader() -> None:
    loader = DataLoader(TensorDataset(torch.zeros(4, 2)), batch_size=2)
    assert Config(mode="exact", exact_dataloader=loader).exact_dataloader is loader
    assert callable(Config(mode="exact", exact_dataloader=lambda: loader).exact_dataloader)
    with pytest.raises(MisconfigurationException, match=r"`exact_dataloader`.*`mode='exact'`"):
        Config(exact_dataloader=loader)
    with pytest.raises(MisconfigurationException, match=r"`exact_dataloader` must be a DataLoader"):
        Config(mode="exact", exact_dataloader=[1, 2])


def test_defaults_and_derived_values() -> None:
    config = Config()
    assert (config.mode, config.every_n_epochs, config.prefix, config.dtype) == ("online", 1, "nc", torch.float64)
    assert Config(accumulate_dtype="float32").dtype == torch.float32
    assert Config().figure_name == "neural_collapse.png"
    assert Config(prefix="nc/layer3").figure_name == "neural_collapse_nc_layer3.png"
    assert Config(prefix="nc_val").figure_name != Config().figure_name  # one file per prefix
    assert Config().measure_val and Config().val_prefix == "nc_val"
    named = Config(val_names=["clean", "noisy"])  # a list, from a YAML file
    assert named.val_names == ("clean", "noisy")
    assert [named.val_tag(i, 3) for i in range(3)] == ["clean", "noisy", "dataloader_2"]  # fewer names: indices
    assert Config().val_tag(0, 1) == "" and Config().val_tag(0, 2) == "dataloader_0"

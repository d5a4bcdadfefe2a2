"""Every option of :class:`~lightning_neural_collapse.NeuralCollapseCallback`, validated once, in one place.

A wrong value raises :class:`~lightning.pytorch.utilities.exceptions.MisconfigurationException` at
construction, and the message names the option to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_neural_collapse.pipeline.layer_taps import LAYER_REDUCES, LayerReduce, layer_tag

Mode = Literal["online", "exact"]
Measure = Literal["always", "tpt"]
GlobalMeanChoice = Literal["classes", "sample"]
DtypeChoice = Literal["float64", "float32"]
ClassSubset = Literal["frequent", "random"]

MODES: tuple[str, ...] = ("online", "exact")
MEASURES: tuple[str, ...] = ("always", "tpt")
GLOBAL_MEANS: tuple[str, ...] = ("classes", "sample")
DTYPES: dict[str, torch.dtype] = {"float64": torch.float64, "float32": torch.float32}
CLASS_SUBSETS: tuple[str, ...] = ("frequent", "random")


@dataclass(frozen=True)
class Config:
    """The callback's options (see :class:`~lightning_neural_collapse.NeuralCollapseCallback` for each).

    Example:
        >>> Config(every_n_epochs=5).every_n_epochs
        5
        >>> Config(mode="fast")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning.fabric.utilities.exceptions.MisconfigurationException: `mode` must be one of ('online', ...
    """

    mode: Mode = "online"
    classifier: str | None = None
    features: str | None = None
    num_classes: int | None = None
    label_getter: Callable[[Any], Any] | None = None
    input_getter: Callable[[Any], Any] | None = None
    exact_dataloader: Any = None
    ignore_index: int | None = -100
    shift_labels: bool | None = None
    every_n_epochs: int = 1
    every_n_train_steps: int | None = None
    measure: Measure = "always"
    tpt_threshold: float = 0.0
    global_mean: GlobalMeanChoice = "classes"
    prefix: str = "nc"
    log_histograms: bool = True
    log_figure: bool = True
    accumulate_dtype: DtypeChoice = "float64"
    classes: int | tuple[int, ...] | None = None
    classes_from: ClassSubset = "frequent"
    classes_seed: int = 0
    measure_val: bool = True
    val_names: tuple[str, ...] | None = None
    ncc_samples: int | None = None
    layers: tuple[str, ...] | None = None
    layer_reduce: LayerReduce = "flatten"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("measure", self.measure, MEASURES)
        _choice("global_mean", self.global_mean, GLOBAL_MEANS)
        _choice("accumulate_dtype", self.accumulate_dtype, tuple(DTYPES))
        _choice("classes_from", self.classes_from, CLASS_SUBSETS)
        _choice("layer_reduce", self.layer_reduce, LAYER_REDUCES)
        layers = self.layers
        if layers is not None:
            if isinstance(layers, str) or not isinstance(layers, (list, tuple)) or not layers:
                raise MisconfigurationException(
                    "`layers` must be a non-empty list of dotted module names or globs such as ['layer*'], "
                    f"got {layers!r}"
                )
            for name in layers:
                if not isinstance(name, str) or not name or " " in name:
                    raise MisconfigurationException(
                        f"`layers` must hold dotted module names or globs such as 'layer3' or 'blocks.*', got {name!r}"
                    )
            object.__setattr__(self, "layers", tuple(layers))
        if self.shift_labels is not None and not isinstance(self.shift_labels, bool):
            raise MisconfigurationException(
                f"`shift_labels` must be True, False or None (automatic), got {self.shift_labels!r}"
            )
        steps = self.every_n_train_steps
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise MisconfigurationException(f"`every_n_train_steps` must be a positive integer or None, got {steps!r}")
        if steps is not None and self.mode != "online":
            raise MisconfigurationException(
                "`every_n_train_steps` measures windows of training steps from the steps' own features: it needs "
                "`mode='online'` (the exact pass is per epoch: use `every_n_epochs`)"
            )
        if steps is not None and self.every_n_epochs != 1:
            raise MisconfigurationException(
                "set `every_n_train_steps` (windows) or `every_n_epochs` (epochs), not both"
            )
        subset = self.classes
        if subset is not None:
            if isinstance(subset, (list, tuple)):
                if len(subset) < 2 or not all(_is_int(c) and c >= 0 for c in subset) or len(set(subset)) < len(subset):
                    raise MisconfigurationException(
                        f"`classes` must be a number of classes (>= 2) or a list of distinct class ids, got {subset!r}"
                    )
                object.__setattr__(self, "classes", tuple(int(c) for c in subset))
            elif not _is_int(subset) or subset < 2:
                raise MisconfigurationException(
                    f"`classes` must be a number of classes (>= 2) or a list of distinct class ids, got {subset!r}"
                )
        if not _is_int(self.classes_seed):
            raise MisconfigurationException(f"`classes_seed` must be an integer, got {self.classes_seed!r}")
        if self.ncc_samples is not None:
            if not _is_int(self.ncc_samples) or self.ncc_samples < 1:
                raise MisconfigurationException(
                    f"`ncc_samples` must be a positive number of samples per batch, got {self.ncc_samples!r}"
                )
            if self.mode != "online":
                raise MisconfigurationException(
                    "`ncc_samples` subsamples online mode's NC4 (against the previous means); exact mode's NC4 pass "
                    "counts every sample: drop `ncc_samples` or set `mode='online'`"
                )
        if not _is_int(self.every_n_epochs) or self.every_n_epochs < 1:
            raise MisconfigurationException(f"`every_n_epochs` must be a positive integer, got {self.every_n_epochs!r}")
        if self.num_classes is not None and (not _is_int(self.num_classes) or self.num_classes < 2):
            raise MisconfigurationException(f"`num_classes` must be an integer >= 2, got {self.num_classes!r}")
        if self.ignore_index is not None and not _is_int(self.ignore_index):
            raise MisconfigurationException(f"`ignore_index` must be an integer or None, got {self.ignore_index!r}")
        threshold = self.tpt_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
            raise MisconfigurationException(f"`tpt_threshold` must lie in [0, 1), got {threshold!r}")
        if not isinstance(self.prefix, str) or not self.prefix or self.prefix.endswith("/") or " " in self.prefix:
            raise MisconfigurationException(f"`prefix` must be a non-empty tag such as 'nc', got {self.prefix!r}")
        for name in ("classifier", "features"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise MisconfigurationException(f"`{name}` must be a dotted module name such as 'fc', got {value!r}")
        for name in ("label_getter", "input_getter"):
            getter = getattr(self, name)
            if getter is not None and not callable(getter):
                raise MisconfigurationException(f"`{name}` must be callable (batch -> tensor), got {getter!r}")
        names = self.val_names
        if names is not None:
            if isinstance(names, str) or not isinstance(names, (list, tuple)):
                raise MisconfigurationException(
                    f"`val_names` must be a list of names, one per validation dataloader, got {names!r}"
                )
            for name in names:
                if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_." for c in name):
                    raise MisconfigurationException(
                        f"`val_names` must hold tags of letters, digits, '-', '_' or '.', got {name!r}"
                    )
            if len(set(names)) < len(names):
                raise MisconfigurationException(f"`val_names` must be distinct, got {names!r}")
            object.__setattr__(self, "val_names", tuple(names))
        for name in ("log_histograms", "log_figure", "measure_val"):
            if not isinstance(getattr(self, name), bool):
                raise MisconfigurationException(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        if self.exact_dataloader is not None:
            if self.mode != "exact":
                raise MisconfigurationException(
                    "`exact_dataloader` is used by the exact pass only: set `mode='exact'` as well, or drop it"
                )
            if not (_is_loader(self.exact_dataloader) or callable(self.exact_dataloader)):
                raise MisconfigurationException(
                    "`exact_dataloader` must be a DataLoader or a function with no argument returning one, "
                    f"got {self.exact_dataloader!r}"
                )

    @property
    def windows(self) -> bool:
        """Whether the unit of measurement is a window of training steps (``every_n_train_steps``), not an epoch."""
        return self.every_n_train_steps is not None

    @property
    def val_prefix(self) -> str:
        """The first part of the held-out tags: ``<prefix>_val``.

        Example:
            >>> Config().val_prefix, Config(prefix="nc/layer3").val_prefix
            ('nc_val', 'nc/layer3_val')
        """
        return f"{self.prefix}_val"

    @property
    def lagged_nc4_key(self) -> str:
        """The key of online NC4: ``nc4_ncc_mismatch_prev_means``, with ``_sampled`` under ``ncc_samples=``.

        Example:
            >>> Config().lagged_nc4_key, Config(ncc_samples=64).lagged_nc4_key
            ('nc4_ncc_mismatch_prev_means', 'nc4_ncc_mismatch_prev_means_sampled')
        """
        return "nc4_ncc_mismatch_prev_means" + ("_sampled" if self.ncc_samples is not None else "")

    def val_tag(self, dataloader: int, dataloaders: int) -> str:
        """The sub-tag of validation dataloader ``dataloader`` of ``dataloaders``: ``""`` for a single loader,
        else its name in ``val_names`` or ``dataloader_<index>``.

        Example:
            >>> Config().val_tag(0, 1), Config().val_tag(1, 2), Config(val_names=("clean", "noisy")).val_tag(1, 2)
            ('', 'dataloader_1', 'noisy')
        """
        names = self.val_names
        if names is not None and dataloader < len(names):
            return names[dataloader]
        return "" if dataloaders == 1 else f"dataloader_{dataloader}"

    def layer_tag(self, name: str) -> str:
        """The tag part of layer ``name`` (``layers/<tag>/<key>``): the name, with ``@avgpool`` when pooled.

        Example:
            >>> Config(layers=("layer*",), layer_reduce="avgpool").layer_tag("layer3")
            'layer3@avgpool'
        """
        return layer_tag(name, self.layer_reduce)

    @property
    def dtype(self) -> torch.dtype:
        """``accumulate_dtype`` as a torch dtype."""
        return DTYPES[self.accumulate_dtype]

    @property
    def figure_name(self) -> str:
        """The file name of this instance's figure: ``neural_collapse.png`` for the prefix ``nc``, else
        ``neural_collapse_<prefix>.png`` with ``/`` turned into ``_`` (one file per prefix).

        Example:
            >>> Config(prefix="nc/layer3").figure_name
            'neural_collapse_nc_layer3.png'
        """
        if self.prefix == "nc":
            return "neural_collapse.png"
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.prefix)
        return f"neural_collapse_{safe}.png"


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MisconfigurationException(f"`{option}` must be one of {choices}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_loader(value: Any) -> bool:
    from torch.utils.data import DataLoader

    return isinstance(value, DataLoader)

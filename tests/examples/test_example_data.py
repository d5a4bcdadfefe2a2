"""The dataset helpers of the examples (``examples/data.py``): balanced digits and IDX folders."""

from __future__ import annotations

import gzip
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

_EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load_data_module():  # examples/ is not a package: load data.py by path
    spec = importlib.util.spec_from_file_location("examples_data", _EXAMPLES / "data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


data = _load_data_module()


# ------------------------------------------------------------------------------------------------ digits


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.reshape(x.shape[0], -1)}


def test_digits_balanced_counts_shapes_and_dtypes():
    train, test, num_classes, input_shape = data.load_digits_balanced(per_class=100, seed=0)
    x, y = train.tensors
    xt, yt = test.tensors
    assert num_classes == 10 and input_shape == (1, 8, 8)
    assert x.shape == (1000, 1, 8, 8) and xt.shape == (797, 1, 8, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and yt.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [100] * 10
    assert len(train) + len(test) == 1797
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) == 1.0


@pytest.mark.parametrize("per_class", [1, 37, 174])
def test_digits_other_sizes(per_class):
    splits = data.load_digits_balanced(per_class=per_class, seed=3)
    assert torch.bincount(splits.train.tensors[1], minlength=10).tolist() == [per_class] * 10
    assert len(splits.train) + len(splits.test) == 1797


def test_digits_deterministic_with_seed_and_seed_matters():
    a = data.load_digits_balanced(per_class=50, seed=7)
    b = data.load_digits_balanced(per_class=50, seed=7)
    c = data.load_digits_balanced(per_class=50, seed=8)
    for ta, tb in zip(a.train.tensors + a.test.tensors, b.train.tensors + b.test.tensors, strict=True):
        assert torch.equal(ta, tb)
    assert not torch.equal(a.train.tensors[0], c.train.tensors[0])


def test_digits_train_and_test_are_disjoint_and_cover_everything():
    from sklearn.datasets import load_digits

    splits = data.load_digits_balanced(per_class=100, seed=0)
    # load_digits holds a few exact duplicate images; compare indices through a (image, label) multiset
    source = load_digits()
    everything = sorted(
        (img.astype(np.float32).tobytes(), int(t)) for img, t in zip(source.images / 16.0, source.target, strict=True)
    )
    ours = sorted(
        (x.numpy().reshape(8, 8).astype(np.float32).tobytes(), int(t))
        for split in (splits.train, splits.test)
        for x, t in zip(*split.tensors, strict=True)
    )
    assert ours == everything  # every sample exactly once, in one split or the other
    train_idx = data.balanced_indices(source.target, 100, seed=0)
    test_idx = np.setdiff1d(np.arange(len(source.target)), train_idx)
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert len(np.unique(train_idx)) == 1000


def test_digits_standardize_uses_training_statistics():
    raw = data.load_digits_balanced(per_class=100, seed=0)
    std = data.load_digits_balanced(per_class=100, seed=0, standardize=True)
    x = std.train.tensors[0]
    assert torch.allclose(x.mean(dim=0), torch.zeros(1, 8, 8), atol=1e-5)
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-4
    assert torch.isfinite(std.test.tensors[0]).all()
    assert torch.equal(raw.train.tensors[1], std.train.tensors[1])


def test_digits_per_class_too_large_or_not_positive():
    with pytest.raises(ValueError, match="fewer than per_class"):
        data.load_digits_balanced(per_class=175)
    with pytest.raises(ValueError, match="positive"):
        data.load_digits_balanced(per_class=0)


def test_balanced_indices_sorted_unique_and_balanced():
    labels = np.array([0] * 5 + [1] * 9 + [2] * 4)
    idx = data.balanced_indices(labels, 3, seed=1)
    assert np.all(np.diff(idx) > 0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3]
    assert np.array_equal(idx, data.balanced_indices(labels, 3, seed=1))


# --------------------------------------------------------------------------------------------------- IDX


def _write_raw_idx(path: Path, array: np.ndarray, code: int, gz: bool) -> None:
    """An independent IDX writer (not data.write_idx), so that parsing is checked against the format."""
    big = array.astype(array.dtype.newbyteorder(">"))
    payload = bytes([0, 0, code, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload += big.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(rng: np.random.Generator, n_train: int = 60, n_test: int = 20, size: int = 5):
    y_train = np.repeat(np.arange(10, dtype=np.uint8), n_train // 10)
    rng.shuffle(y_train)
    y_test = rng.integers(0, 10, size=n_test).astype(np.uint8)
    x_train = rng.integers(0, 256, size=(n_train, size, size)).astype(np.uint8)
    x_test = rng.integers(0, 256, size=(n_test, size, size)).astype(np.uint8)
    return x_train, y_train, x_test, y_test


def _write_folder(folder: Path, arrays, gz: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    for name, arr in zip(names, arrays, strict=True):
        _write_raw_idx(folder / (name + suffix), arr, 0x08, gz)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_idx_folder_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    x_train, y_train, x_test, y_test = _fake_mnist(rng)
    _write_folder(tmp_path, (x_train, y_train, x_test, y_test), gz)
    train, test, num_classes, input_shape = data.load_idx_folder(tmp_path)
    assert num_classes == 10 and input_shape == (1, 5, 5)
    xt, yt = train.tensors
    assert xt.dtype == torch.float32 and yt.dtype == torch.int64
    assert xt.shape == (60, 1, 5, 5)
    np.testing.assert_array_equal(yt.numpy(), y_train)
    np.testing.assert_allclose(xt.numpy()[:, 0], x_train / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(test.tensors[1].numpy(), y_test)
    np.testing.assert_allclose(test.tensors[0].numpy()[:, 0], x_test / 255.0, rtol=1e-6)


def test_idx_folder_balanced_subsample(tmp_path):
    rng = np.random.default_rng(1)
    x_train, y_train, x_test, y_test = _fake_mnist(rng, n_train=100)
    _write_folder(tmp_path, (x_train, y_train, x_test, y_test), gz=True)
    splits = data.load_idx_folder(tmp_path, per_class=4, seed=2)
    assert torch.bincount(splits.train.tensors[1], minlength=10).tolist() == [4] * 10
    assert len(splits.test) == len(y_test)  # the test split stays whole
    again = data.load_idx_folder(tmp_path, per_class=4, seed=2)
    assert torch.equal(splits.train.tensors[0], again.train.tensors[0])
    # each chosen image is the source image of its label
    idx = data.balanced_indices(y_train, 4, seed=2)
    np.testing.assert_allclose(splits.train.tensors[0].numpy()[:, 0], x_train[idx] / 255.0, rtol=1e-6)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-3, 0, 7], dtype=np.int8),
        np.array([[-300, 2], [5, 32000]], dtype=np.int16),
        np.array([1, -2, 2**30], dtype=np.int32),
        np.array([[0.5, -1.25]], dtype=np.float32),
        np.array([np.pi, -np.e], dtype=np.float64),
    ],
    ids=lambda a: str(a.dtype),
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_write_idx_all_types(tmp_path, array, suffix):
    path = tmp_path / ("x.idx" + suffix)
    data.write_idx(path, array)
    back = data.read_idx(path)
    assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    # and the bytes are big-endian IDX that an independent writer produces too
    other = tmp_path / ("y.idx" + suffix)
    code = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}[array.dtype.str[1:]]
    _write_raw_idx(other, array, code, gz=bool(suffix))
    np.testing.assert_array_equal(data.read_idx(other), array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        data.read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match="shape"):
        data.read_idx(short)


def test_idx_folder_missing_files_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_idx_folder(tmp_path / "nowhere")
    rng = np.random.default_rng(0)
    x_train, y_train, x_test, y_test = _fake_mnist(rng)
    _write_folder(tmp_path, (x_train, y_train, x_test, y_test), gz=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError) as info:
        data.load_idx_folder(tmp_path)
    message = str(info.value)
    assert "t10k-labels-idx1-ubyte" in message and str(tmp_path) in message
    assert "lacks t10k-labels-idx1-ubyte" in message  # only the missing one is listed as missing


def test_load_dataset_dispatch(tmp_path):
    assert len(data.load_dataset("digits", per_class=20).train) == 200
    with pytest.raises(ValueError, match="data-dir"):
        data.load_dataset("idx")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar")

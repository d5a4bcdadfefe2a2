"""Dataset helpers for the examples: small, offline, balanced image classification sets.

Every loader returns a :class:`DataSplits` (a named tuple, so it unpacks as
``train, test, num_classes, input_shape = load_...()``):

- ``train`` / ``test``: :class:`torch.utils.data.TensorDataset` of ``float32`` images shaped
  ``(N, *input_shape)`` and ``int64`` labels shaped ``(N,)``;
- ``num_classes``: ``C``;
- ``input_shape``: the shape of one image, ``(1, H, W)``.

Two sources, both available without internet:

- :func:`load_digits_balanced`: scikit-learn's bundled ``load_digits`` (1,797 8x8 grey images of the digits
  0-9, about 180 per class). Papyan, Han and Donoho (PNAS 2020) trained on class-balanced subsets, so that
  every class carries the same weight in the loss and in the class-mean geometry that Neural Collapse is
  about; we take exactly ``per_class`` training images of every class with a seeded generator and keep the
  rest as the held-out test split.
- :func:`load_idx_folder`: a local folder holding the four IDX files of MNIST, Fashion-MNIST, KMNIST and the
  like (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
  ``t10k-labels-idx1-ubyte``, each optionally ``.gz``), parsed with numpy, with an optional balanced
  subsample of the training split.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "IDX_FILES",
    "DataSplits",
    "balanced_indices",
    "class_counts",
    "load_dataset",
    "load_digits_balanced",
    "load_idx_folder",
    "read_idx",
    "write_idx",
]


class DataSplits(NamedTuple):
    """A train and a test split with what a model needs to know about them."""

    train: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]


def balanced_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of exactly ``per_class`` samples of every class present in ``labels``, chosen at random.

    The choice depends on ``seed`` only (``numpy.random.default_rng``), not on global random state. The
    result is sorted, so that the order of the samples stays that of the source.

    Raises:
        ValueError: ``per_class`` is not positive or a class has fewer than ``per_class`` samples.
    """
    labels = np.asarray(labels)
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < per_class:
            raise ValueError(f"class {int(c)} has only {idx.size} samples, fewer than per_class={per_class}")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Subtract the training set's mean image and divide by its overall pixel std (one number).

    One scalar std rather than one per pixel: border pixels that are always 0 in the training images
    would otherwise be divided by (almost) zero and blow up on the test images.
    """
    mean = train.mean(axis=0, keepdims=True)
    std = float((train - mean).std()) or 1.0
    return (train - mean) / std, (test - mean) / std


def load_digits_balanced(per_class: int = 100, seed: int = 0, standardize: bool = False) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, ``per_class`` training images per class, the rest for testing.

    Pixel values (0-16 in the source) are divided by 16, to [0, 1]; with ``standardize=True`` they are
    then centred on the training mean image and divided by the training pixel std.

    Args:
        per_class: training images per class; the smallest class has 174 images in all, so at most 174
            (and then a test split with very few images of that class).
        seed: selects which images go to training; the same seed gives the same split.
        standardize: standardise with training-set statistics (see :func:`_standardize`).

    Returns:
        :class:`DataSplits` with 10 classes and ``input_shape == (1, 8, 8)``.

    Example:
        >>> splits = load_digits_balanced(per_class=50)
        >>> len(splits.train), len(splits.test), splits.num_classes, splits.input_shape
        (500, 1297, 10, (1, 8, 8))
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32)[:, None, :, :] / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx = balanced_indices(labels, per_class, seed)
    test_mask = np.ones(len(labels), dtype=bool)
    test_mask[train_idx] = False
    x_train, x_test = images[train_idx], images[test_mask]
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
    num_classes = int(labels.max()) + 1
    return DataSplits(
        _dataset(x_train, labels[train_idx]),
        _dataset(x_test, labels[test_mask]),
        num_classes,
        tuple(images.shape[1:]),
    )


# ---------------------------------------------------------------------------------------------- IDX files

#: The four files of an MNIST-style folder, by role; each may also end in ``.gz``.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# IDX type codes (third byte of the magic number) to big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _open(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse one IDX file (plain, or gzip-compressed when the name ends in ``.gz``) into a numpy array.

    The format: two zero bytes, a type code, the number of dimensions ``d``, then ``d`` big-endian int32
    sizes, then the values in C order, big-endian.

    Raises:
        ValueError: the file is not an IDX file, or its length does not match its header.
    """
    path = os.fspath(path)
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: header promises shape {shape} ({expected} bytes of data), file holds {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))  # native byte order, and a writable copy


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzip-compressed when the name ends in ``.gz``); inverse of :func:`read_idx`."""
    path = os.fspath(path)
    array = np.asarray(array)
    matches = [
        (code, dtype)
        for code, dtype in _IDX_DTYPES.items()
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize
    ]
    if not matches:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    code, dtype = matches[0]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find_idx(folder: str, name: str) -> str | None:
    # Both the canonical name and the ".idx3-ubyte" spelling of some mirrors, plain or gzip-compressed.
    variants = [name, name.replace("-idx", ".idx")]
    for v in variants:
        for candidate in (v, v + ".gz"):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return None


def _to_images(raw: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` (or ``(N, C, H, W)``) raw values to float32 ``(N, C, H, W)``, 8-bit values divided by 255."""
    x = raw.astype(np.float32)
    if raw.dtype == np.uint8:
        x /= 255.0
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 2:  # already flat vectors: (N, D) -> (N, 1, 1, D) keeps the (C, H, W) convention
        x = x[:, None, None, :]
    return x


def load_idx_folder(
    path: str | os.PathLike[str],
    per_class: int | None = None,
    seed: int = 0,
    standardize: bool = False,
) -> DataSplits:
    """MNIST-style IDX files from a local folder, optionally with a class-balanced training subsample.

    Args:
        path: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).
        per_class: when given, keep exactly this many training images per class (seeded choice, as
            :func:`balanced_indices`); the test split is always kept whole.
        seed: seed of the subsample.
        standardize: standardise with training-set statistics (as in :func:`load_digits_balanced`).

    Returns:
        :class:`DataSplits`; 8-bit pixels are scaled to [0, 1] and ``input_shape`` is ``(1, H, W)``.

    Raises:
        FileNotFoundError: the folder or one of the four files is missing; the message names them.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"IDX folder {folder!r} does not exist; it must hold "
            + ", ".join(IDX_FILES.values())
            + " (each optionally .gz)"
        )
    found = {role: _find_idx(folder, name) for role, name in IDX_FILES.items()}
    missing = [IDX_FILES[role] for role, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"IDX folder {folder!r} lacks {', '.join(missing)} (plain or .gz); an MNIST-style folder holds "
            + ", ".join(IDX_FILES.values())
        )
    arrays = {role: read_idx(p) for role, p in found.items() if p is not None}
    x_train, y_train = _to_images(arrays["train_images"]), arrays["train_labels"].astype(np.int64)
    x_test, y_test = _to_images(arrays["test_images"]), arrays["test_labels"].astype(np.int64)
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ValueError(f"{folder}: {split} split has {len(x)} images but {len(y)} labels")
    if per_class is not None:
        idx = balanced_indices(y_train, per_class, seed)
        x_train, y_train = x_train[idx], y_train[idx]
    if standardize:
        x_train, x_test = _standardize(x_train, x_test)
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
    return DataSplits(_dataset(x_train, y_train), _dataset(x_test, y_test), num_classes, tuple(x_train.shape[1:]))


def load_dataset(
    name: str,
    data_dir: str | None = None,
    per_class: int | None = 100,
    seed: int = 0,
    standardize: bool = False,
) -> DataSplits:
    """Dispatch on ``name``: ``"digits"`` (:func:`load_digits_balanced`) or ``"idx"`` (:func:`load_idx_folder`)."""
    if name == "digits":
        per_class = 100 if per_class is None else per_class
        return load_digits_balanced(per_class=per_class, seed=seed, standardize=standardize)
    if name == "idx":
        if data_dir is None:
            raise ValueError("the idx dataset needs a folder (--data-dir) holding " + ", ".join(IDX_FILES.values()))
        return load_idx_folder(data_dir, per_class=per_class, seed=seed, standardize=standardize)
    raise ValueError(f"unknown dataset {name!r}; choose 'digits' or 'idx'")


def class_counts(labels: Sequence[int] | torch.Tensor, num_classes: int) -> list[int]:
    """Samples per class, ``[n_0, ..., n_{C-1}]`` (a convenience for printing and tests)."""
    return torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=num_classes).tolist()

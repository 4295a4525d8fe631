"""Readers for users' data files: MNIST IDX (plain or .gz), CIFAR-10 python batches, ``.npz``.

Each returns :class:`~jbp.data.dataset.Dataset` (NHWC images, int32 labels); a missing, corrupt
or truncated file raises :class:`~jbp.data.dataset.DataError` naming the file and what was wrong.
CIFAR-10's pickles are read without executing code (:class:`_PlainUnpickler`).
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from typing import Tuple

import numpy as np

from jbp.data.dataset import DataError, Dataset, _check_pair, _require_file

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


# --- MNIST IDX files ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """One IDX file (plain or gzip): magic 0x0000TTDD (type TT, DD dimensions), sizes, data."""
    _require_file(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            blob = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from e
    if len(blob) < 4:
        raise DataError(f"{path}: truncated: {len(blob)} bytes, no IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", blob[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(f"{path}: not an IDX file (magic bytes {blob[:4].hex()})")
    header = 4 + 4 * ndim
    if len(blob) < header:
        raise DataError(f"{path}: truncated header ({len(blob)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", blob[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(blob) - header != expected:
        raise DataError(f"{path}: truncated or padded: header says {shape} ({expected} data "
                        f"bytes), file has {len(blob) - header}")
    return np.frombuffer(blob, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_idx(images_path: str, labels_path: str) -> Dataset:
    """MNIST-format IDX images (N, H, W) and labels (N,), plain or .gz."""
    x, y = read_idx(images_path), read_idx(labels_path)
    if y.ndim != 1:
        raise DataError(f"{labels_path}: labels must be 1-D, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{images_path} has {x.shape[0]} images but {labels_path} has "
                        f"{y.shape[0]} labels")
    return _check_pair(images_path, x, y)


# --- CIFAR-10 python batches -------------------------------------------------------------------

class _PlainUnpickler(pickle.Unpickler):
    """CIFAR-10 batches hold dicts, lists, bytes and numpy arrays: admit nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
               ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_cifar_batch(path: str) -> Dataset:
    _require_file(path)
    try:
        with open(path, "rb") as f:
            batch = _PlainUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {keys}")
    data = np.asarray(batch[b"data"])
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' must have shape (N, 3072), got {data.shape}")
    x = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)   # NCHW -> NHWC
    return _check_pair(path, x, np.asarray(batch[b"labels"], np.int64))


def load_cifar10(directory: str) -> Tuple[Dataset, Dataset]:
    """(train, test) from the extracted ``cifar-10-batches-py`` directory."""
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no such directory (expected the extracted "
                        f"cifar-10-batches-py folder with data_batch_1..5 and test_batch: "
                        f"download cifar-10-python.tar.gz, extract it, and point data.path "
                        f"at that folder, e.g. --set data.path=/data/cifar-10-batches-py)")
    train = [read_cifar_batch(os.path.join(directory, f"data_batch_{i}")) for i in range(1, 6)]
    test = read_cifar_batch(os.path.join(directory, "test_batch"))
    return Dataset(np.concatenate([b.x for b in train]), np.concatenate([b.y for b in train])), test


# --- .npz with x / y ---------------------------------------------------------------------------

def load_npz(path: str) -> Dataset:
    """A ``.npz`` with arrays ``x`` (N, H, W[, C]) and ``y`` (N,)."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {"x", "y"} - set(f.files)
            if missing:
                raise DataError(f"{path}: missing array(s) {sorted(missing)}; found {f.files}")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    return _check_pair(path, x, y)

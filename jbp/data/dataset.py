"""What every reader returns and checks: :class:`Dataset`, :class:`DataError`, labels, digests."""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple

import numpy as np


class DataError(ValueError):
    """A data file is missing, malformed, or inconsistent with what was asked of it."""


class Dataset(NamedTuple):
    """Images ``x`` (N, H, W, C), uint8 0..255 or float in [0, 1], and integer labels ``y`` (N,)."""

    x: np.ndarray
    y: np.ndarray

    @property
    def num_examples(self) -> int:
        return int(self.y.shape[0])


def arrays_digest(arrays) -> str:
    """SHA-256 over the named arrays' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _require_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: not a file")


def _check_pair(path: str, x: np.ndarray, y: np.ndarray) -> Dataset:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise DataError(f"{path}: images must have shape (N, H, W, C) or (N, H, W), got {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: {x.shape[0]} images but labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise DataError(f"{path}: labels must be >= 0, found {int(y.min())}")
    return Dataset(x, y.astype(np.int32))


def check_labels(ds: Dataset, num_classes: int, source: str) -> None:
    """Every label must lie in [0, num_classes): a mismatch names the file and the label."""
    if ds.y.size and int(ds.y.max()) >= num_classes:
        raise DataError(f"{source}: found label {int(ds.y.max())} but the model has "
                        f"num_classes={num_classes} (labels must lie in [0, {num_classes}))")

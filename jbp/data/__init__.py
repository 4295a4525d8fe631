"""Datasets: the shipped MNIST subset, loaders for user data, and a deterministic batcher.

Everything here is offline and plain numpy; arrays reach JAX only as batches.

- :func:`load_mnist` — the MNIST subset shipped in ``jbp/data/mnist.npz`` (10,000 images of the
  official training set, the official 10,000-image test set; CC BY-SA 3.0, see DATA_LICENSE),
  verified against a SHA-256 of its arrays.
- :func:`load_idx` (MNIST IDX files, plain or .gz), :func:`load_cifar10` (the CIFAR-10 python
  pickle batches, read without executing code), :func:`load_npz` (``x``/``y`` arrays).
- :func:`batches` — fixed-size, seeded, shuffled batches as normalised NHWC float32.

A missing, corrupt or truncated file raises :class:`DataError` naming the file and what was wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import numpy as np

MNIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.npz")
MNIST_ARRAYS_SHA256 = "47c7a5b2e6f31ccdd72a36a1fdca3dacca7e43302f894ce04f2d5ee427cd51ab"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081          # of the full MNIST training set, as in PyTorch
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


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


# --- the shipped MNIST subset ------------------------------------------------------------------

def load_mnist(path: str = MNIST_PATH, *, verify: bool = True) -> Tuple[Dataset, Dataset]:
    """(train, test) from the shipped ``mnist.npz`` (or a file of the same layout)."""
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except KeyError as e:
        raise DataError(f"{path}: missing array {e}; expected x_train, y_train, x_test, y_test")
    except Exception as e:   # zipfile.BadZipFile, EOFError, ValueError from a torn file
        raise DataError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    if verify and path == MNIST_PATH and MNIST_ARRAYS_SHA256:
        digest = arrays_digest(arrays)
        if digest != MNIST_ARRAYS_SHA256:
            raise DataError(f"{path}: array SHA-256 {digest} != expected {MNIST_ARRAYS_SHA256}; "
                            f"rebuild it with scripts/make_mnist_npz.py")
    return (_check_pair(path, arrays["x_train"], arrays["y_train"]),
            _check_pair(path, arrays["x_test"], arrays["y_test"]))


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
                        f"cifar-10-batches-py folder with data_batch_1..5 and test_batch)")
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


# --- batching ----------------------------------------------------------------------------------

def normalize(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Integer 0..255 (or float 0..1) NHWC -> float32 ``(x − mean) / std`` per channel."""
    scale = 1.0 / 255.0 if np.issubdtype(x.dtype, np.integer) else 1.0
    x = x.astype(np.float32) * np.float32(scale)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def random_shift(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate each NHWC image by up to ±``max_shift`` pixels per axis, filling with zeros."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)))
    dy, dx = rng.integers(0, 2 * max_shift + 1, (2, n))
    rows = (dy[:, None] + np.arange(h))[:, :, None]            # (n, h, 1)
    cols = (dx[:, None] + np.arange(w))[:, None, :]            # (n, 1, w)
    return padded[np.arange(n)[:, None, None], rows, cols]


def batches(ds: Dataset, batch_size: int, *, mean: Sequence[float], std: Sequence[float],
            seed: int = 0, epoch: int = 0, train: bool = True, start: int = 0,
            augment_shift: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield ``(x, y)``: x float32 (B, H, W, C) normalised, y int32 (B,).

    ``train=True`` shuffles with (seed, epoch) and drops the last partial batch (every step sees
    ``batch_size`` examples, so the jitted step compiles once); ``train=False`` keeps order and
    the last partial batch. ``start`` skips that many batches (to resume mid-epoch).
    ``augment_shift`` > 0 (training only) translates images by up to that many pixels, with
    shifts drawn from (seed, epoch, batch index): the same run sees the same images.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n = ds.num_examples
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=train)
    stop = (n // batch_size) * batch_size if train else n
    for b, lo in enumerate(range(start * batch_size, stop, batch_size), start=start):
        idx = order[lo:lo + batch_size]
        x = ds.x[idx]
        if train and augment_shift:
            x = random_shift(x, augment_shift, np.random.default_rng((seed, epoch, b, 1)))
        yield normalize(x, mean, std), ds.y[idx]


def num_batches(ds: Dataset, batch_size: int, *, train: bool) -> int:
    n = ds.num_examples
    return n // batch_size if train else -(-n // batch_size)


def subset(ds: Dataset, limit: Optional[int]) -> Dataset:
    """The first ``limit`` examples (all when None)."""
    return ds if limit is None else Dataset(ds.x[:limit], ds.y[:limit])


def load_dataset(cfg, num_classes: Optional[int] = None) -> Tuple[Dataset, Dataset]:
    """(train, test) for a ``jbp.config.DataConfig``; limits applied; clear errors for paths.

    With ``num_classes``, every label must lie in [0, num_classes) (see :func:`check_labels`).
    """
    if cfg.dataset == "mnist":
        train, test = load_mnist(cfg.path or MNIST_PATH)
    elif cfg.dataset == "cifar10":
        train, test = load_cifar10(cfg.path)
    elif cfg.dataset == "npz":
        if not cfg.test_path:
            raise DataError(f"{cfg.path}: dataset 'npz' needs data.test_path for the test set")
        train, test = load_npz(cfg.path), load_npz(cfg.test_path)
    elif cfg.dataset == "mnist_idx":
        for key in ("path", "labels_path", "test_path", "test_labels_path"):
            if not getattr(cfg, key):
                raise DataError(f"dataset 'mnist_idx' needs data.{key} (images and labels files "
                                f"for train and test)")
        train = load_idx(cfg.path, cfg.labels_path)
        test = load_idx(cfg.test_path, cfg.test_labels_path)
    else:
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    train, test = subset(train, cfg.train_limit), subset(test, cfg.test_limit)
    channels = train.x.shape[-1]
    if len(cfg.mean) != channels:
        raise DataError(f"{cfg.path or cfg.dataset}: images have {channels} channel(s) but "
                        f"data.mean/std give {len(cfg.mean)}")
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"train images {train.x.shape[1:]} and test images {test.x.shape[1:]} "
                        f"differ in shape")
    if num_classes is not None:
        check_labels(train, num_classes, cfg.path or "shipped MNIST")
        check_labels(test, num_classes, cfg.test_path or cfg.path or "shipped MNIST")
    return train, test

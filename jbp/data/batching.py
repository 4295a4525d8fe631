"""From a :class:`~jbp.data.dataset.Dataset` to training batches: normalisation, the seeded epoch
order, random shifts, fixed-size batches. Plain numpy; arrays reach JAX only as batches."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import numpy as np

from jbp.data.dataset import Dataset


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

"""MNIST scenes: a segmentation set generated deterministically from the shipped MNIST (the M2NIST
idea: several digits on one canvas, a class per pixel).

Each canvas is ``SIZE × SIZE`` (64) pixels, one channel, uint8, black; on it 1 to 4 digits
(uniformly) are placed, each a 28×28 MNIST image chosen uniformly at random and put at a top-left
corner drawn uniformly from ``[0, SIZE − 28]²`` (digits may overlap). Training canvases draw from
the 60,000 MNIST training digits, test canvases from the 10,000 test digits, so no test digit
was ever seen in training.

- Image: the pixelwise maximum of the digits drawn (ink does not add up past white).
- Labels, ``(SIZE, SIZE)`` uint8: 0 = background, ``1 + d`` on the *stroke* pixels of a digit
  of class ``d`` (1–10). A stroke pixel is one where that digit's own intensity is at least
  :data:`STROKE_THRESHOLD` (128 of 255, half ink); fainter anti-aliased edge pixels stay
  background (0): no ``ignore_index`` is needed, and a model is not asked to guess where the
  faint halo ends. Overlap: where strokes of several digits cover a pixel, the digit placed
  *last* owns it (it is drawn on top).

Generation is seeded (``numpy.random.default_rng([seed, 0])`` for training canvases, ``[seed,
1]`` for test canvases), so the same seed gives the same arrays on every machine. The arrays are
cached on first use, as ``.npz`` under ``$JBP_CACHE_DIR`` (default ``$XDG_CACHE_HOME/jbp``, else
``~/.cache/jbp``) or at the path ``data.path`` names, with the SHA-256 of their arrays
(:func:`jbp.data.arrays_digest`) stored beside them; a cache whose arrays do not match their
digest is regenerated. For the default arguments the digest must also equal
:data:`SCENES_SHA256` (generation is then checked to be the one this module documents).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Optional, Tuple

import numpy as np

from jbp.data.dataset import DataError, Dataset, arrays_digest
from jbp.data.mnist import MNIST_PATH, load_mnist

SIZE = 64                       # canvas height and width, pixels
MAX_DIGITS = 4                  # 1..MAX_DIGITS digits per canvas
STROKE_THRESHOLD = 128          # a digit's pixel >= this (of 255) is labelled with its class
NUM_CLASSES = 11                # background + 10 digits
NUM_TRAIN, NUM_TEST = 6000, 1000
#: Per-channel mean and std of the default training canvases (pixels in [0, 1]).
SCENES_MEAN, SCENES_STD = (0.0592,), (0.2182,)
#: SHA-256 of the default arrays (seed 0, 6,000 + 1,000 canvases of 64×64).
SCENES_SHA256 = "678d08cbd3e48eb346939546cdba2f15bc268b9e0f8a2252e7c7cd503fc65a70"


def compose(digits: np.ndarray, digit_labels: np.ndarray, corners, size: int = SIZE):
    """One canvas and its labels from 28×28 uint8 ``digits`` placed at ``corners`` ((row, col)
    top-left each), in order (module docstring: max of the ink, the last digit owns its strokes)."""
    image = np.zeros((size, size), np.uint8)
    labels = np.zeros((size, size), np.uint8)
    for digit, label, (r, c) in zip(digits, digit_labels, corners):
        h, w = digit.shape
        window = (slice(r, r + h), slice(c, c + w))
        image[window] = np.maximum(image[window], digit)
        labels[window] = np.where(digit >= STROKE_THRESHOLD, 1 + int(label), labels[window])
    return image, labels


def generate(source: Dataset, count: int, rng: np.random.Generator,
             size: int = SIZE) -> Dataset:
    """``count`` canvases from the digits of ``source`` (x (M, 28, 28, 1) uint8, y (M,)):
    x (count, size, size, 1) uint8, y (count, size, size) uint8."""
    digits = source.x[..., 0]
    side = digits.shape[1]
    if size < side:
        raise DataError(f"mnist_scenes: a canvas of {size} pixels cannot hold a {side}-pixel "
                        f"digit")
    xs = np.zeros((count, size, size, 1), np.uint8)
    ys = np.zeros((count, size, size), np.uint8)
    for i in range(count):
        k = int(rng.integers(1, MAX_DIGITS + 1))
        chosen = rng.integers(0, digits.shape[0], k)
        corners = rng.integers(0, size - side + 1, (k, 2))
        xs[i, :, :, 0], ys[i] = compose(digits[chosen], source.y[chosen], corners, size)
    return Dataset(xs, ys)


def cache_path(seed: int, num_train: int, num_test: int, size: int) -> str:
    """The default cache file: in ``$JBP_CACHE_DIR``, else ``$XDG_CACHE_HOME/jbp``, else
    ``~/.cache/jbp`` (where the oneDNN kernels are cached too)."""
    root = os.environ.get("JBP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jbp")
    return os.path.join(root, f"mnist_scenes-s{seed}-{num_train}-{num_test}-{size}px.npz")


def _read(path: str) -> Optional[dict]:
    """The cached arrays if the file holds them and they match their stored digest, else None."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            stored = str(f["sha256"])
    except Exception:          # missing, torn, not an npz, an array missing
        return None
    return arrays if arrays_digest(arrays) == stored else None


def _write(path: str, arrays: dict) -> None:
    """Atomically: a temporary file in the same directory, then a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, sha256=np.asarray(arrays_digest(arrays)), **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_mnist_scenes(path: str = "", *, seed: int = 0, num_train: int = NUM_TRAIN,
                      num_test: int = NUM_TEST, size: int = SIZE,
                      mnist_path: str = MNIST_PATH) -> Tuple[Dataset, Dataset]:
    """(train, test) MNIST scenes (module docstring), from the cache at ``path`` (default
    :func:`cache_path`) or generated there on first use."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise DataError(f"{path}: no such directory for the MNIST scenes' cache file (data.path "
                        f"names the file; leave it empty for the default cache)")
    path = path or cache_path(seed, num_train, num_test, size)
    arrays = _read(path) if os.path.exists(path) else None
    if arrays is None:
        if os.path.exists(path):
            warnings.warn(f"{path}: the cached MNIST scenes do not match their SHA-256; "
                          f"generating them again", stacklevel=2)
        mnist_train, mnist_test = load_mnist(mnist_path)
        train = generate(mnist_train, num_train, np.random.default_rng([seed, 0]), size)
        test = generate(mnist_test, num_test, np.random.default_rng([seed, 1]), size)
        arrays = {"x_train": train.x, "y_train": train.y, "x_test": test.x, "y_test": test.y}
        try:
            _write(path, arrays)
        except OSError as e:          # a read-only home: use the arrays, say so once
            warnings.warn(f"{path}: cannot cache the MNIST scenes ({e}); they will be "
                          f"generated again next time", stacklevel=2)
    default = (seed, num_train, num_test, size, mnist_path) == (0, NUM_TRAIN, NUM_TEST, SIZE,
                                                               MNIST_PATH)
    if default and SCENES_SHA256 and arrays_digest(arrays) != SCENES_SHA256:
        raise DataError(f"{path}: MNIST scenes with SHA-256 {arrays_digest(arrays)} != expected "
                        f"{SCENES_SHA256}: the generator no longer makes the documented set "
                        f"(delete the file to regenerate it)")
    return (Dataset(arrays["x_train"], arrays["y_train"].astype(np.int32)),
            Dataset(arrays["x_test"], arrays["y_test"].astype(np.int32)))

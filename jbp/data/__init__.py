"""Datasets: the shipped MNIST, loaders for user data, and a deterministic batcher.

Everything here is offline and plain numpy; arrays reach JAX only as batches.

- :func:`load_mnist` — the MNIST shipped in ``jbp/data/mnist.npz`` (the official 60,000 training
  images, the official 10,000-image test set; CC BY-SA 3.0, see DATA_LICENSE), verified against
  a SHA-256 of its arrays (:mod:`jbp.data.mnist`); ``data.train_limit = 10000`` keeps the first
  10,000, the subset jbp shipped before.
- :func:`load_idx` (MNIST IDX files, plain or .gz), :func:`load_cifar10` (the CIFAR-10 python
  pickle batches, read without executing code), :func:`load_npz` (``x``/``y`` arrays)
  (:mod:`jbp.data.readers`).
- :func:`load_mnist_scenes` — a segmentation set generated deterministically from the shipped
  MNIST (64×64 canvases of 1–4 digits, a class per pixel; :mod:`jbp.data.mnist_scenes`),
  cached with a checksum on first use.
- :func:`batches` — fixed-size, seeded, shuffled batches as normalised NHWC float32
  (:mod:`jbp.data.batching`).
- :func:`load_dataset` — (train, test) for a ``[data]`` config table, one of :data:`DATASETS`.
- :func:`open_source` — what :func:`jbp.train.fit` reads: the in-memory sets above, or
  ImageNet-style image folders (``"image_folder"``) streamed through Grain with decoding on worker
  processes, augmentation, per-process shards and a checkpointable position (the ``[data]``
  extra; :mod:`jbp.data.source`, :mod:`jbp.data.image_folder`, docs/data.md).

A missing, corrupt or truncated file raises :class:`DataError` naming the file and what was wrong
(:mod:`jbp.data.dataset`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from jbp.data.batching import batches, epoch_order, normalize, num_batches, random_shift, subset
from jbp.data.dataset import DataError, Dataset, arrays_digest, check_labels
from jbp.data.mnist import MNIST_ARRAYS_SHA256, MNIST_MEAN, MNIST_PATH, MNIST_STD, load_mnist
from jbp.data.mnist_scenes import load_mnist_scenes
from jbp.data.readers import (CIFAR10_MEAN, CIFAR10_STD, load_cifar10, load_idx, load_npz,
                              read_cifar_batch, read_idx)
from jbp.data.source import IMAGENET_MEAN, IMAGENET_STD, FolderSource, MemorySource, open_source

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "DATASETS", "DataError", "Dataset", "FolderSource",
    "IMAGENET_MEAN", "IMAGENET_STD", "MNIST_ARRAYS_SHA256", "MNIST_MEAN", "MNIST_PATH",
    "MNIST_STD", "MemorySource", "arrays_digest", "batches", "check_labels", "epoch_order",
    "load_cifar10", "load_dataset", "load_idx", "load_mnist", "load_mnist_scenes", "load_npz",
    "normalize", "SEGMENTATION_DATASETS",
    "num_batches", "open_source", "random_shift", "read_cifar_batch", "read_idx", "subset",
]

DATASETS = ("mnist", "mnist_idx", "cifar10", "npz", "image_folder",   # values of data.dataset
            "mnist_scenes")
#: The datasets whose labels are a class per pixel (N, H, W): fit evaluates IoU on them.
SEGMENTATION_DATASETS = ("mnist_scenes",)


def _pad(dataset: Dataset, pad: int) -> Dataset:
    """Each image with ``pad`` zero pixels on every side (``data.pad``), before normalisation:
    the value of MNIST's own black background."""
    return dataset._replace(x=np.pad(dataset.x, ((0, 0), (pad, pad), (pad, pad), (0, 0))))


def load_dataset(cfg, num_classes: Optional[int] = None) -> Tuple[Dataset, Dataset]:
    """(train, test) for a ``jbp.config.DataConfig``; limits and ``data.pad`` applied; clear errors for paths.

    With ``num_classes``, every label must lie in [0, num_classes) (see :func:`check_labels`).
    """
    if cfg.dataset == "mnist":
        train, test = load_mnist(cfg.path or MNIST_PATH)
    elif cfg.dataset == "mnist_scenes":
        if cfg.augment_shift:
            raise DataError("data.augment_shift: shifts move the images but not their per-pixel "
                            "labels; use 0 with data.dataset='mnist_scenes'")
        train, test = load_mnist_scenes(cfg.path, num_train=cfg.scenes_train)
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
    elif cfg.dataset == "image_folder":
        raise DataError(f"{cfg.path}: data.dataset='image_folder' is streamed, not loaded into "
                        f"memory: read it with jbp.data.open_source (jbp.train.fit does)")
    else:
        raise DataError(f"data.dataset: unknown dataset {cfg.dataset!r}")
    train, test = subset(train, cfg.train_limit), subset(test, cfg.test_limit)
    if getattr(cfg, "pad", 0):           # zero border: MNIST 28×28 + 2 -> 32×32
        train, test = _pad(train, cfg.pad), _pad(test, cfg.pad)
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

"""What :func:`jbp.train.fit` trains and evaluates on: :func:`open_source` gives an in-memory
source (MNIST, CIFAR-10, ``.npz``: :func:`jbp.data.batches` over arrays) or a streamed one
(``data.dataset = "image_folder"``: Grain loaders over image files, :mod:`jbp.data.image_folder`).

Both answer the same questions: how many examples and of what shape, the batches of an epoch
from a position, the test batches, what to store in a checkpoint to continue bit-identically
(``position()`` / ``resume()``), and which examples a batch held. A streamed source reads one
endless Grain iterator for the whole run (an epoch is ``steps_per_epoch`` batches of it); its
position is Grain's iterator state. With ``shard=(process_index, process_count)`` each process
streams its own equal share, and its batches are this process's rows of the global batch
(``per_process``).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Iterator, Optional, Tuple

import numpy as np

from jbp.data.batching import batches, epoch_order, num_batches
from jbp.data.dataset import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MemorySource:
    """A dataset held in memory (:func:`jbp.data.load_dataset`)."""

    per_process = False     # every process builds the same global batches

    def __init__(self, cfg, num_classes, *, batch_size: int, eval_batch_size: int, seed: int):
        from jbp.data import load_dataset  # noqa: PLC0415 (jbp.data imports this module)
        self.cfg, self.batch_size, self.eval_batch_size, self.seed = (
            cfg, batch_size, eval_batch_size, seed)
        self.train, self.test = load_dataset(cfg, num_classes)
        self.num_train, self.num_test = self.train.num_examples, self.test.num_examples
        self.input_shape = tuple(self.train.x.shape[1:])
        self.steps_per_epoch = num_batches(self.train, batch_size, train=True)

    def train_batches(self, epoch: int, start: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return batches(self.train, self.batch_size, mean=self.cfg.mean, std=self.cfg.std,
                       seed=self.seed, epoch=epoch, start=start,
                       augment_shift=self.cfg.augment_shift)

    def test_batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        return batches(self.test, self.eval_batch_size, train=False, mean=self.cfg.mean,
                       std=self.cfg.std)

    def position(self) -> dict:
        return {}              # (epoch, batch) fix the order: nothing more to store

    def resume(self, position: dict) -> None:
        pass

    def counters(self) -> dict:
        return {}              # (what a streamed source adds to the metrics and the summary)

    def batch_examples(self, epoch: int, batch: int) -> dict:
        order = epoch_order(self.num_train, seed=self.seed, epoch=epoch, shuffle=True)
        return {"example_indices": order[batch * self.batch_size:
                                         (batch + 1) * self.batch_size].tolist()}

    def close(self) -> None:
        pass


def _import_image_folder():
    try:
        from jbp.data import image_folder  # noqa: PLC0415
    except ImportError as e:
        raise DataError(f"data.dataset='image_folder' streams through Grain and decodes with "
                        f"Pillow, which are not installed ({e}): pip install 'jbp[data]'") from e
    return image_folder


class FolderSource:
    """ImageNet-style folders (``data.path`` holds ``train/`` and ``val/``, or ``data.test_path``
    names the evaluation folder) streamed through Grain."""

    def __init__(self, cfg, num_classes, *, batch_size: int, eval_batch_size: int, seed: int,
                 shard: Tuple[int, int] = (0, 1)):
        folders = _import_image_folder()
        self.cfg, self.folders, self.shard = cfg, folders, shard
        self.per_process = shard[1] > 1
        if not cfg.path or not os.path.isdir(cfg.path):
            raise DataError(f"{cfg.path or 'data.path'}: no such directory (expected an "
                            f"ImageNet-style folder holding train/ and val/, each with one "
                            f"folder of images per class: point data.path at it, e.g. "
                            f"--set data.path=/data/imagenet)")
        train_dir = os.path.join(cfg.path, "train")
        test_dir = cfg.test_path or os.path.join(cfg.path, "val")
        if not os.path.isdir(train_dir):
            raise DataError(f"{cfg.path}: no train/ folder in it (expected train/<class>/<images>"
                            f" and val/<class>/<images>)")
        self.train = folders.list_images(train_dir, limit=cfg.train_limit)
        self.test = folders.list_images(test_dir, classes=self.train.classes,
                                        limit=cfg.test_limit)
        if num_classes is not None and len(self.train.classes) > num_classes:
            raise DataError(f"{train_dir}: {len(self.train.classes)} class folders but the model "
                            f"has num_classes={num_classes}")
        if len(cfg.mean) != 3:
            raise DataError(f"{cfg.path}: images are decoded as RGB (3 channels) but data.mean/"
                            f"std give {len(cfg.mean)}")
        if batch_size % shard[1]:
            raise DataError(f"train.batch_size={batch_size} does not divide over "
                            f"{shard[1]} processes")
        self.batch_size, self.eval_batch_size, self.seed = (
            batch_size // shard[1], eval_batch_size, seed)
        self.num_train, self.num_test = len(self.train), len(self.test)
        self.input_shape = (cfg.image_size, cfg.image_size, 3)
        self.steps_per_epoch = (self.num_train // shard[1]) // self.batch_size
        self.ignored = self.train.ignored + self.test.ignored
        self.skipped, self._state, self._iterator, self._last = 0, None, None, {}

    def _train_iterator(self):
        if self._iterator is None:
            cfg = self.cfg
            loader = self.folders.train_loader(
                self.train, image_size=cfg.image_size, batch_size=self.batch_size, mean=cfg.mean,
                std=cfg.std, seed=self.seed, workers=cfg.workers, shard=self.shard)
            self._iterator = iter(loader)
            if self._state is not None:
                try:
                    self._iterator.set_state(self._state.encode())
                except ValueError as e:     # Grain checks the worker count, sampler, files
                    raise DataError(f"{self.train.root}: the checkpoint's data position does "
                                    f"not fit this pipeline ({e}); resume with the run's "
                                    f"data.workers and the same folder") from e
        return self._iterator

    def train_batches(self, epoch: int, start: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """The rest of an epoch (its batches ``start`` ... ``steps_per_epoch - 1``) from where
        the stream is (``epoch`` and ``start`` only count: the position is the stream's)."""
        for batch in itertools.islice(self._train_iterator(), self.steps_per_epoch - start):
            self.skipped += int(batch["skipped"].sum())
            self._last = {"example_indices": batch["index"].tolist(),
                          "files": [self.train.path(i) for i in batch["index"]]}
            yield batch["image"], batch["label"]

    def test_batches(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        cfg = self.cfg
        loader = self.folders.eval_loader(
            self.test, image_size=cfg.image_size, resize_size=cfg.resize_size,
            batch_size=self.eval_batch_size, mean=cfg.mean, std=cfg.std, workers=cfg.workers)
        for batch in loader:
            yield batch["image"], batch["label"]

    def position(self) -> dict:
        """Every process's Grain iterator state and skip count (with several processes, a
        collective: every process calls it at the same step; process 0 writes it)."""
        state = self._state if self._iterator is None else self._iterator.get_state().decode()
        mine = json.dumps({"loader": state, "skipped_images": self.skipped}).encode()
        every = [json.loads(b) for b in _allgather_bytes(mine)] if self.shard[1] > 1 else [
            json.loads(mine)]
        return {"loaders": [p["loader"] for p in every],
                "skipped_images": [p["skipped_images"] for p in every]}

    def resume(self, position: dict) -> None:
        loaders = position.get("loaders")
        if loaders is None and (position.get("epoch", 0) or position.get("batch", 0)):
            raise DataError("the checkpoint holds no data-loader position (written by another "
                            "version of jbp?); it cannot be resumed as a streamed dataset")
        if loaders is not None and len(loaders) != self.shard[1]:
            raise DataError(f"the run read its data in {len(loaders)} process(es); resume it with "
                            f"{len(loaders)}, not {self.shard[1]}")
        if loaders is not None:
            self._state = loaders[self.shard[0]]
            self.skipped = position["skipped_images"][self.shard[0]]
        self.close()
        if self._state is not None:
            self._train_iterator()       # a position that does not fit: the error comes now

    def counters(self) -> dict:
        """Unreadable files skipped so far in training (this process's; each is warned about)."""
        return {"skipped_images": self.skipped}

    def batch_examples(self, epoch: int, batch: int) -> dict:
        return dict(self._last)          # the batch fit is asking about is the last one read

    def close(self) -> None:
        self._iterator = None


def _allgather_bytes(blob: bytes) -> list:
    """Every process's ``blob``, in process order (two small all-gathers: lengths, then bytes)."""
    from jax.experimental import multihost_utils  # noqa: PLC0415
    lengths = np.asarray(multihost_utils.process_allgather(np.array([len(blob)], np.int64)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(blob)] = np.frombuffer(blob, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(padded))
    return [bytes(every[i, :int(lengths[i, 0])]) for i in range(every.shape[0])]


def open_source(cfg, num_classes: Optional[int], *, batch_size: int, eval_batch_size: int,
                seed: int, shard: Tuple[int, int] = (0, 1)):
    """The source for a ``jbp.config.DataConfig``: :class:`FolderSource` for "image_folder"
    (``shard`` = this process's (index, count)), else :class:`MemorySource` (which ignores
    ``shard``: every process builds the whole global batch)."""
    if cfg.dataset == "image_folder":
        return FolderSource(cfg, num_classes, batch_size=batch_size,
                            eval_batch_size=eval_batch_size, seed=seed, shard=shard)
    return MemorySource(cfg, num_classes, batch_size=batch_size,
                        eval_batch_size=eval_batch_size, seed=seed)

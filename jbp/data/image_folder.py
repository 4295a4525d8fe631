"""ImageNet-style image folders streamed through Grain: listing, decoding, augmentation, loaders.

``root/<class>/<...>/<file>.{jpg,jpeg,png}`` (any case), classes sorted by folder name as
torchvision's ``ImageFolder`` sorts them. Files are decoded with Pillow (any mode -> RGB) inside
the Grain data source, so Grain's read threads and worker processes (``data.workers``) decode
in parallel. Training: ``RandomResizedCrop(image_size)`` (scale 0.08-1, ratio 3/4-4/3, bilinear,
torchvision's sampling) and a horizontal flip with probability 1/2, each drawn from the
per-record generator Grain derives from (seed, record position); evaluation: resize the shorter
side to ``resize_size``, center crop ``image_size``. Batches are normalised float32 NHWC.

A file that cannot be decoded is skipped: its place is taken by the next readable file of the
listing, a warning names it, and every batch counts its skips (``"skipped"``), so the number of
batches never depends on which files are bad (several processes stay in step). Empty class
folders, a missing folder and train/val class mismatches are :class:`DataError` at listing time;
non-image files are ignored and counted.

Needs the ``[data]`` extra (grain, Pillow): import this module only through
:func:`jbp.data.source.open_source`, which says so in one line when they are missing.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple

import grain.python as grain
import numpy as np
from PIL import Image

from jbp.data.batching import normalize
from jbp.data.dataset import DataError, arrays_digest

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: A run of this many unreadable files in a row is not a few bad files but a broken folder.
MAX_CONSECUTIVE_BAD = 32


class Listing(NamedTuple):
    """The image files of one folder: paths relative to ``root`` (bytes) and int32 labels."""

    root: str
    classes: Tuple[str, ...]
    files: np.ndarray
    labels: np.ndarray
    ignored: int              # files that are not images by their extension (or hidden)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.files[i].decode())


def list_images(root: str, classes: Optional[Sequence[str]] = None,
                limit: Optional[int] = None) -> Listing:
    """List ``root``'s class folders and their images (sorted, recursively within a class).

    ``classes``: the class names another folder had (training's, for validation): this one must
    have exactly those. ``limit``: keep that many files spread evenly over the sorted listing.
    """
    if not os.path.isdir(root):
        raise DataError(f"{root}: no such directory")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    found = tuple(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    ignored = sum(1 for e in entries if not e.is_dir())
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if classes is not None and found != tuple(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise DataError(f"{root}: its class folders differ from the training folder's "
                        f"(here only: {extra[:5]}, missing here: {missing[:5]}); ImageNet's "
                        f"validation images come flat: sort them into class folders first")
    files, labels, empty = [], [], []
    for label, name in enumerate(found):
        count = 0
        for directory, subdirs, names in os.walk(os.path.join(root, name)):
            subdirs.sort()
            for file in sorted(names):
                if file.startswith(".") or not file.lower().endswith(IMAGE_EXTENSIONS):
                    ignored += 1
                    continue
                files.append(os.path.relpath(os.path.join(directory, file), root).encode())
                count += 1
        labels.extend([label] * count)
        if not count:
            empty.append(name)
    if empty:
        raise DataError(f"{root}: {len(empty)} class folder(s) without any "
                        f"{'/'.join(IMAGE_EXTENSIONS)} file: {', '.join(empty[:5])}; remove them "
                        f"or add images (labels follow the sorted folder names)")
    files, labels = np.array(files, dtype=bytes), np.array(labels, np.int32)
    if limit is not None and limit < len(files):
        keep = np.round(np.linspace(0, len(files) - 1, max(limit, 1))).astype(np.int64)
        files, labels = files[keep], labels[keep]
    return Listing(root, found, files, labels, ignored)


def decode(path: str) -> Image.Image:
    """The image at ``path`` in RGB (grayscale, palette, RGBA, CMYK converted), fully loaded."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFiles:
    """A Grain data source over a :class:`Listing`: record ``i`` is file ``i`` decoded, or, when
    it is unreadable, the next readable one (``"skipped"`` counts the files passed over)."""

    def __init__(self, listing: Listing):
        self.listing = listing

    def __len__(self) -> int:
        return len(self.listing)

    def __repr__(self) -> str:       # what Grain's iterator state records and checks on resume
        digest = arrays_digest({"files": self.listing.files, "labels": self.listing.labels})
        return f"ImageFiles({len(self)} files, {len(self.listing.classes)} classes, {digest[:16]})"

    def __getitem__(self, index: int) -> dict:
        n = len(self.listing)
        for skipped in range(min(MAX_CONSECUTIVE_BAD, n)):
            i = (int(index) + skipped) % n
            path = self.listing.path(i)
            try:
                image = decode(path)
            except Exception as e:    # noqa: BLE001 (Pillow raises OSError, SyntaxError, ...)
                warnings.warn(f"{path}: unreadable image ({type(e).__name__}: {e}); skipped, the "
                              f"next file takes its place", stacklevel=1)
                continue
            return {"image": image, "label": self.listing.labels[i], "index": np.int64(i),
                    "skipped": np.int32(skipped)}
        raise DataError(f"{self.listing.root}: {min(MAX_CONSECUTIVE_BAD, n)} unreadable images in "
                        f"a row from {self.listing.path(int(index))}: check the folder")


def crop_box(width: int, height: int, rng: np.random.Generator,
             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: (left, top, w, h) of a crop covering a
    random fraction ``scale`` of the area with aspect ratio in ``ratio`` (log-uniform); after 10
    misses, the whole image center-cropped to the nearest allowed ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class RandomResizedCropFlip(grain.RandomMapTransform):
    """Training augmentation: a random crop resized to ``size`` x ``size``, flipped with p=1/2."""

    def __init__(self, size: int):
        self.size = size

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        left, top, w, h = crop_box(image.width, image.height, rng)
        image = image.resize((self.size, self.size), Image.BILINEAR,
                             box=(left, top, left + w, top + h))
        pixels = np.asarray(image)
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        return {**element, "image": np.ascontiguousarray(pixels)}


def resize_center_crop(image: Image.Image, resize: int, size: int) -> np.ndarray:
    """torchvision's ``Resize(resize)`` (shorter side, bilinear) then ``CenterCrop(size)``."""
    w, h = image.size
    if w <= h:
        new = (resize, int(resize * h / w))
    else:
        new = (int(resize * w / h), resize)
    image = image.resize(new, Image.BILINEAR)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)))


class ResizeCenterCrop(grain.MapTransform):
    """Evaluation: :func:`resize_center_crop`."""

    def __init__(self, resize: int, size: int):
        self.resize, self.size = resize, size

    def map(self, element: dict) -> dict:
        return {**element, "image": resize_center_crop(element["image"], self.resize, self.size)}


class Normalize(grain.MapTransform):
    """A batch's uint8 images -> float32 ``(x / 255 - mean) / std`` (in the worker)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def map(self, batch: dict) -> dict:
        return {**batch, "image": normalize(batch["image"], self.mean, self.std)}


def _workers(count: int) -> int:
    """Grain 0.2.18's worker start reads an absl flag, which fails in a program that never
    parsed absl's flags (google/grain#1355, fixed after 0.2.18): take their defaults then."""
    if count:
        from absl import flags  # noqa: PLC0415 (a dependency of grain)
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    return count


def _read_options(batch_size: int) -> grain.ReadOptions:
    # Decoded full-size images wait in this buffer: two batches' worth, not Grain's default 500.
    return grain.ReadOptions(num_threads=4, prefetch_buffer_size=max(2 * batch_size, 8))


def train_loader(listing: Listing, *, image_size: int, batch_size: int, mean, std, seed: int,
                 workers: int = 0, shard: Tuple[int, int] = (0, 1)) -> grain.DataLoader:
    """An endless stream of augmented batches of ``batch_size`` from this process's shard
    (``shard`` = (index, count), e.g. ``(jax.process_index(), jax.process_count())``, equal
    shards), reshuffled every pass by (seed, pass). Its iterator's ``get_state()`` is the
    position to checkpoint (it records ``workers``: a resume must use the same number)."""
    sampler = grain.IndexSampler(
        len(listing), shard_options=grain.ShardOptions(*shard, drop_remainder=True),
        shuffle=True, num_epochs=None, seed=int(seed) % 2**31)
    ops = [RandomResizedCropFlip(image_size), grain.Batch(batch_size, drop_remainder=True),
           Normalize(mean, std)]
    return grain.DataLoader(data_source=ImageFiles(listing), sampler=sampler, operations=ops,
                            worker_count=_workers(workers), read_options=_read_options(batch_size))


def eval_loader(listing: Listing, *, image_size: int, resize_size: int, batch_size: int,
                mean, std, workers: int = 0) -> grain.DataLoader:
    """Every file once, in listing order, resized and center-cropped; the last batch partial."""
    sampler = grain.IndexSampler(len(listing), shard_options=grain.NoSharding(), shuffle=False,
                                 num_epochs=1)
    ops = [ResizeCenterCrop(resize_size, image_size),
           grain.Batch(batch_size, drop_remainder=False), Normalize(mean, std)]
    return grain.DataLoader(data_source=ImageFiles(listing), sampler=sampler, operations=ops,
                            worker_count=_workers(workers), read_options=_read_options(batch_size))

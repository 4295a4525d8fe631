"""Images/s of the image-folder pipeline alone (decode + RandomResizedCrop + flip + batch +
normalise, through Grain) for several worker counts, and of jbp's ResNet-18 train step on the same
machine: which one is the bottleneck (docs/data.md).

    python scripts/bench_data.py                          # 512 synthetic 500x375 JPEGs
    python scripts/bench_data.py --folder /data/imagenet --workers 0 2 4 8 --batches 50
    python scripts/bench_data.py --step-batch 16          # also time ResNet-18's step

Without --folder it writes ImageNet-sized JPEGs (500x375, smooth content plus noise, quality 90)
into a temporary folder. Needs the [data] extra.
"""

import argparse
import os
import tempfile
import time

import numpy as np


def synthetic_folder(root: str, count: int, classes: int = 8) -> str:
    from PIL import Image  # noqa: PLC0415
    rng = np.random.default_rng(0)
    for i in range(count):
        directory = os.path.join(root, "train", f"class{i % classes:02d}")
        os.makedirs(directory, exist_ok=True)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(small.resize((500, 375), Image.BICUBIC), np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(directory, f"{i:06d}.jpg"), quality=90)
    return root


def pipeline_rate(listing, workers: int, batch: int, batches: int, size: int) -> float:
    from jbp.data import IMAGENET_MEAN, IMAGENET_STD, image_folder  # noqa: PLC0415
    it = iter(image_folder.train_loader(listing, image_size=size, batch_size=batch,
                                        mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=0,
                                        workers=workers))
    next(it), next(it)                                  # workers started, buffers filling
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def step_rate(batch: int, size: int, steps: int) -> float:
    import jax  # noqa: PLC0415
    from jbp import models, train  # noqa: PLC0415
    model = models.get_model("resnet18")
    optimizer = train.make_optimizer("momentum", 0.1)
    state = train.init_train_state(model, optimizer, jax.random.key(0), (size, size, 3), 1000)
    step = train.make_train_step(model.apply, optimizer)
    x = np.random.default_rng(0).standard_normal((batch, size, size, 3), np.float32)
    y = np.arange(batch, dtype=np.int32) % 1000
    state, _ = step(state, x, y)                        # compile
    jax.block_until_ready(state.params)
    start = time.perf_counter()
    for _ in range(steps):
        state, _ = step(state, x, y)
    jax.block_until_ready(state.params)
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", help="an ImageNet-style root holding train/")
    parser.add_argument("--synthetic", type=int, default=512, help="images to write otherwise")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8, help="timed batches per worker count")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--step-batch", type=int, default=0,
                        help="also time ResNet-18's manual train step at this batch (0: no)")
    args = parser.parse_args()
    from jbp.data import image_folder  # noqa: PLC0415
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or synthetic_folder(tmp, args.synthetic)
        listing = image_folder.list_images(os.path.join(root, "train"))
        print(f"{len(listing):,} images in {root}; batch {args.batch}, {args.image_size} px, "
              f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs")
        for workers in args.workers:
            rate = pipeline_rate(listing, workers, args.batch, args.batches, args.image_size)
            print(f"pipeline, {workers} worker process(es): {rate:8.1f} images/s", flush=True)
    if args.step_batch:
        rate = step_rate(args.step_batch, args.image_size, 3)
        print(f"ResNet-18 manual train step, batch {args.step_batch}: {rate:8.1f} images/s")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

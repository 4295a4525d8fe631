"""data.dataset = "image_folder": real JPEG and PNG files written here with Pillow (a corrupt
file, a grayscale one, a non-image file among them), listed, decoded, augmented and batched
through Grain, sharded, and trained on by jbp.train.fit with a bit-identical mid-epoch resume."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest

pytest.importorskip("grain", reason="the [data] extra: pip install -e '.[data]'")
Image = pytest.importorskip("PIL.Image")

from jbp import checkpoint, config as config_lib, data, train  # noqa: E402
from jbp.data import image_folder as folders  # noqa: E402

#: Outside the fast loop (``pytest -m 'not slow'``): Grain pipelines and training runs. CI runs it.
#: The folder holds a corrupt file on purpose: its warning is expected wherever the loader reads
#: it (test_grayscale_... asserts it), so it does not end up in the run's warnings summary.
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*aa_corrupt.jpg. unreadable image:UserWarning")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("ant", "bee", "cat", "dog")         # written in another order: sorting is checked
PER_CLASS, PER_CLASS_VAL = 40, 6
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _write_folder(root: pathlib.Path, per_class: int, seed: int) -> dict:
    """Images of random size (16..40 px) whose mean colour depends on the class; returns what
    was written: {class: [relative image paths]}, plus the special files' paths."""
    rng = np.random.default_rng(seed)
    written = {}
    for label, name in sorted(enumerate(CLASSES), key=lambda c: -c[0]):
        (root / name).mkdir(parents=True)
        written[name] = []
        for i in range(per_class):
            h, w = rng.integers(16, 41, 2)
            pixels = rng.integers(0, 120, (h, w, 3)) + 40 * label
            suffix = ".png" if i % 3 == 0 else (".JPEG" if i % 3 == 1 else ".jpg")
            path = root / name / f"img{i:03d}{suffix}"
            Image.fromarray(pixels.astype(np.uint8)).save(path)
            written[name].append(str(path.relative_to(root)))
    return written


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    written = _write_folder(base / "train", PER_CLASS, 0)
    _write_folder(base / "val", PER_CLASS_VAL, 1)
    gray = base / "train" / "bee" / "zz_gray.png"
    Image.fromarray(np.full((20, 24), 200, np.uint8), mode="L").save(gray)
    written["bee"].append("bee/zz_gray.png")
    (base / "train" / "cat" / "aa_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    written["cat"].insert(0, "cat/aa_corrupt.jpg")
    (base / "train" / "dog" / "notes.txt").write_text("not an image")
    (base / "train" / "dog" / ".hidden.jpg").write_bytes(b"")
    return base, written


CONFIG = str(ROOT / "configs" / "resnet18_imagenet.toml")
# The ImageNet config made small: LeNet-5 on 16x16 crops of the folder above, no worker processes.
SMALL = ["data.image_size=16", "data.resize_size=18", "model.name=lenet5", "model.num_classes=4",
         "data.workers=0", f"data.mean={list(MEAN)}", f"data.std={list(STD)}",
         "train.batch_size=16", "train.eval_batch_size=10", "train.checkpoint_every=3",
         "train.log_every=2", "optim.warmup_steps=0", "optim.lr=0.02", "optim.weight_decay=0.0"]


def _config(base) -> config_lib.Config:
    return config_lib.load(CONFIG, [f"data.path={base}", "train.epochs=2", *SMALL])


def test_listing_sorts_classes_and_counts_what_it_ignores(folder):
    base, written = folder
    listing = folders.list_images(str(base / "train"))
    assert listing.classes == tuple(sorted(CLASSES))
    expected = [(path, label) for label, name in enumerate(sorted(CLASSES))
                for path in sorted(written[name])]
    assert [(f.decode(), int(y)) for f, y in zip(listing.files, listing.labels)] == expected
    assert listing.ignored == 2                      # notes.txt, .hidden.jpg
    assert len(folders.list_images(str(base / "train"), limit=10)) == 10


def test_folder_errors_are_clear(folder, tmp_path):
    base, _ = folder
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    (tmp_path / "train" / "b" / "readme.md").write_text("")
    with pytest.raises(data.DataError, match=r"1 class folder\(s\) without any .*: b"):
        folders.list_images(str(tmp_path / "train"))
    with pytest.raises(data.DataError, match=r"here only: \['cat', 'dog'\], missing here: \[\]"):
        folders.list_images(str(base / "val"), classes=("ant", "bee"))
    missing = dataclasses.replace(_config(base).data, path=str(tmp_path / "nowhere"))
    with pytest.raises(data.DataError, match=r"nowhere: no such directory .*--set data\.path="):
        data.open_source(missing, 4, batch_size=16, eval_batch_size=10, seed=0)
    with pytest.raises(data.DataError, match=r"streamed, not loaded"):
        data.load_dataset(_config(base).data, 4)


def test_grayscale_is_rgb_and_a_corrupt_file_is_skipped_and_counted(folder):
    base, _ = folder
    listing = folders.list_images(str(base / "train"))
    files = [f.decode() for f in listing.files]
    source = folders.ImageFiles(listing)
    gray = source[files.index("bee/zz_gray.png")]
    pixels = np.asarray(gray["image"])
    assert pixels.shape == (20, 24, 3) and (pixels == 200).all()
    bad = files.index("cat/aa_corrupt.jpg")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = source[bad]
    assert record["skipped"] == 1 and record["index"] == bad + 1 and record["label"] == 2
    assert any("aa_corrupt.jpg: unreadable image" in str(w.message) for w in caught)


def _ramp(width, height):
    """R = 4·column, G = 6·row: a linear image whose resampled values say where they came from."""
    cols, rows = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([4 * cols, 6 * rows, 0 * rows], -1).astype(np.uint8))


def test_eval_resize_and_center_crop_land_where_torchvision_puts_them():
    # 50x30 -> shorter side 18: 30x18; center crop 16 at (top 1, left 7). A bilinear resample of
    # a linear ramp is that ramp at the pixel centres' source coordinates.
    out = folders.resize_center_crop(_ramp(50, 30), 18, 16).astype(float)
    assert out.shape == (16, 16, 3)
    j, i = np.arange(16), np.arange(16)
    want_r = 4 * ((7 + j + 0.5) * 50 / 30 - 0.5)
    want_g = 6 * ((1 + i + 0.5) * 30 / 18 - 0.5)
    np.testing.assert_allclose(out[8, :, 0], want_r, atol=1.01)
    np.testing.assert_allclose(out[2:-2, 8, 1], want_g[2:-2], atol=1.01)


def test_random_resized_crop_statistics_and_fallback():
    rng = np.random.default_rng(0)
    boxes = np.array([folders.crop_box(100, 80, rng) for _ in range(2000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= 100).all() and \
        (top + h <= 80).all()
    area, ratio = w * h / 8000, w / h
    assert area.min() >= 0.07 and area.max() <= 1.0 and 0.3 < np.median(area) < 0.7
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    # Nothing of ratio 3/4..4/3 and area >= 8% fits a 1000x10 strip: the center crop at 4/3.
    assert folders.crop_box(1000, 10, rng) == ((1000 - 13) // 2, 0, 13, 10)
    # The crop is resampled from its box, and flipped about half the time.
    flips = 0
    for seed in range(40):
        box_rng, map_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        left, top, w, h = folders.crop_box(60, 40, box_rng)
        flipped = box_rng.random() < 0.5
        out = folders.RandomResizedCropFlip(16).random_map({"image": _ramp(60, 40)}, map_rng)
        r = out["image"][8, :, 0].astype(float)
        want = 4 * (left + (np.arange(16) + 0.5) * w / 16 - 0.5)
        np.testing.assert_allclose(r[2:-2], (want[::-1] if flipped else want)[2:-2], atol=1.6)
        flips += flipped
    assert 10 < flips < 30


def test_loader_batches_shards_and_restores_its_position(folder):
    base, _ = folder
    listing = folders.list_images(str(base / "train"))
    n = len(listing)
    kw = dict(image_size=16, batch_size=8, mean=MEAN, std=STD, seed=3)
    shards = []
    for index in range(2):
        loader = folders.train_loader(listing, **kw, shard=(index, 2))
        it = iter(loader)
        seen = np.concatenate([next(it)["index"] for _ in range((n // 2) // 8)])
        shards.append(seen)
    assert not set(shards[0]) & set(shards[1])          # each process reads its own share
    assert len(set(shards[0])) == len(shards[0]) == len(shards[1]) == 80
    it = iter(folders.train_loader(listing, **kw, workers=1))
    first = [next(it) for _ in range(3)]
    state = it.get_state()
    rest = [next(it) for _ in range(4)]
    again = iter(folders.train_loader(listing, **kw, workers=1))
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(4)]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    batch = first[0]
    assert batch["image"].shape == (8, 16, 16, 3) and batch["image"].dtype == np.float32
    raw = np.asarray(listing.labels)[batch["index"]]
    np.testing.assert_array_equal(batch["label"], raw)
    # Normalised per channel: undoing it gives whole numbers 0..255.
    pixels = (batch["image"] * np.float32(STD) + np.float32(MEAN)) * 255
    assert np.abs(pixels - np.round(pixels)).max() < 1e-3
    assert pixels.min() > -0.5 and pixels.max() < 255.5


def _final_leaves(run_dir):
    _, arrays = checkpoint.read(checkpoint.checkpoint_paths(str(run_dir))[-1])
    return arrays


def test_fit_trains_and_resumes_mid_epoch_bit_identically(folder, tmp_path):
    base, _ = folder
    cfg = _config(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # the corrupt file's warning
        straight = train.fit(cfg, str(tmp_path / "straight"), verbose=False)
        stopped = train.fit(cfg, str(tmp_path / "resumed"), max_steps=5, verbose=False)
        resumed = train.fit(cfg, str(tmp_path / "resumed"), resume=True, verbose=False)
    steps_per_epoch = (4 * PER_CLASS + 2) // 16                 # 162 images, corrupt included
    assert straight["steps"] == resumed["steps"] == 2 * steps_per_epoch == 20
    assert stopped["status"] == "stopped" and stopped["steps"] == 5    # mid-way through epoch 1
    for a, b in zip(_final_leaves(tmp_path / "straight"), _final_leaves(tmp_path / "resumed")):
        np.testing.assert_array_equal(a, b)
    assert straight["skipped_images"] == resumed["skipped_images"] >= 1
    assert 0.0 <= straight["test_accuracy"] <= 1.0 and np.isfinite(straight["test_loss"])
    assert straight["config"]["data"]["dataset"] == "image_folder"


def _launch(base, out, *extra, env=None):
    """scripts/train.py on 2 processes x 1 host device (scripts/launch.py, 127.0.0.1, bounded)."""
    from test_multiprocess import TIMEOUT, _env  # noqa: PLC0415
    args = [a for kv in [f"data.path={base}", "train.epochs=1", *SMALL] for a in ("--set", kv)]
    cmd = [sys.executable, "scripts/launch.py", "--processes", "2", "--devices-per-process", "1",
           "--timeout", str(TIMEOUT), "--", "scripts/train.py", "--config", CONFIG, *args,
           "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, env={**_env(), **(env or {})}, capture_output=True,
                          text=True, timeout=TIMEOUT + 30)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


@pytest.mark.slow            # three two-process runs
def test_two_processes_read_their_own_shards_and_resume_mid_epoch(folder, tmp_path):
    base, _ = folder
    straight = _launch(base, tmp_path / "straight")
    assert "over 2 devices in 2 process(es)" in straight and "[1] done (process 1)" in straight
    stopped = _launch(base, tmp_path / "resumed", env={"JBP_TEST_SIGNAL": "SIGINT@checkpoint"})
    assert "SIGINT: stopped after step 3" in stopped
    manifest, _ = checkpoint.read(checkpoint.checkpoint_paths(str(tmp_path / "resumed"))[-1])
    loaders = [json.loads(s)["sampler"] for s in manifest["position"]["loaders"]]
    assert len(loaders) == 2 and "shard_index=0" in loaders[0] and "shard_index=1" in loaders[1]
    resumed = _launch(base, tmp_path / "resumed", "--resume", str(tmp_path / "resumed"))
    assert "resuming from" in resumed and "[1] done (process 1)" in resumed
    steps = (4 * PER_CLASS + 2) // 2 // 8            # each process: 81 images, 8 per step
    final = [checkpoint.read(checkpoint.checkpoint_paths(str(tmp_path / d))[-1])
             for d in ("straight", "resumed")]
    assert final[0][0]["step"] == final[1][0]["step"] == steps
    for a, b in zip(final[0][1], final[1][1]):
        np.testing.assert_array_equal(a, b)
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["steps"] == steps and "skipped_images" in summary


def test_a_resume_with_another_pipeline_is_a_clear_error(folder):
    base, _ = folder
    cfg = _config(base).data
    kw = dict(batch_size=16, eval_batch_size=10, seed=0)
    source = data.open_source(cfg, 4, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        next(source.train_batches(0, 0))
    position = {"epoch": 0, "batch": 1, **source.position()}
    assert len(position["loaders"]) == 1
    other = data.open_source(dataclasses.replace(cfg, workers=1), 4, **kw)
    with pytest.raises(data.DataError, match=r"(?s)does not fit .*worker count.*data\.workers"):
        other.resume(position)
    with pytest.raises(data.DataError, match=r"read its data in 1 process\(es\); resume it with 1"):
        data.open_source(cfg, 4, **kw, shard=(0, 2)).resume(position)
    with pytest.raises(data.DataError, match=r"no data-loader position"):
        data.open_source(cfg, 4, **kw).resume({"epoch": 0, "batch": 3})


def test_without_the_data_extra_one_line_names_it(folder, monkeypatch):
    import jbp.data  # noqa: PLC0415
    monkeypatch.setitem(sys.modules, "grain.python", None)      # as if grain were not installed
    monkeypatch.delitem(sys.modules, "jbp.data.image_folder")
    monkeypatch.delattr(jbp.data, "image_folder")
    with pytest.raises(data.DataError, match=r"streams through Grain .* pip install 'jbp\[data\]'"):
        data.open_source(_config(folder[0]).data, 4, batch_size=16, eval_batch_size=10, seed=0)

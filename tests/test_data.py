"""Data: the shipped MNIST (all 60,000 training images), user-format loaders (built here in a
temp dir), batching."""

import gzip
import pickle
import struct

import numpy as np
import pytest

from jbp import config, data


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand: magic 0x00000800 | ndim, big-endian sizes, uint8 data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I",
                                                                     *array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12)


def test_shipped_mnist_is_real_and_verified():
    train, test = data.load_mnist()
    assert train.x.shape == (60000, 28, 28, 1) and test.x.shape == (10000, 28, 28, 1)
    assert train.y.shape == (60000,) and test.y.shape == (10000,)
    # The official training set's class counts (LeCun's train-labels-idx1-ubyte).
    assert list(np.bincount(train.y)) == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                                          5949]
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int32
    assert sorted(np.unique(train.y)) == list(range(10))
    # Real digits: mostly black background, strokes up to white, classes roughly balanced.
    assert 0.7 < (train.x == 0).mean() < 0.9 and train.x.max() == 255
    assert np.bincount(test.y).min() > 800
    # The official test set starts with a 7, a 2 and a 1 (LeCun's t10k-labels-idx1-ubyte).
    assert list(test.y[:3]) == [7, 2, 1]


# The arrays digest of the file jbp shipped before issue 29 (x_train/y_train: the first 10,000
# training images; x_test/y_test: the official test set), pinned here independently of the loader.
OLD_SUBSET_SHA256 = "47c7a5b2e6f31ccdd72a36a1fdca3dacca7e43302f894ce04f2d5ee427cd51ab"


def test_shipped_mnist_checksum_is_checked(monkeypatch):
    with np.load(data.MNIST_PATH, allow_pickle=False) as f:
        raw = {k: f[k] for k in f.files}
    assert data.arrays_digest(raw) == data.MNIST_ARRAYS_SHA256
    monkeypatch.setattr("jbp.data.mnist.MNIST_ARRAYS_SHA256", "0" * 64)
    with pytest.raises(data.DataError, match=r"mnist.npz: array SHA-256 [0-9a-f]{64} != expected "
                                             r"0{64}; rebuild it with scripts/make_mnist_npz.py"):
        data.load_mnist()
    data.load_mnist(verify=False)


def test_train_limit_10000_is_the_old_subset():
    """data.train_limit = 10000 (the MNIST configs') trains on exactly the 10,000 images jbp
    shipped before all 60,000: the first 10,000, whose digest is the old file's."""
    cfg = config.from_dict({"data": {"dataset": "mnist", "train_limit": 10000}})
    train, test = data.load_dataset(cfg.data, 10)
    with np.load(data.MNIST_PATH, allow_pickle=False) as f:
        raw = {k: f[k] for k in f.files}
    np.testing.assert_array_equal(train.x, raw["x_train"][:10000])
    np.testing.assert_array_equal(train.y, raw["y_train"][:10000])
    assert len(test.y) == 10000
    old = {"x_train": train.x, "y_train": train.y.astype(np.uint8), "x_test": test.x,
           "y_test": test.y.astype(np.uint8)}
    assert data.arrays_digest(old) == OLD_SUBSET_SHA256


@pytest.mark.parametrize("compressed", [False, True])
def test_idx_round_trip(tmp_path, images, compressed):
    x, y = images
    suffix = ".gz" if compressed else ""
    opener = gzip.open if compressed else open
    with opener(tmp_path / f"img{suffix}", "wb") as f:
        f.write(_idx_bytes(x))
    with opener(tmp_path / f"lab{suffix}", "wb") as f:
        f.write(_idx_bytes(y))
    ds = data.load_idx(str(tmp_path / f"img{suffix}"), str(tmp_path / f"lab{suffix}"))
    np.testing.assert_array_equal(ds.x[..., 0], x)
    np.testing.assert_array_equal(ds.y, y)


def test_idx_truncated_and_corrupt(tmp_path, images):
    x, y = images
    blob = _idx_bytes(x)
    (tmp_path / "short").write_bytes(blob[:-100])
    with pytest.raises(data.DataError, match=r"short: truncated or padded: header says "
                                             r"\(12, 28, 28\)"):
        data.read_idx(str(tmp_path / "short"))
    (tmp_path / "junk").write_bytes(b"\x1f\x8bnot an idx file at all")
    with pytest.raises(data.DataError, match=r"junk: not an IDX file"):
        data.read_idx(str(tmp_path / "junk"))
    (tmp_path / "bad.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(data.DataError, match=r"bad.gz: cannot read"):
        data.read_idx(str(tmp_path / "bad.gz"))
    (tmp_path / "img").write_bytes(blob)
    (tmp_path / "lab").write_bytes(_idx_bytes(y[:5]))
    with pytest.raises(data.DataError, match=r"has 12 images but .*lab has 5 labels"):
        data.load_idx(str(tmp_path / "img"), str(tmp_path / "lab"))


def _cifar_batch(path, n, seed):
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)], b"batch_label": b"test"}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return batch


def test_cifar10_batches(tmp_path):
    batches = [_cifar_batch(tmp_path / f"data_batch_{i}", 4, i) for i in range(1, 6)]
    test = _cifar_batch(tmp_path / "test_batch", 3, 9)
    train_ds, test_ds = data.load_cifar10(str(tmp_path))
    assert train_ds.x.shape == (20, 32, 32, 3) and test_ds.x.shape == (3, 32, 32, 3)
    # NCHW rows of 3072 bytes (1024 red, 1024 green, 1024 blue) become NHWC.
    first = batches[0][b"data"][0]
    np.testing.assert_array_equal(train_ds.x[0, :, :, 1], first[1024:2048].reshape(32, 32))
    np.testing.assert_array_equal(test_ds.y, test[b"labels"])


def test_cifar10_refuses_code_and_garbage(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with open(tmp_path / "evil", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(data.DataError, match=r"evil: not a CIFAR-10 python batch.*refusing to "
                                             r"unpickle builtins.print"):
        data.read_cifar_batch(str(tmp_path / "evil"))
    blob = open(_write(tmp_path / "ok", 2), "rb").read()
    (tmp_path / "torn").write_bytes(blob[:len(blob) // 2])
    with pytest.raises(data.DataError, match=r"torn: not a CIFAR-10 python batch"):
        data.read_cifar_batch(str(tmp_path / "torn"))
    with pytest.raises(data.DataError, match=r"no such directory .* --set data.path="):
        data.load_cifar10(str(tmp_path / "missing"))


def _write(path, n):
    _cifar_batch(path, n, 0)
    return path


def test_npz(tmp_path, images):
    x, y = images
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.load_npz(str(tmp_path / "d.npz"))
    assert ds.x.shape == (12, 28, 28, 1)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(data.DataError, match=r"bad.npz: missing array\(s\) \['x', 'y'\]"):
        data.load_npz(str(tmp_path / "bad.npz"))
    (tmp_path / "torn.npz").write_bytes(open(tmp_path / "d.npz", "rb").read()[:200])
    with pytest.raises(data.DataError, match=r"torn.npz: cannot read as .npz"):
        data.load_npz(str(tmp_path / "torn.npz"))
    np.savez(tmp_path / "mismatch.npz", x=x, y=y[:3])
    with pytest.raises(data.DataError, match=r"12 images but labels of shape \(3,\)"):
        data.load_npz(str(tmp_path / "mismatch.npz"))
    with pytest.raises(data.DataError, match=r"nope.npz: no such file"):
        data.load_npz(str(tmp_path / "nope.npz"))


def test_label_class_mismatch_is_named(images):
    x, y = images
    ds = data.Dataset(x[..., None], np.where(np.arange(12) == 3, 12, y).astype(np.int32))
    with pytest.raises(data.DataError, match=r"my.npz: found label 12 but the model has "
                                             r"num_classes=10"):
        data.check_labels(ds, 10, "my.npz")


def test_batches_deterministic_shuffle_drop_and_keep(images):
    x, y = images
    ds = data.Dataset(x[..., None], y.astype(np.int32))
    norm = dict(mean=(0.5,), std=(0.25,))
    a = [b[1] for b in data.batches(ds, 5, seed=3, epoch=1, **norm)]
    b = [b[1] for b in data.batches(ds, 5, seed=3, epoch=1, **norm)]
    c = [b[1] for b in data.batches(ds, 5, seed=3, epoch=2, **norm)]
    assert len(a) == 2 and all(len(batch) == 5 for batch in a)        # 12 // 5: last dropped
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))
    seen = np.concatenate(a)
    assert len(set(seen.tolist())) <= 10
    evals = list(data.batches(ds, 5, train=False, **norm))
    assert [len(b[1]) for b in evals] == [5, 5, 2]                   # kept, in order
    np.testing.assert_array_equal(np.concatenate([b[1] for b in evals]), y)
    xb, _ = evals[0]
    assert xb.dtype == np.float32 and xb.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(xb[0, :, :, 0], (x[0] / 255.0 - 0.5) / 0.25, atol=1e-6)  # float32
    resumed = [b[1] for b in data.batches(ds, 5, seed=3, epoch=1, start=1, **norm)]
    np.testing.assert_array_equal(resumed[0], a[1])


def test_random_shift_moves_pixels_within_bounds():
    x = np.zeros((50, 6, 6, 1), np.uint8)
    x[:, 2, 3, 0] = 255
    shifted = data.random_shift(x, 2, np.random.default_rng(0))
    ys, xs = np.nonzero(shifted[..., 0].reshape(50, 6, 6).max(0))
    rows, cols = np.nonzero(shifted[:, :, :, 0].sum(0))
    assert shifted.shape == x.shape and (shifted.reshape(50, -1).max(1) == 255).all()
    assert rows.min() >= 0 and rows.max() <= 4 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5           # the shifts vary

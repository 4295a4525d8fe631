"""Segmentation (issue 26) beyond the grid (tests/test_grid.py checks every rule against autodiff,
PyTorch and finite differences): labels under jit, the MNIST-scenes data, the U-Net, the
per-pixel scores and a segmentation run of ``fit``."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import config, data, train
from jbp.data import mnist_scenes
from jbp.models import from_config, get_model
from jbp.train.step import confusion_matrix, segmentation_scores

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- per-pixel labels under jit ---------------------------------------------------------------

@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "dice_loss"])
def test_out_of_range_pixel_is_nan_under_jit_and_the_ignored_one_is_not(loss):
    """A traced label outside [0, K) that is not the ignore index makes the loss and its pixel's
    gradient NaN (Dice: every pixel's, its sums are global); the ignore index itself (255) is
    finite and gets no gradient."""
    z = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 5)), jnp.float32)
    labels = np.random.default_rng(1).integers(0, 5, (2, 3, 4))
    ignored = labels.copy()
    ignored[0, 1, 2] = 255
    bad = ignored.copy()
    bad[1, 0, 0] = 7

    def value_and_grad(z, y):
        return jax.value_and_grad(lambda q: getattr(jbp, loss)(q, y, ignore_index=255))(z)

    step = jax.jit(value_and_grad)
    value, grad = step(z, jnp.asarray(ignored))
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(grad)))
    np.testing.assert_array_equal(np.asarray(grad[0, 1, 2]), 0.0)
    value, grad = step(z, jnp.asarray(bad))
    assert np.isnan(float(value)) and bool(jnp.all(jnp.isnan(grad[1, 0, 0])))
    if loss == "dice_loss":
        assert bool(jnp.all(jnp.isnan(grad)))
    with pytest.raises(ValueError, match="found 7"):
        getattr(jbp, loss)(z, jnp.asarray(bad), ignore_index=255)


# --- the data ---------------------------------------------------------------------------------

def test_compose_by_hand():
    """Ink is the pixelwise maximum; a pixel is labelled 1 + class where that digit's ink is
    >= 128, and the digit placed last owns a stroke pixel both cover."""
    a = np.zeros((3, 3), np.uint8)
    a[0, :] = [200, 127, 128]
    b = np.zeros((3, 3), np.uint8)
    b[0, 2], b[1, 1] = 130, 90
    image, labels = mnist_scenes.compose(np.stack([a, b]), np.array([4, 7]), [(0, 0), (0, 1)],
                                         size=4)
    np.testing.assert_array_equal(image[0], [200, 127, 128, 130])   # b's (0, 2) lands at (0, 3)
    np.testing.assert_array_equal(image[1], [0, 0, 90, 0])
    np.testing.assert_array_equal(labels[0], [5, 0, 5, 8])
    b[0, 1] = 255                                              # now b covers a's stroke at (0, 2)
    _, labels = mnist_scenes.compose(np.stack([a, b]), np.array([4, 7]), [(0, 0), (0, 1)], 4)
    np.testing.assert_array_equal(labels[0], [5, 0, 8, 8])
    assert labels[1].sum() == 0                                # 90 < 128: faint, background


def _fake_mnist(path, train_ink, test_ink):
    digit = np.zeros((28, 28), np.uint8)
    digit[10:18, 12:16] = 1
    np.savez(path, x_train=np.stack([digit * train_ink] * 5), y_train=np.arange(5),
             x_test=np.stack([digit * test_ink] * 3), y_test=np.array([7, 8, 9]))


def test_scenes_are_generated_cached_checked_and_split(tmp_path):
    """Training canvases come from training digits, test canvases from test digits (told apart
    by their ink); the cache holds the same arrays; a corrupted cache is regenerated."""
    mnist = str(tmp_path / "fake_mnist.npz")
    _fake_mnist(mnist, 200, 100)
    path = str(tmp_path / "scenes.npz")
    train_set, test_set = data.load_mnist_scenes(path, num_train=12, num_test=6, mnist_path=mnist)
    assert train_set.x.shape == (12, 64, 64, 1) and test_set.y.shape == (6, 64, 64)
    assert set(np.unique(train_set.x)) == {0, 200} and set(np.unique(test_set.x)) == {0, 100}
    assert set(np.unique(train_set.y)) <= set(range(6)) and train_set.y.max() > 0
    assert test_set.y.max() == 0                       # ink 100 < 128: no stroke pixels
    digits = (train_set.x[..., 0] > 0).sum((1, 2)) / 32    # 32 ink pixels per digit, overlaps
    assert digits.max() <= mnist_scenes.MAX_DIGITS and digits.min() > 0
    again, _ = data.load_mnist_scenes(path, num_train=12, num_test=6, mnist_path=mnist)
    np.testing.assert_array_equal(again.x, train_set.x)
    other, _ = data.load_mnist_scenes(str(tmp_path / "s1.npz"), seed=1, num_train=12,
                                      num_test=6, mnist_path=mnist)
    assert not np.array_equal(other.x, train_set.x)
    # data.scenes_train: more canvases continue the same seeded sequence; the test set is kept
    longer, same_test = data.load_mnist_scenes(str(tmp_path / "long.npz"), num_train=20,
                                               num_test=6, mnist_path=mnist)
    assert longer.x.shape[0] == 20 and not np.array_equal(longer.x[12:], longer.x[:8])
    np.testing.assert_array_equal(longer.x[:12], train_set.x)
    np.testing.assert_array_equal(longer.y[:12], train_set.y)
    np.testing.assert_array_equal(same_test.x, test_set.x)
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][0, 0, 0] += 1                    # a flipped label: the digit no longer fits
    np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="do not match their SHA-256; generating them again"):
        fixed, _ = data.load_mnist_scenes(path, num_train=12, num_test=6, mnist_path=mnist)
    np.testing.assert_array_equal(fixed.y, train_set.y)


def test_scenes_config_reaches_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("JBP_CACHE_DIR", str(tmp_path))
    cfg = config.load(os.path.join(ROOT, "configs", "unet_mnist_scenes.toml"))
    assert cfg.data.dataset == "mnist_scenes" and cfg.model.num_classes == 11
    assert cfg.data.dataset in data.SEGMENTATION_DATASETS
    with pytest.raises(data.DataError, match="augment_shift"):
        data.load_dataset(config.from_dict({"data": {"dataset": "mnist_scenes",
                                                     "augment_shift": 2}}).data)
    with pytest.raises(config.ConfigError, match="data.scenes_train: expected >= 1"):
        config.load(os.path.join(ROOT, "configs", "unet_mnist_scenes.toml"), ["data.scenes_train=0"])
    with pytest.raises(data.DataError, match="no such directory"):
        data.load_dataset(config.from_dict({"data": {"dataset": "mnist_scenes",
                                                     "path": "/nonexistent/x.npz"}}).data)


# --- scores -----------------------------------------------------------------------------------

def test_confusion_and_scores_by_hand():
    y = jnp.array([[0, 0, 1, 2], [2, 2, 255, 1]])
    p = jnp.array([[0, 1, 1, 2], [2, 0, 0, 0]])
    c = np.asarray(confusion_matrix(y, p, 4))
    np.testing.assert_array_equal(c, [[1, 1, 0, 0], [1, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]])
    scores = segmentation_scores(c)
    assert scores["pixel_accuracy"] == pytest.approx(4 / 7)
    # IoU = hits / (truth + predicted − hits): class 0: 1/(2+3−1), 1: 1/(2+2−1), 2: 2/(3+2−2)
    assert scores["iou"][:3] == pytest.approx([1 / 4, 1 / 3, 2 / 3])
    assert scores["iou"][3] is None                    # neither present nor predicted
    assert scores["miou"] == pytest.approx((1 / 4 + 1 / 3 + 2 / 3) / 3)


# --- the model --------------------------------------------------------------------------------

@pytest.mark.parametrize("decoder", ["transpose", "upsample"])
def test_unet_shapes_options_and_parameter_count(decoder):
    """Logits per pixel at odd sizes too (the skips padded to size); parameters by hand."""
    cfg = config.from_dict({"model": {"name": "unet", "num_classes": 11,
                                      "decoder": decoder}}).model
    model = from_config(cfg)
    # Shapes only (eval_shape): drawing the weights eagerly compiles one program per shape.
    params, state = jax.eval_shape(lambda k: model.init(k, (64, 64, 1), 11), jax.random.key(0))

    def conv(k, cin, cout, bias):
        return k * k * cin * cout + (cout if bias else 0)
    total, cin = 0, 1
    for width in (16, 32, 64, 128):
        total += conv(3, cin, width, False) + conv(3, width, width, False) + 4 * width
        cin = width
    for width in (64, 32, 16):
        total += conv(2 if decoder == "transpose" else 3, cin, width, True)
        total += conv(3, 2 * width, width, False) + conv(3, width, width, False) + 4 * width
        cin = width
    total += conv(1, 16, 11, True)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == total
    params, state = jax.eval_shape(lambda k: model.init(k, (13, 11, 1), 4), jax.random.key(0))
    logits, new_state = jax.eval_shape(lambda p, s, x: model.apply(p, s, x, train=True),
                                       params, state, jnp.ones((2, 13, 11, 1), jnp.float32))
    assert logits.shape == (2, 13, 11, 4)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="decoder: expected one of"):
        get_model("unet").init(jax.random.key(0), (16, 16, 1), 3, decoder="deconv")


# --- a segmentation run -------------------------------------------------------------------------

@pytest.mark.slow
def test_fit_records_pixel_accuracy_iou_and_predictions(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("JBP_CACHE_DIR", str(tmp_path / "cache"))
    mnist = str(tmp_path / "fake_mnist.npz")
    _fake_mnist(mnist, 220, 230)
    real = data.load_mnist_scenes

    def small(path="", **kw):
        return real(str(tmp_path / "scenes.npz"), num_train=16, num_test=8, mnist_path=mnist)
    monkeypatch.setattr(data, "load_mnist_scenes", small)
    cfg = config.load(os.path.join(ROOT, "configs", "unet_mnist_scenes.toml"),
                      ["train.epochs=1", "train.batch_size=8", "train.eval_batch_size=8"])
    summary = train.fit(cfg, str(tmp_path / "run"), verbose=False)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(evals) == 1 and len(evals[0]["test_iou"]) == 11
    assert summary["test_pixel_accuracy"] == evals[0]["test_pixel_accuracy"]
    assert summary["test_accuracy"] == summary["test_pixel_accuracy"]       # one per pixel
    assert 0.0 <= summary["test_miou"] <= 1.0
    assert os.path.getsize(tmp_path / "run" / "predictions.png") > 0
    assert os.path.getsize(tmp_path / "run" / "curves.png") > 0


@pytest.mark.slow
def test_xray_runs_through_the_unet():
    """Every call of the U-Net, concat's list input and the transposed convolution included:
    manual == autodiff gradients per call, and conv_transpose2d's FLOPs by hand."""
    from jbp import xray
    model = get_model("unet")
    params, state = model.init(jax.random.key(0), (8, 8, 1), 3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, (2, 8, 8)))
    rows = xray.xray(model.apply, params, state, x, y, repeats=0).rows
    layers = [r["layer"] for r in rows]
    assert layers.count("concat") == 3 and layers.count("conv_transpose2d") == 3
    assert max(r["grad_rel_err"] for r in rows) < 1e-5
    up = next(r for r in rows if r["layer"] == "conv_transpose2d")     # 1x1x128 -> 2x2x64
    assert up["in_shape"] == [2, 1, 1, 128] and up["out_shape"] == [2, 2, 2, 64]
    macs = 2 * 1 * 1 * 128 * (2 * 2 * 64)            # every input cell, every tap, C_out
    assert up["flops_fwd"] == 2 * macs + 2 * 2 * 2 * 64

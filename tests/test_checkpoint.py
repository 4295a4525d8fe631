"""Checkpoints: exact round trip, torn/tampered files rejected with fallback, model mismatch."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbp import checkpoint, data, train
from jbp.models import get_model

NORM = dict(mean=(data.MNIST_MEAN,), std=(data.MNIST_STD,))


@pytest.fixture(scope="module")
def setup():
    train_set = data.subset(data.load_mnist()[0], 640)
    model = get_model("lenet5")
    optimizer = optax.adam(1e-3)
    step = train.make_train_step(model.apply, optimizer, donate=False)

    def fresh():
        return train.init_train_state(model, optimizer, jax.random.key(0), (28, 28, 1), 10)

    def run(state, epoch, start, count):
        for _, (x, y) in zip(range(count), data.batches(train_set, 32, seed=0, epoch=epoch,
                                                        start=start, **NORM)):
            state, _ = step(state, x, y)
        return state

    return fresh, run


def _assert_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stop_and_resume_is_bit_identical(tmp_path, setup):
    """2N steps straight == N steps, save, restore into a fresh state, N more."""
    fresh, run = setup
    straight = run(fresh(), 0, 0, 12)
    half = run(fresh(), 0, 0, 6)
    checkpoint.save(str(tmp_path), half, position={"epoch": 0, "batch": 6}, config="x = 1")
    restored, manifest, path = checkpoint.restore_latest(str(tmp_path), fresh())
    assert manifest["position"] == {"epoch": 0, "batch": 6} and manifest["step"] == 6
    _assert_identical(restored, half)
    resumed = run(restored, 0, manifest["position"]["batch"], 6)
    _assert_identical(resumed, straight)


def test_keeps_last_k_and_writes_atomically(tmp_path, setup):
    fresh, run = setup
    state = fresh()
    for i in range(5):
        state = run(state, 0, i, 1)
        checkpoint.save(str(tmp_path), state, keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt-000000004.npz", "ckpt-000000005.npz"]      # no temp files left


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_checkpoint_falls_back_to_previous(tmp_path, setup, damage):
    fresh, run = setup
    first = run(fresh(), 0, 0, 2)
    good = checkpoint.save(str(tmp_path), first)
    second = run(first, 0, 2, 1)
    bad = checkpoint.save(str(tmp_path), second)
    blob = bytearray(open(bad, "rb").read())
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    else:
        blob[len(blob) // 3] ^= 0x01               # one bit, inside the array data
    open(bad, "wb").write(bytes(blob))
    with pytest.raises(checkpoint.CheckpointError, match=os.path.basename(bad)):
        checkpoint.read(bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, manifest, path = checkpoint.restore_latest(str(tmp_path), fresh())
    assert path == good and manifest["step"] == 2
    message = str(caught[0].message)
    assert os.path.basename(bad) in message and os.path.basename(good) in message
    _assert_identical(state, first)


def test_restoring_into_a_different_model_names_the_leaf(tmp_path, setup):
    fresh, _ = setup
    checkpoint.save(str(tmp_path), fresh())
    other = train.init_train_state(get_model("lenet5"), optax.adam(1e-3), jax.random.key(0),
                                   (32, 32, 3), 10)             # conv1 has 3 input channels
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"leaf .*\['conv1'\]\['w'\] has shape \(5, 5, 1, 6\), but the "
                             r"model's leaf .*\['conv1'\]\['w'\] has shape \(5, 5, 3, 6\)"):
        checkpoint.restore_latest(str(tmp_path), other)
    resnet = train.init_train_state(get_model("resnet20"), optax.adam(1e-3), jax.random.key(0),
                                    (28, 28, 1), 10)
    with pytest.raises(checkpoint.CheckpointError, match=r"leaves, the model has"):
        checkpoint.restore_latest(str(tmp_path), resnet)


def test_no_pickle_and_clear_error_when_empty(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoints"):
        checkpoint.restore_latest(str(tmp_path), None)
    np.savez(tmp_path / "ckpt-000000001.npz", manifest=np.array([object()], dtype=object))
    with pytest.raises(checkpoint.CheckpointError, match=r"unreadable checkpoint"):
        checkpoint.read(str(tmp_path / "ckpt-000000001.npz"))

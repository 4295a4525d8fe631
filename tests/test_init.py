"""jbp.init: the public initialisers, against jax.nn.initializers, and the models unchanged."""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp.models import get_model

KEY = jax.random.key(3)
VS = jax.nn.initializers.variance_scaling


@pytest.mark.parametrize("shape", [(3, 3, 4, 8), (5, 5, 1, 6), (120, 84)])
@pytest.mark.parametrize("ours,theirs", [
    (jbp.init.he_normal, VS(2.0, "fan_in", "normal")),
    (jbp.init.lecun_normal, VS(1.0, "fan_in", "normal")),
    (jbp.init.glorot_normal, VS(1.0, "fan_avg", "normal")),
    (jbp.init.glorot_uniform, jax.nn.initializers.glorot_uniform()),
], ids=["he_normal", "lecun_normal", "glorot_normal", "glorot_uniform"])
def test_initialisers_match_jax_nn_initializers(shape, ours, theirs):
    """JAX's variance scaling reads HWIO the same way (in_axis=-2, out_axis=-1, the leading axes
    the receptive field), so the same key gives the same draws."""
    np.testing.assert_allclose(np.asarray(ours(KEY, shape)),
                               np.asarray(theirs(KEY, shape, jnp.float32)), rtol=1e-6, atol=0)


def test_fans_and_statistics():
    assert jbp.init.fans((3, 3, 4, 8)) == (36, 72) and jbp.init.fans((120, 84)) == (120, 84)
    w = np.asarray(jbp.init.he_normal(KEY, (3, 3, 64, 256)))          # 147,456 draws
    assert abs(w.std() - np.sqrt(2 / 576)) < 0.01 * np.sqrt(2 / 576) and abs(w.mean()) < 1e-3
    u = np.asarray(jbp.init.glorot_uniform(KEY, (400, 600)))
    r = np.sqrt(6 / 1000)
    assert u.min() >= -r and u.max() <= r and abs(u.std() - r / np.sqrt(3)) < 0.01 * r


def test_layer_dicts():
    c = jbp.init.conv(KEY, 3, 3, 2, 5)
    assert c["w"].shape == (3, 3, 2, 5) and np.all(np.asarray(c["b"]) == 0)
    np.testing.assert_array_equal(c["w"], jbp.init.he_normal(KEY, (3, 3, 2, 5)))
    assert set(jbp.init.conv(KEY, 1, 1, 2, 5, bias=False)) == {"w"}
    d = jbp.init.dense(KEY, 7, 3, scheme="glorot_normal", dtype=jnp.bfloat16)
    assert d["w"].dtype == jnp.bfloat16 and d["b"].shape == (3,)
    params, state = jbp.init.batch_norm(4)
    assert np.all(np.asarray(params["gamma"]) == 1) and np.all(np.asarray(state["var"]) == 1)
    y = jbp.conv2d(jnp.ones((1, 6, 6, 2), jnp.float32), c["w"], c["b"])   # what layers take
    assert y.shape == (1, 6, 6, 5)


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="scheme: expected one of"):
        jbp.init.conv(KEY, 3, 3, 1, 4, scheme="he")
    with pytest.raises(ValueError, match="shape: expected"):
        jbp.init.he_normal(KEY, (0, 3))


# SHA-256 of every model's (params, state) for jax.random.key(0), recorded with the models'
# initialisers before they moved to jbp.init (commit 6e1a7cc): the models draw the same arrays.
DIGESTS = {
    ("seed_cnn", (28, 28, 1)): "bc35a4adc35257fed9c270ddc71dad150901e3bceee67a30093993e82f01e629",
    ("lenet5", (28, 28, 1)): "321461570a61dbec2a7f39e09b389612fc6ff602df9542f4707f510478ea39ce",
    ("resnet20", (32, 32, 3)): "5fb6df24dd9eb0c7d5fa77fe65fac49d7d6cbdfa0d1cb73ceeefe2f59d562c79",
    ("resnet18", (64, 64, 3)): "29b3a613c068e30030b7276cb851a2d12e87e353af614575c7ee90f77a01a05b",
}


@pytest.mark.parametrize("name,shape", [
    pytest.param(*key, marks=pytest.mark.slow) if key[0] == "resnet18" else key
    for key in DIGESTS], ids=[n for n, _ in DIGESTS])
def test_models_initialise_exactly_as_before(name, shape):
    with jax.enable_x64(False):
        params, state = get_model(name).init(jax.random.key(0), shape, 10)
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path((params, state))[0]:
        a = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(a.dtype.str.encode())
        h.update(a.tobytes())
    assert h.hexdigest() == DIGESTS[(name, shape)]


# Every model at a small input and at a second input size/class count: the compiled draws
# (jbp.init's default, one program per layer shape) against the eager ones the models drew
# before (``jbp.init._JIT = False``: jax.random's draw, then the scaling, dispatched one
# operation at a time), bit for bit. (The digests above pin four models to their recorded
# arrays independently of either path.)
INIT_CASES = [("seed_cnn", (6, 6, 1), 5), ("lenet5", (28, 28, 1), 10),
              ("resnet20", (12, 12, 3), 5), ("resnet18", (32, 32, 3), 7),
              ("mobilenet_v2", (32, 32, 3), 5), ("efficientnet_b0", (32, 32, 1), 10),
              ("unet", (12, 10, 1), 5)]


def test_init_cases_cover_every_model():
    from jbp.models import MODELS
    assert {name for name, *_ in INIT_CASES} == set(MODELS)


@pytest.mark.parametrize("name,shape,classes", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_compiled_init_draws_the_eager_bits(name, shape, classes, monkeypatch):
    model = get_model(name)
    compiled = model.init(jax.random.key(7), shape, classes)
    monkeypatch.setattr(jbp.init, "_JIT", False)
    eager = model.init(jax.random.key(7), shape, classes)
    leaves_c = jax.tree_util.tree_flatten_with_path(compiled)[0]
    leaves_e = jax.tree_util.tree_flatten_with_path(eager)[0]
    assert [p for p, _ in leaves_c] == [p for p, _ in leaves_e]
    for (path, a), (_, b) in zip(leaves_c, leaves_e):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), jax.tree_util.keystr(path)

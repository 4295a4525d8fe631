"""jbp layers inside Equinox and Flax NNX modules: one optax step equals the same model written
with jbp directly (plain pytrees), for both the hand-written and JAX's gradients.

Equinox is in the [test] extra (three small pure-Python wheels); Flax is not (it pulls orbax,
tensorstore, protobuf and a dozen more): its test runs where flax is installed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import autodiff

K1, K2 = jax.random.split(jax.random.key(0))
X = jax.random.normal(jax.random.key(1), (8, 12, 12, 1), jnp.float32)
Y = jnp.arange(8) % 10
OPT = optax.sgd(0.1, momentum=0.9)


def _params():
    return {"conv": jbp.init.conv(K1, 3, 3, 1, 4),
            "fc": jbp.init.dense(K2, 6 * 6 * 4, 10, scheme="glorot_uniform")}


def _forward(ns, conv_w, conv_b, fc_w, fc_b, x):
    h = ns.max_pool(ns.relu(ns.conv2d(x, conv_w, conv_b)), window=2)
    return ns.dense(ns.flatten(h), fc_w, fc_b)


def _reference_step(ns):
    """The model as plain jbp: a params dict, jax.value_and_grad, optax."""
    params = _params()

    def loss(p, x, y):
        logits = _forward(ns, p["conv"]["w"], p["conv"]["b"], p["fc"]["w"], p["fc"]["b"], x)
        return ns.softmax_cross_entropy(logits, y)

    @jax.jit
    def step(p, opt_state, x, y):
        value, grads = jax.value_and_grad(loss)(p, x, y)
        updates, opt_state = OPT.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), value

    new, value = step(params, OPT.init(params), X, Y)
    return value, new


def _assert_same(value, leaves, ref_value, ref):
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    want = [ref["conv"]["w"], ref["conv"]["b"], ref["fc"]["w"], ref["fc"]["b"]]
    changed = [np.asarray(w) for w in want]
    start = _params()
    assert not np.allclose(changed[0], np.asarray(start["conv"]["w"]))   # the step did move it
    for got, w in zip(leaves, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ns", [jbp, autodiff], ids=["manual", "autodiff"])
def test_equinox_module(ns):
    eqx = pytest.importorskip("equinox")

    class Net(eqx.Module):
        conv_w: jax.Array
        conv_b: jax.Array
        fc_w: jax.Array
        fc_b: jax.Array

        def __call__(self, x):
            return _forward(ns, self.conv_w, self.conv_b, self.fc_w, self.fc_b, x)

    p = _params()
    model = Net(p["conv"]["w"], p["conv"]["b"], p["fc"]["w"], p["fc"]["b"])
    opt_state = OPT.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, opt_state, x, y):
        value, grads = eqx.filter_value_and_grad(
            lambda m: ns.softmax_cross_entropy(m(x), y))(model)
        updates, opt_state = OPT.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, value

    model, opt_state, value = step(model, opt_state, X, Y)
    ref_value, ref = _reference_step(ns)
    _assert_same(value, [model.conv_w, model.conv_b, model.fc_w, model.fc_b], ref_value, ref)


@pytest.mark.parametrize("ns", [jbp, autodiff], ids=["manual", "autodiff"])
def test_flax_nnx_module(ns):
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, p):
            self.conv_w, self.conv_b = nnx.Param(p["conv"]["w"]), nnx.Param(p["conv"]["b"])
            self.fc_w, self.fc_b = nnx.Param(p["fc"]["w"]), nnx.Param(p["fc"]["b"])

        def __call__(self, x):
            return _forward(ns, self.conv_w[...], self.conv_b[...], self.fc_w[...],
                            self.fc_b[...], x)

    graphdef, state = nnx.split(Net(_params()))       # functional: state is a pytree
    opt_state = OPT.init(state)

    @jax.jit
    def step(state, opt_state, x, y):
        def loss(state):
            return ns.softmax_cross_entropy(nnx.merge(graphdef, state)(x), y)
        value, grads = jax.value_and_grad(loss)(state)
        updates, opt_state = OPT.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, value

    state, opt_state, value = step(state, opt_state, X, Y)
    model = nnx.merge(graphdef, state)
    ref_value, ref = _reference_step(ns)
    _assert_same(value, [model.conv_w[...], model.conv_b[...], model.fc_w[...], model.fc_b[...]],
                 ref_value, ref)


def _readme_blocks():
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme[readme.index("## Inside Equinox or Flax"):readme.index("## The gradient")]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.mark.parametrize("index,module,printed", [(0, "equinox", "equinox step, loss"),
                                                  (1, "flax.nnx", "flax nnx step, loss")],
                         ids=["equinox", "flax"])
def test_readme_snippets_run(index, module, printed, capsys):
    pytest.importorskip(module)
    blocks = _readme_blocks()
    assert len(blocks) == 2
    with jax.enable_x64(False):                # as a user runs it: float32 defaults
        exec(compile(blocks[index], "README.md", "exec"), {})
    out = capsys.readouterr().out
    loss = float(out.split(printed)[1])
    assert np.isfinite(loss) and loss > 0          # a cross-entropy; the step ran

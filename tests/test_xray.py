"""The X-ray (jbp.xray, scripts/xray.py) on LeNet-5 with a tiny batch, against independent counts:
parameters from the pytree, FLOPs and residual bytes by hand, gradient norms from jax.grad."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import config as config_lib
from jbp import LayerPolicy, data
from jbp.models import get_model

#: Outside the fast loop (``pytest -m 'not slow'``): per-layer timing programs. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 2


def _script():
    spec = importlib.util.spec_from_file_location("xray_script",
                                                  os.path.join(ROOT, "scripts", "xray.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("xray")
    rc = _script().main(["--config", os.path.join(ROOT, "configs", "lenet_mnist.toml"),
                         "--batch", str(BATCH), "--repeats", "1",
                         "--json", str(out / "x.json"), "--png", str(out / "x.png")])
    assert rc == 0
    with open(out / "x.json") as f:
        report = json.load(f)
    # The same model and batch, rebuilt here independently of the X-ray.
    cfg = config_lib.load(os.path.join(ROOT, "configs", "lenet_mnist.toml"))
    train_set, _ = data.load_dataset(cfg.data, 10)
    x, y = next(data.batches(train_set, BATCH, mean=cfg.data.mean, std=cfg.data.std,
                             seed=cfg.train.seed))
    model = get_model("lenet5")
    params, state = model.init(jax.random.key(cfg.train.seed), x.shape[1:], 10)
    return report, {r["path"]: r for r in report["rows"]}, params, state, x, y, out


def test_rows_are_the_lenet_calls_in_order(run):
    report, _, *_ = run
    assert [r["path"] for r in report["rows"]] == [
        "conv1", "conv1.relu", "conv1.max_pool", "conv2", "conv2.relu", "conv2.max_pool",
        "conv2.flatten", "fc1", "fc1.relu", "fc2", "fc2.relu", "fc3", "loss"]
    for key in ("path", "layer", "fwd_ms", "bwd_ms", "residual_bytes",
                "autodiff_residual_bytes", "grad_rel_err", "bwd_fwd_ratio", "flops_fwd"):
        assert all(key in r for r in report["rows"]), key
    assert all(r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in report["rows"])
    if importlib.util.find_spec("matplotlib"):          # the [plots] extra; CI runs without it
        assert os.path.getsize(run[-1] / "x.png") > 1000
    else:
        assert not os.path.exists(run[-1] / "x.png")


def test_parameter_counts_from_the_pytree(run):
    _, rows, params, *_ = run
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        assert rows[name]["params"] == sum(np.size(v) for v in jax.tree.leaves(params[name]))
    assert rows["conv1.relu"]["params"] == 0


def test_conv_flops_by_hand(run):
    _, rows, *_ = run
    # conv2: 14×14×6 -> 10×10×16, 5×5 kernel: 2·N·10·10·16·(5·5·6) products, plus the bias.
    macs = BATCH * 10 * 10 * 16 * 5 * 5 * 6
    assert rows["conv2"]["flops_fwd"] == 2 * macs + BATCH * 10 * 10 * 16
    assert rows["conv2"]["flops_bwd"] == 4 * macs + BATCH * 10 * 10 * 16


def test_residual_bytes_against_array_sizes(run):
    _, rows, params, _, x, *_ = run
    f32 = 4
    # conv: the rule keeps a, W, b.
    assert rows["conv1"]["residual_bytes"] == (x.size + params["conv1"]["w"].size + 6) * f32
    # relu: its output (same size as the input); max-pool: one int8 index per output cell.
    assert rows["conv1.relu"]["residual_bytes"] == BATCH * 28 * 28 * 6 * f32
    assert rows["conv1.max_pool"]["residual_bytes"] == BATCH * 14 * 14 * 6
    # dense: jbp keeps x, W and b; JAX's autodiff keeps x and W.
    assert rows["fc1"]["residual_bytes"] == (BATCH * 400 + 400 * 120 + 120) * f32
    assert rows["fc1"]["autodiff_residual_bytes"] == (BATCH * 400 + 400 * 120) * f32


def test_gradients_small_error_and_norms_match_jax_grad(run):
    _, rows, params, state, x, y, _ = run
    assert max(r["grad_rel_err"] for r in rows.values()) < 1e-5
    model = get_model("lenet5")

    def loss(p):
        import jbp.autodiff as ad
        logits, _ = model.apply(p, state, jnp.asarray(x), train=True,
                                layers=LayerPolicy("autodiff"))
        return ad.softmax_cross_entropy(logits, jnp.asarray(y))

    g = jax.grad(loss)(params)
    for name in ("conv1", "conv2", "fc1", "fc3"):
        want = np.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g[name])))
        np.testing.assert_allclose(rows[name]["grad_norm_w"], want, rtol=1e-4)


def test_call_on_the_input_batch_times_no_input_gradient(run):
    """A training step never computes ∂L/∂(images): the X-ray's backward of LeNet's first
    convolution is ∂L/∂W and ∂L/∂b alone (its FLOPs by hand: one product sum plus the bias
    sum), every later call's backward includes ∂L/∂a. The timed backward program's outputs are
    the parameters' shapes (jbp.xray._measure times exactly the program whose outputs these are)."""
    from jbp import xray
    _, rows, params, state, x, y, _ = run
    assert [p for p, r in rows.items() if not r["input_grad"]] == ["conv1"]
    assert rows["conv1"]["grad_norm_a"] is None and rows["conv2"]["grad_norm_a"] > 0
    macs = BATCH * 28 * 28 * 6 * 5 * 5 * 1
    assert rows["conv1"]["flops_bwd"] == 2 * macs + BATCH * 28 * 28 * 6
    model = get_model("lenet5")
    calls = xray.record(model.apply, params, state, jnp.asarray(x), jnp.asarray(y))
    deltas = xray.cotangents(model.apply, params, state, jnp.asarray(x), jnp.asarray(y), calls)
    for k in (0, 3):                                    # conv1 (on the images), conv2
        out = xray._measure(LayerPolicy("manual"), calls[k], deltas[k], repeats=0)
        shapes = [np.shape(g) for g in jax.tree.leaves(out["grads"])]
        p = params[calls[k].path]
        want = ([] if k == 0 else [np.shape(calls[k].args[0])]) + [p["w"].shape, p["b"].shape]
        assert shapes == want, calls[k].path

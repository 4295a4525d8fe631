"""jbp.curvature against the dense Hessian of the autodiff twin of a small model, in float64."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbp
import jbp.models
from jbp import config, curvature, train

#: Outside the fast loop (``pytest -m 'not slow'``): second-order programs and a training run. CI
#: runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_apply(params, state, x, *, train, layers=jbp.LayerPolicy()):
    """conv 3×3 (1->2) -> batch norm -> relu -> max-pool 2 -> flatten -> dense (3 classes)."""
    nn = layers
    h = nn.conv2d(x, params["conv"]["w"], params["conv"]["b"])
    h, _ = nn.batch_norm(h, params["bn"]["gamma"], params["bn"]["beta"], state["mean"],
                         state["var"], train=train)
    h = nn.flatten(nn.max_pool(nn.relu(h), 2))
    return nn.dense(h, params["fc"]["w"], params["fc"]["b"]), state


def _setup():
    k = jax.random.split(jax.random.key(0), 6)
    f64 = jnp.float64
    params = {"conv": {"w": 0.5 * jax.random.normal(k[0], (3, 3, 1, 2), f64),
                       "b": 0.1 * jax.random.normal(k[1], (2,), f64)},
              "bn": {"gamma": 1 + 0.2 * jax.random.normal(k[2], (2,), f64),
                     "beta": 0.1 * jax.random.normal(k[3], (2,), f64)},
              "fc": {"w": 0.5 * jax.random.normal(k[4], (18, 3), f64),
                     "b": jnp.zeros(3, f64)}}
    state = {"mean": jnp.zeros(2, f64), "var": jnp.ones(2, f64)}
    x = jax.random.normal(k[5], (6, 6, 6, 1), f64)
    y = jnp.arange(6) % 3
    return params, state, x, y


def _dense_hessian(params, state, x, y):
    flat, unravel = ravel_pytree(params)
    loss = curvature.train_loss(_tiny_apply, state, x, y, grad="autodiff")
    return np.asarray(jax.hessian(lambda f: loss(unravel(f)))(flat)), flat, unravel


def test_hvp_matches_dense_hessian():
    params, state, x, y = _setup()
    h, flat, unravel = _dense_hessian(params, state, x, y)
    v = jax.random.normal(jax.random.key(1), flat.shape, flat.dtype)
    loss = curvature.train_loss(_tiny_apply, state, x, y)          # jbp's rules
    got = ravel_pytree(curvature.hvp(loss, params, unravel(v)))[0]
    np.testing.assert_allclose(got, h @ np.asarray(v), rtol=1e-9, atol=1e-11)


def test_top_eigenvalue_and_trace_match_dense_hessian():
    params, state, x, y = _setup()
    h, _, _ = _dense_hessian(params, state, x, y)
    eig = np.linalg.eigvalsh((h + h.T) / 2)
    loss = curvature.train_loss(_tiny_apply, state, x, y)
    lam, v = curvature.top_eigenvalue(loss, params, key=jax.random.key(2), iters=2000,
                                      tol=1e-13)
    np.testing.assert_allclose(lam, eig[-1], rtol=1e-6)
    tr, stderr = curvature.hutchinson_trace(loss, params, key=jax.random.key(3), samples=200)
    assert abs(tr - np.trace(h)) <= 4 * stderr, (tr, stderr, np.trace(h))
    assert stderr < 0.5 * abs(np.trace(h))                 # the check is not vacuous


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_curvature_script_on_a_short_run(tmp_path):
    run = str(tmp_path / "run")
    cfg = config.load(os.path.join(ROOT, "configs", "lenet_mnist.toml"), [
        "data.train_limit=64", "data.test_limit=100", "train.batch_size=32", "train.epochs=2",
        "train.checkpoint_every=2"])
    assert train.fit(cfg, run)["status"] == "finished"
    assert _script("curvature").main([run, "--batch", "16", "--iters", "3"]) == 0
    with open(os.path.join(run, "curvature.json")) as f:
        points = json.load(f)["points"]
    assert [p["step"] for p in points] == [2, 4]
    assert all(np.isfinite(p["lambda_max"]) and p["lambda_max"] > 0 for p in points)
    # The plot needs the [plots] extra (matplotlib); CI runs without it.
    assert os.path.isfile(os.path.join(run, "curvature.png")) == bool(
        importlib.util.find_spec("matplotlib"))

"""Random layers under a mesh: each device of a data-parallel step draws its own dropout mask.

A model whose only random layer is dropout on its input, ``logits = dropout(x) W``, trained one
SGD step (learning rate 1, so ``W₀ − W₁`` is the gradient) on two host devices with the same
image on both. The step's gradient must equal the mean of the two one-device gradients with keys
``fold_in(fold_in(rng, step), d)``, d = 0, 1 — and not the gradient of every device using the
same key (the old behaviour, which this test fails on: the control asserts the two differ).

The same subprocess trains EfficientNet-B0's family (tests/_tiny_nets.py: B0's blocks at a tiny
size — depthwise and pointwise convolutions, squeeze-and-excitation, SiLU, batch norm synchronised
over the mesh; B0 itself compiled twice in float64 cost 90 s here) one float64 step data parallel
and compares it with the same step on one device over the whole batch (dropout and stochastic
depth at rate 0: the masks are what the first check is about).
Runs in a subprocess (XLA's device count is fixed when jax is first imported)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

#: Outside the fast loop (``pytest -m 'not slow'``), like tests/test_data_parallel.py: a
#: subprocess with its own devices (about 25 s on two cores). CI runs it.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
RATE = 0.5


def _check() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jbp
    from jbp.models import Model
    from jbp.policy import LayerPolicy
    from jbp.train import TrainState, make_train_step

    def init(key, input_shape, num_classes):
        features = int(np.prod(input_shape))
        return {"w": jax.random.normal(key, (features, num_classes))}, {}

    def apply(params, state, x, *, train, layers=LayerPolicy(), key=None):
        h = layers.flatten(x)
        if key is not None:
            h = layers.dropout(h, RATE, key, train=train)
        return layers.dense(h, params["w"]), state

    model = Model("dropout_probe", init, apply)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    params, model_state = model.init(jax.random.key(0), (4, 4, 1), 3)
    opt = optax.sgd(1.0)
    rng = jax.random.key(7)
    state = TrainState(params, model_state, opt.init(params), jnp.asarray(5, jnp.int32), rng)
    image = jax.random.normal(jax.random.key(1), (1, 4, 4, 1))
    x, y = jnp.concatenate([image, image]), jnp.array([2, 2])
    step = make_train_step(model.apply, opt, mesh=mesh, donate=False)
    new_state, _ = step(state, x, y)
    grad = np.asarray(params["w"] - new_state.params["w"])

    def one_device_grad(key):
        def loss(p):
            logits, _ = apply(p, {}, image, train=True, key=key)
            return jbp.softmax_cross_entropy(logits, y[:1])
        return np.asarray(jax.grad(loss)(params)["w"])

    step_key = jax.random.fold_in(rng, 5)
    per_device = np.mean([one_device_grad(jax.random.fold_in(step_key, d)) for d in (0, 1)], 0)
    same_key = one_device_grad(step_key)
    scale = float(np.max(np.abs(per_device)))
    return {"devices": jax.device_count(),
            "vs_per_device_keys": float(np.max(np.abs(grad - per_device))) / scale,
            "vs_same_key": float(np.max(np.abs(grad - same_key))) / scale,
            "per_device_vs_same_key": float(np.max(np.abs(per_device - same_key))) / scale}


def _check_efficientnet_step() -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from _tiny_nets import TINY_EFFICIENTNET as base
    from jbp.models import Model
    from jbp.train import init_train_state, make_train_step

    jax.config.update("jax_enable_x64", True)
    model = Model(base.name, base.init,
                  functools.partial(base.apply, dropout=0.0, stochastic_depth=0.0))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    opt = optax.sgd(0.1, momentum=0.9)
    state = init_train_state(model, opt, jax.random.key(0), (32, 32, 1), 10)
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    x = jax.random.normal(jax.random.key(3), (4, 32, 32, 1), jnp.float64)
    y = jnp.array([1, 7, 3, 0])
    single, _ = make_train_step(model.apply, opt, donate=False)(state, x, y)
    sharded, _ = make_train_step(model.apply, opt, mesh=mesh, donate=False)(state, x, y)

    def rel(a, b):
        """max |a − b| over the whole tree, relative to max |b| over the whole tree."""
        la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
        scale = max(float(np.max(np.abs(np.asarray(q)))) for q in lb)
        return max(float(np.max(np.abs(np.asarray(p) - np.asarray(q))))
                   for p, q in zip(la, lb)) / scale
    return {"params": rel(sharded.params, single.params),
            "model_state": rel(sharded.model_state, single.model_state),
            "moved": rel(single.params, state.params)}


def _run_subprocess() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def checks() -> dict:
    return _run_subprocess()


def test_efficientnet_data_parallel_step_equals_one_device(checks):
    r = checks["efficientnet"]
    assert r["moved"] > 1e-6, r                       # the step changed the weights at all
    assert r["params"] < 1e-10 and r["model_state"] < 1e-10, r


def test_each_device_draws_its_own_dropout_mask(checks):
    r = checks["dropout"]
    assert r["devices"] == 2
    assert r["per_device_vs_same_key"] > 0.1, r     # the control: the two hypotheses differ
    assert r["vs_per_device_keys"] < 1e-6, r        # float32
    assert r["vs_same_key"] > 0.1, r


if __name__ == "__main__":
    print(json.dumps({"dropout": _check(), "efficientnet": _check_efficientnet_step()}))

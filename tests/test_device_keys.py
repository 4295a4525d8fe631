"""Random layers under a mesh: each device of a data-parallel step draws its own dropout mask.

A model whose only random layer is dropout on its input, ``logits = dropout(x) W``, trained one
SGD step (learning rate 1, so ``W₀ − W₁`` is the gradient) on two host devices with the same
image on both. The step's gradient must equal the mean of the two one-device gradients with keys
``fold_in(fold_in(rng, step), d)``, d = 0, 1 — and not the gradient of every device using the
same key (the old behaviour, which this test fails on: the control asserts the two differ).
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


def test_each_device_draws_its_own_dropout_mask():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 2
    assert r["per_device_vs_same_key"] > 0.1, r     # the control: the two hypotheses differ
    assert r["vs_per_device_keys"] < 1e-6, r        # float32
    assert r["vs_same_key"] > 0.1, r


if __name__ == "__main__":
    print(json.dumps(_check()))

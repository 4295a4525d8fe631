"""The plain networks of the gradient-flow study: configs load, shortcuts and batch norm are gone
from the pytree, and jbp's gradients equal JAX's autodiff of the same forward."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import config as config_lib
from jbp.models import from_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, bn", [("plain20_mnist", True), ("plain20_nobn_mnist", False)])
def test_plain_configs_build_plain_networks(name, bn):
    cfg = config_lib.load(os.path.join(ROOT, "configs", f"{name}.toml"))
    assert (cfg.model.shortcuts, cfg.model.batch_norm) == (False, bn)
    model = from_config(cfg.model)
    params, state = model.init(jax.random.key(0), (8, 8, 1), 10)
    assert not any("proj" in p for p in params["blocks"])
    assert len(params["blocks"]) == 9
    assert all(("bn1" in p) == bn and ("b" in p["conv1"]) == (not bn) for p in params["blocks"])
    assert ("stem_bn" in params) == bn


def test_plain_nobn_gradients_match_autodiff():
    cfg = config_lib.load(os.path.join(ROOT, "configs", "plain20_nobn_mnist.toml"))
    model = from_config(cfg.model)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1), jnp.float64)
    y = jnp.arange(2)
    params, state = model.init(jax.random.key(0), (8, 8, 1), 10)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)

    def grads(grad):
        def loss(p):
            logits, _ = model.apply(p, state, x, train=True, layers=jbp.LayerPolicy(grad))
            return jbp.LayerPolicy(grad).softmax_cross_entropy(logits, y)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads("manual"), grads("autodiff")):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)

"""The bf16 precision policy: float32 master state, bfloat16 forward and backward.

Reference for the tolerances: bf16's own error, measured, not chosen. For each parameter leaf,
``e_auto`` = relative distance of JAX's autodiff gradient in bf16 from the float32 gradient.
The manual bf16 gradient must be within ``3·max(e_auto, u)`` of autodiff's bf16 gradient and
within ``3·max(e_auto, u)`` of the float32 gradient (``u = 2⁻⁸``, bf16's unit roundoff): two
roundings of the same computation to bf16 differ by at most the sum of their errors, and 3
leaves room for the manual rule's rounding being ~1.5× autodiff's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import config as config_lib
from jbp.models import get_model
from jbp.train import init_train_state, make_loss, make_optimizer, make_train_step

#: Outside the fast loop (``pytest -m 'not slow'``): float64 references of whole models. CI runs it.
pytestmark = pytest.mark.slow

U_BF16 = 2.0 ** -8


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _batch(n=32, shape=(28, 28, 1)):
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32),
            jnp.asarray(rng.integers(0, 10, n), jnp.int32))


def _grads(model, params, state, x, y, grad, precision):
    objective = make_loss(model.apply, grad=grad, precision=precision)
    (loss, _), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(params, state, x, y)
    return loss, g


@pytest.mark.parametrize("model_name", ["lenet5", "resnet20"])
def test_bf16_manual_gradients_within_bf16_error(model_name):
    model = get_model(model_name)
    params, state = model.init(jax.random.key(0), (28, 28, 1), 10)
    x, y = _batch(16 if model_name == "resnet20" else 32)
    _, g32 = _grads(model, params, state, x, y, "autodiff", "f32")
    loss_m, gm = _grads(model, params, state, x, y, "manual", "bf16")
    loss_a, ga = _grads(model, params, state, x, y, "autodiff", "bf16")
    assert loss_m.dtype == loss_a.dtype == jnp.float32
    for path_leaf, m, a, r in zip(jax.tree_util.tree_flatten_with_path(g32)[0],
                                  jax.tree.leaves(gm), jax.tree.leaves(ga), jax.tree.leaves(g32)):
        name = jax.tree_util.keystr(path_leaf[0])
        assert m.dtype == a.dtype == jnp.float32, name          # f32 gradients at the optimizer
        e_auto = _rel(a, r)
        assert e_auto > 0, name                                  # bf16 really was used
        tol = 3 * max(e_auto, U_BF16)
        assert _rel(m, a) <= tol, (name, _rel(m, a), e_auto)
        assert _rel(m, r) <= tol, (name, _rel(m, r), e_auto)


def test_bf16_step_keeps_float32_state():
    model = get_model("resnet20")
    opt = make_optimizer("momentum", 0.05)
    state = init_train_state(model, opt, jax.random.key(0), (28, 28, 1), 10)
    x, y = _batch(8)
    step = make_train_step(model.apply, opt, grad="manual", precision="bf16", donate=False)
    new, metrics = step(state, x, y)
    for leaf in jax.tree.leaves((new.params, new.model_state, new.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32
    assert metrics["loss"].dtype == jnp.float32 and bool(metrics["finite"])
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)))
    assert moved > 0


def test_precision_option_errors_and_config():
    model = get_model("lenet5")
    with pytest.raises(ValueError, match="precision.*f32.*bf16.*'fp16'"):
        make_train_step(model.apply, make_optimizer("sgd", 0.1), precision="fp16")
    cfg = config_lib.from_dict({"train": {"precision": "bf16", "data_parallel": "off"}})
    assert cfg.train.precision == "bf16" and cfg.train.data_parallel == "off"
    assert config_lib.TrainConfig().precision == "f32"
    assert config_lib.TrainConfig().data_parallel == "auto"
    with pytest.raises(config_lib.ConfigError, match="precision"):
        config_lib.from_dict({"train": {"precision": "fp16"}})
    with pytest.raises(config_lib.ConfigError, match="data_parallel"):
        config_lib.from_dict({"train": {"data_parallel": "yes"}})

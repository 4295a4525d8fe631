"""Numerical edge cases: gradients stay finite and equal autodiff wherever autodiff is finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import accuracy


def _grads(ns_fn, *args):
    out, vjp = jax.vjp(ns_fn, *args)
    u = jnp.asarray(np.random.default_rng(0).standard_normal(np.shape(out)), out.dtype)
    return vjp(u)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_constant_channel(train):
    """A channel with zero variance: x̂ = 0, 1/σ = 1/√ε; nothing blows up."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 3, 2))
    x[..., 1] = 2.5                                            # channel 1 is constant
    x = jnp.asarray(x, jnp.float32)
    g, b = jnp.asarray([1.5, 0.7], jnp.float32), jnp.asarray([0.1, -0.2], jnp.float32)
    mean, var = jnp.zeros(2, jnp.float32), jnp.ones(2, jnp.float32)

    def f(ns):
        return lambda x, g, b: ns.batch_norm(x, g, b, mean, var, train=train)[0]

    manual, auto = _grads(f(jbp), x, g, b), _grads(f(jbp.autodiff), x, g, b)
    for m, a in zip(manual, auto):
        assert bool(jnp.all(jnp.isfinite(m)))
        np.testing.assert_allclose(np.asarray(m), np.asarray(a), rtol=1e-4, atol=1e-4)
    if train:
        y = jbp.batch_norm(x, g, b, mean, var, train=True)[0]
        np.testing.assert_allclose(np.asarray(y[..., 1]), -0.2, atol=1e-6)   # = β exactly
        # The gradient w.r.t. a constant channel is γ/√ε · (δ − mean δ): finite, mean zero.
        np.testing.assert_allclose(float(jnp.sum(manual[0][..., 1])), 0.0, atol=1e-3)


@pytest.mark.parametrize("offset", [0.0, 30.0, 300.0])
def test_batch_norm_train_gradient_accuracy_with_a_large_mean(offset):
    """float32 gradients against float64 ones when μ is hundreds of σ.

    The backward forms ∂L/∂γ as (Σ δx − μ Σ δ)/σ, which cancels when |μ| ≫ σ, and so does JAX's
    derivative of the same forward: judged by jbp.accuracy's verdict, the manual error within
    8× autodiff's own float32 error (plus 16 ulps), each against float64 autodiff. A one-pass
    variance E[x²] − μ² in the forward (5e-3 off at 300σ) would fail it."""
    rng = np.random.default_rng(2)
    x = offset + rng.standard_normal((64, 6, 6, 3))
    u = rng.standard_normal(x.shape)
    g, b = rng.uniform(0.5, 1.5, 3), rng.uniform(-0.5, 0.5, 3)

    def grads(ns, dtype):
        args = [jnp.asarray(a, dtype) for a in (x, g, b)]
        stats = jnp.zeros(3, dtype), jnp.ones(3, dtype)
        f = lambda x, g, b: ns.batch_norm(x, g, b, *stats, train=True)[0]   # noqa: E731
        return jax.vjp(f, *args)[1](jnp.asarray(u, dtype))

    reference = grads(jbp.autodiff, jnp.float64)            # x64 is on for the suite
    check = accuracy.judge(grads(jbp, jnp.float32), grads(jbp.autodiff, jnp.float32), reference,
                           ["x", "gamma", "beta"])
    assert check.ok, str(check)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_saturated_activations(name, dtype):
    x = jnp.asarray([-1e4, -80.0, -30.0, 0.0, 30.0, 80.0, 1e4], dtype)
    manual = jax.grad(lambda x: jnp.sum(getattr(jbp, name)(x)))(x)
    auto = jax.grad(lambda x: jnp.sum(getattr(jbp.autodiff, name)(x)))(x)
    assert manual.dtype == dtype and bool(jnp.all(jnp.isfinite(manual)))
    np.testing.assert_allclose(np.asarray(manual, np.float64), np.asarray(auto, np.float64),
                               atol=1e-7)
    by_hand = {"sigmoid": 0.25, "tanh": 1.0}[name]             # σ'(0) = 1/4, tanh'(0) = 1
    assert float(manual[3]) == pytest.approx(by_hand)
    assert float(manual[0]) == 0.0 and float(manual[-1]) == 0.0


def test_empty_batch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"logits: the batch is empty"):
        jbp.softmax_cross_entropy(jnp.zeros((0, 10)), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"pred: the batch is empty"):
        jbp.mse(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match=r"more than one value per channel"):
        c = jnp.zeros((3,))
        jbp.batch_norm(jnp.zeros((0, 4, 4, 3)), c, c, c, c, train=True)


def test_max_pool_constant_windows_match_autodiff():
    x = jnp.ones((2, 6, 6, 3), jnp.float32)
    for kw in (dict(window=2), dict(window=3, stride=2, padding=1)):
        manual = _grads(lambda x: jbp.max_pool(x, **kw), x)[0]
        auto = _grads(lambda x: jbp.autodiff.max_pool(x, **kw), x)[0]
        np.testing.assert_allclose(np.asarray(manual), np.asarray(auto), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "sigmoid", "tanh"])
def test_activations_propagate_nan(name):
    """NaN in, NaN out: an activation must not hide a NaN from the non-finite guard."""
    x = jnp.asarray([-1.0, jnp.nan, 0.0, 2.0], jnp.float32)
    for ns in (jbp, jbp.autodiff):
        y = getattr(ns, name)(x)
        assert bool(jnp.isnan(y[1])) and not bool(jnp.any(jnp.isnan(y[jnp.array([0, 2, 3])])))

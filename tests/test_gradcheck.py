"""The checking machinery itself must be able to fail: a wrong rule is caught by each check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import gradcheck
from jbp._rule import manual_rule


def _forward(x, _cfg=None):
    return jnp.tanh(x) * x


def _wrong_bwd(_cfg, x, g):          # misses the tanh'(x)·x term of the product rule
    return (g * jnp.tanh(x),)


_wrong = manual_rule("wrong", _forward, lambda x, cfg: (_forward(x), x), _wrong_bwd, num_args=2)


def wrong(x):
    return _wrong(x, None)


def right(x):
    return _forward(x)


X = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)))


def test_autodiff_comparison_catches_wrong_rule():
    result = gradcheck.versus_autodiff(wrong, right, (X,), names=["x"])
    assert not result.ok
    assert "FAIL" in str(result) and "x" in str(result)
    assert gradcheck.versus_autodiff(right, right, (X,), names=["x"]).ok


@pytest.mark.parametrize("mode", ["full", "directions"])
def test_finite_differences_catch_wrong_rule(mode):
    assert not gradcheck.versus_finite_differences(wrong, (X,), mode=mode).ok
    assert gradcheck.versus_finite_differences(right, (X,), mode=mode).ok


def test_numerical_jacobian_matches_hand_calculation():
    """F(x, w) = (x² · w0, x0·w1): ∂F/∂x = diag(2x·w0) and ∂F1/∂x0 = w1, by hand."""
    x, w = jnp.array([0.5, -1.5, 2.0]), jnp.array([3.0, -2.0])
    jx, jw = gradcheck.numerical_jacobian(lambda x, w: jnp.concatenate([x ** 2 * w[0],
                                                                          x[:1] * w[1]]), (x, w))
    want_x = np.zeros((4, 3))
    want_x[[0, 1, 2], [0, 1, 2]] = 2 * np.asarray(x) * 3.0
    want_x[3, 0] = -2.0
    want_w = np.zeros((4, 2))
    want_w[:3, 0] = np.asarray(x) ** 2
    want_w[3, 1] = 0.5
    np.testing.assert_allclose(jx, want_x, atol=1e-8)
    np.testing.assert_allclose(jw, want_w, atol=1e-8)
    result = gradcheck.versus_finite_differences(lambda x: x ** 2, (x,), mode="full")
    assert result.ok and "full Jacobian 3x3" in str(result)


def test_finite_differences_require_float64():
    with pytest.raises(TypeError, match="float64"):
        gradcheck.versus_finite_differences(right, (X.astype(jnp.float32),))


def test_error_measures_by_hand():
    err = gradcheck.arg_error("w", np.array([1.0, 2.0, 3.5]), np.array([1.0, 2.0, 4.0]),
                              rtol=0.1, atol=0.0)
    assert err.max_abs == pytest.approx(0.5)
    assert err.max_rel == pytest.approx(0.5 / 4.0)
    assert err.cosine == pytest.approx(np.dot([1, 2, 3.5], [1, 2, 4])
                                       / np.linalg.norm([1, 2, 3.5]) / np.linalg.norm([1, 2, 4]))
    assert not err.ok
    assert not gradcheck.arg_error("nan", np.array([np.nan]), np.array([1.0]),
                                   rtol=1, atol=1).ok

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


def test_finite_differences_full_mode_matches_known_jacobian():
    """d(x²)/dx = 2x on the diagonal: the numerical Jacobian reproduces a hand calculation."""
    x = jnp.array([0.5, -1.5, 2.0])
    result = gradcheck.versus_finite_differences(lambda x: x ** 2, (x,), mode="full")
    assert result.ok and result.max_abs < 1e-8
    assert "full Jacobian 3x3" in str(result)


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

"""Max-pool tie rule: all of δ goes to the first maximum in row-major window order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp


def _grad(x, g, **kw):
    _, vjp = jax.vjp(lambda x: jbp.max_pool(x, **kw), x)
    return np.asarray(vjp(g)[0])


def test_all_equal_window_routes_to_top_left():
    x = jnp.ones((1, 2, 2, 1))
    grad = _grad(x, jnp.full((1, 1, 1, 1), 3.0), window=2)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[3.0, 0.0], [0.0, 0.0]])


def test_tie_goes_to_first_in_row_major_order():
    # Window (2x3): maxima at (0, 2) and (1, 0); row-major order visits (0, 2) first.
    x = jnp.array([[0.0, 1.0, 5.0], [5.0, 2.0, 3.0]])[None, :, :, None]
    grad = _grad(x, jnp.ones((1, 1, 1, 1)), window=(2, 3))
    expected = np.zeros((2, 3))
    expected[0, 2] = 1.0
    np.testing.assert_array_equal(grad[0, :, :, 0], expected)


@pytest.mark.parametrize("kw", [dict(window=2), dict(window=3, stride=2),
                                dict(window=3, stride=1, padding=1),
                                dict(window=3, stride=2, padding="SAME")])
def test_constant_input_routed_gradient_sums_to_incoming(kw):
    """Every window is one big tie: each window routes exactly its δ, to one cell."""
    x = jnp.full((2, 7, 7, 3), 0.5)
    y = jbp.max_pool(x, **kw)
    g = jnp.asarray(np.random.default_rng(0).standard_normal(y.shape))
    grad = _grad(x, g, **kw)
    np.testing.assert_allclose(grad.sum(axis=(1, 2)), np.asarray(g).sum(axis=(1, 2)), rtol=1e-6)
    # Overlapping windows may share their first maximum; without overlap each δ lands alone.
    if kw.get("stride", kw["window"]) == kw["window"] and "padding" not in kw:
        assert np.count_nonzero(grad) == np.count_nonzero(np.asarray(g))


def test_tie_rule_matches_jax_first_maximum():
    """JAX's own max-pool gradient also picks the first maximum: same answer on ties."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 3, (2, 8, 8, 2)).astype(np.float32))   # many ties
    g = jnp.asarray(rng.standard_normal((2, 3, 3, 2)).astype(np.float32))
    ours = _grad(x, g, window=3, stride=2)
    _, vjp = jax.vjp(lambda x: jbp.autodiff.max_pool(x, 3, 2), x)
    np.testing.assert_allclose(ours, np.asarray(vjp(g)[0]), rtol=1e-6)


@pytest.mark.parametrize("window, hw", [(2, (6, 8)), ((2, 3), (4, 9)), (1, (3, 4)),
                                        ((3, 1), (6, 2))])
def test_tiling_windows_take_the_reshape_backward_with_the_same_answer(window, hw):
    """Windows that tile the input (stride = window, no padding, no remainder) route δ by one
    compare-and-select on a (N, H_out, KH, W_out, KW, C) view; the general per-tap scatter
    must give the same array, ties included."""
    from jbp.layers import pooling as P
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.integers(0, 3, (2, *hw, 3)).astype(np.float32))   # many ties
    cfg = P.pool_config(x, window, None, "VALID")
    assert P._tiles(cfg)
    y, idx = P._max_fwd(x, cfg)
    g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    general = P._scatter_taps(lambda t: jnp.where(idx == t, g, 0.0), cfg, g.dtype)
    np.testing.assert_array_equal(np.asarray(P._max_bwd(cfg, idx, g)[0]), np.asarray(general))
    np.testing.assert_array_equal(_grad(x, g, window=window), np.asarray(general))


def test_windows_that_do_not_tile_keep_the_scatter_backward():
    from jbp.layers import pooling as P
    x = jnp.zeros((1, 7, 7, 1))
    assert not P._tiles(P.pool_config(x, 2, None, "VALID"))        # a row and column left over
    assert not P._tiles(P.pool_config(x, 3, 2, "VALID"))           # overlapping
    assert not P._tiles(P.pool_config(jnp.zeros((1, 6, 6, 1)), 2, None, 1))   # padded

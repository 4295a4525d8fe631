"""The checking machinery itself must be able to fail: a wrong rule is caught by each check."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
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


def test_autodiff_comparison_op_by_op():
    """``jit=False`` checks the same VJPs dispatched op by op: the same rows to rounding, and the
    wrong rule caught."""
    for fn in (wrong, right):
        compiled = gradcheck.versus_autodiff(fn, right, (X,), names=["x"])
        eager = gradcheck.versus_autodiff(fn, right, (X,), names=["x"], jit=False)
        assert eager.ok == compiled.ok == (fn is right)
        for a, b in zip(eager.args, compiled.args):
            assert a.max_abs == pytest.approx(b.max_abs, rel=1e-6, abs=1e-14)


@pytest.mark.parametrize("mode", ["full", "directions"])
def test_finite_differences_catch_wrong_rule(mode):
    assert not gradcheck.versus_finite_differences(wrong, (X,), mode=mode).ok
    assert gradcheck.versus_finite_differences(right, (X,), mode=mode).ok


def _hand_jacobian(x):
    """F(x, w) = (x² · w0, x0·w1) at w = (3, −2): ∂F/∂x = diag(2x·w0) and ∂F1/∂x0 = w1;
    ∂F/∂w0 = x², ∂F1/∂w1 = x0, by hand."""
    want_x = np.zeros((4, 3))
    want_x[[0, 1, 2], [0, 1, 2]] = 2 * np.asarray(x) * 3.0
    want_x[3, 0] = -2.0
    want_w = np.zeros((4, 2))
    want_w[:3, 0] = np.asarray(x) ** 2
    want_w[3, 1] = 0.5
    return want_x, want_w


def test_numerical_jacobian_matches_hand_calculation():
    x, w = jnp.array([0.5, -1.5, 2.0]), jnp.array([3.0, -2.0])
    jx, jw = gradcheck.numerical_jacobian(lambda x, w: jnp.concatenate([x ** 2 * w[0],
                                                                          x[:1] * w[1]]), (x, w))
    want_x, want_w = _hand_jacobian(x)
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


# --- pytree arguments ---------------------------------------------------------------------------

_RNG = np.random.default_rng(5)
PARAMS = {"w1": jnp.asarray(_RNG.standard_normal((4, 5))),
          "b1": jnp.asarray(_RNG.standard_normal(5)),
          "head": {"w2": jnp.asarray(_RNG.standard_normal((5, 3)))}}
XS = jnp.asarray(_RNG.standard_normal((2, 4)))


def _mlp(ns):
    def f(p, x=XS):
        return ns.dense(ns.tanh(ns.dense(x, p["w1"], p["b1"])), p["head"]["w2"])
    return f


def _mlp_flat(ns):    # the same map, its leaves by hand in jax's (sorted-key) order
    return lambda b1, w2, w1: _mlp(ns)({"w1": w1, "b1": b1, "head": {"w2": w2}})


def test_params_dict_equals_the_hand_flattened_run():
    paths = ["['b1']", "['head']['w2']", "['w1']"]
    tree = gradcheck.versus_autodiff(_mlp(jbp), _mlp(jbp.autodiff), PARAMS)
    flat = gradcheck.versus_autodiff(_mlp_flat(jbp), _mlp_flat(jbp.autodiff),
                                     [PARAMS["b1"], PARAMS["head"]["w2"], PARAMS["w1"]],
                                     names=paths)
    assert [a.name for a in tree.args] == paths
    assert tree.ok and tree.args == flat.args
    for p in paths:
        assert p in str(tree)
    fd_tree = gradcheck.versus_finite_differences(_mlp(jbp), PARAMS, mode="directions")
    fd_flat = gradcheck.versus_finite_differences(
        _mlp_flat(jbp), [PARAMS["b1"], PARAMS["head"]["w2"], PARAMS["w1"]], names=paths,
        mode="directions")
    assert fd_tree.ok and fd_tree.args == fd_flat.args


def test_positional_pytrees_are_named_by_argument_and_path():
    result = gradcheck.versus_autodiff(lambda p, x: _mlp(jbp)(p, x),
                                       lambda p, x: _mlp(jbp.autodiff)(p, x), (PARAMS, XS),
                                       names=["params", "x"])
    assert [a.name for a in result.args] == ["params['b1']", "params['head']['w2']",
                                             "params['w1']", "x"]
    assert result.ok


def test_a_wrong_rule_in_a_tree_is_named_by_its_path():
    params = {"a": {"x": X}, "b": X + 1}
    good = gradcheck.versus_autodiff(lambda p: wrong(p["a"]["x"]) + right(p["b"]),
                                     lambda p: right(p["a"]["x"]) + right(p["b"]), params)
    assert {a.name: a.ok for a in good.args} == {"['a']['x']": False, "['b']": True}
    for mode in ("full", "directions"):
        fd = gradcheck.versus_finite_differences(lambda p: wrong(p["a"]["x"]) * right(p["b"]),
                                                 params, mode=mode)
        assert {a.name: a.ok for a in fd.args} == {"['a']['x']": False, "['b']": True}


def test_numerical_jacobian_of_a_dict_by_hand():
    """The hand calculation above, its arguments in a dict: blocks come back under the same keys."""
    x, w = jnp.array([0.5, -1.5, 2.0]), jnp.array([3.0, -2.0])
    jac = gradcheck.numerical_jacobian(
        lambda p: jnp.concatenate([p["x"] ** 2 * p["w"][0], p["x"][:1] * p["w"][1]]),
        {"x": x, "w": w})
    want_x, want_w = _hand_jacobian(x)
    chex.assert_trees_all_close(jac, {"x": want_x, "w": want_w}, atol=1e-8)


def test_compare_takes_trees_and_rejects_mismatched_ones():
    got = {"w": np.array([1.0, 2.0]), "b": np.array([0.5])}
    result = gradcheck.compare("mine", "theirs", got, {"w": np.array([1.0, 2.5]), "b": got["b"]},
                               rtol=0.1, atol=0.0)
    assert {a.name: a.ok for a in result.args} == {"['b']": True, "['w']": False}
    with pytest.raises(ValueError, match="structure"):
        gradcheck.compare("mine", "theirs", got, {"w": got["w"]}, rtol=0.1, atol=0.0)


def test_a_non_array_leaf_is_named():
    with pytest.raises(TypeError, match=r"\['lr'\] is a str"):
        gradcheck.versus_autodiff(right, right, {"x": X, "lr": "0.1"})


# --- bounds: what the full Jacobian allocates ---------------------------------------------------

def test_auto_mode_checks_a_large_scalar_loss_by_directions():
    """400k parameters and one output: 400k Jacobian entries, within max_full_size, but the old
    auto mode built the 400k × 400k identity (1.28 TB). The work bound sends it to directions."""
    theta = jnp.asarray(np.random.default_rng(2).standard_normal(400_000))
    result = gradcheck.versus_finite_differences(lambda t: jnp.mean(right(t)), (theta,))
    assert "random directions" in result.detail and result.ok
    assert not gradcheck.versus_finite_differences(lambda t: jnp.mean(wrong(t)), (theta,)).ok


def test_numerical_jacobian_in_chunks_by_hand():
    """F(x) = A x has Jacobian A: chunks of 2 columns (the last one partial) give A."""
    a = np.random.default_rng(3).standard_normal((5, 7))
    x = jnp.asarray(np.random.default_rng(4).standard_normal(7))
    (chunked,) = gradcheck.numerical_jacobian(lambda x: jnp.asarray(a) @ x, (x,),
                                              chunk_entries=2 * (7 + 5))
    np.testing.assert_allclose(chunked, a, atol=1e-9)
    chex.assert_shape(chunked, (5, 7))
    result = gradcheck.versus_finite_differences(wrong, (X,), mode="full", chunk_entries=40)
    assert not result.ok and "full Jacobian 12x12" in result.detail


class _Traced(Exception):
    pass


def test_numerical_jacobian_never_batches_the_whole_basis():
    """A scalar function of 400k inputs: the old code built the 400k × 400k identity (1.28 TB) and
    evaluated it in one batch. A spy (``custom_vmap``) records the batch size the evaluation is
    traced with and stops it there, before anything that size could be allocated."""
    n = 400_000
    sizes = []

    @jax.custom_batching.custom_vmap
    def spy(x):
        return x

    @spy.def_vmap
    def _rule(axis_size, in_batched, x):
        sizes.append(axis_size)
        raise _Traced

    theta = jnp.zeros(n)
    with pytest.raises(_Traced):
        gradcheck.numerical_jacobian(lambda t: jnp.sum(spy(t) ** 2), (theta,))
    assert len(sizes) == 1 and 1 <= sizes[0]
    assert sizes[0] * (n + 1) <= gradcheck.JACOBIAN_CHUNK_ENTRIES

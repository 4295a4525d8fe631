"""Every case of the gradient-check grid (jbp.testing.grid.CASES), checked against independent
references.

- manual == jax.grad of the jbp.autodiff twin: float64 to ~1e-10; float32 by jbp.accuracy's
  verdict (each against float64, the manual error within 8x autodiff's + 16 ulps);
- manual == central finite differences in float64 (full Jacobian or random directions);
- output and manual gradients == PyTorch autograd in float64, where the case has a twin;
- the primal computed by the rule's fwd equals the plain call and the autodiff forward (to
  float64 rounding where the rule has its own forward: conv2d's split form on CPU);
- gradient dtype == input dtype (float32, float64, bfloat16);
- under jax.jit the gradients are the eager gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import _conv_kernels, gradcheck
from jbp.layers import conv
from jbp.testing.grid import CASES

IDS = [c.id for c in CASES]


# The columns below compute each VJP as one compiled program (gradcheck.vjp_at): op-by-op
# dispatch would compile each op as a program of its own, most of the grid's time
# (docs/testing.md); the eager path is checked against it by test_jit_gradients_equal_eager.


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


# The float64 comparison is the fast loop's check of every rule; the float32 verdict (each
# gradient against float64 on its own branches) costs a float64 reference more: CI runs it.
@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                   jnp.float64], ids=["float32", "float64"])
def test_manual_matches_autodiff(case, dtype):
    result = gradcheck.versus_autodiff(case.fn(jbp), case.fn(jbp.autodiff), case.args(dtype),
                                       names=case.names)
    assert result.ok, str(result)
    assert all(a.cosine > 1 - 1e-6 for a in result.args), str(result)


def test_manual_matches_pytorch(case):
    """The output and the manual VJP against PyTorch autograd of ``case.torch``, float64, under
    one random cotangent: the PyTorch column of scripts/gradcheck.py, case by case."""
    pytest.importorskip("torch")
    if case.torch is None:
        pytest.skip(f"{case.id}: no PyTorch twin")
    from jbp.testing.torch_reference import torch_vjp
    args64 = case.args(jnp.float64)
    out, grads, u = gradcheck.vjp_at(case.fn(jbp), args64)
    torch_out, torch_grads = torch_vjp(case, args64, u)
    rtol, atol = gradcheck.DEFAULT_TOLERANCES[("pytorch", "float64")]
    result = gradcheck.compare("manual", "pytorch", [out, *grads], [torch_out, *torch_grads],
                               ["output", *case.names], rtol=rtol, atol=atol)
    assert result.ok, str(result)


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
def test_manual_matches_finite_differences(case):
    result = gradcheck.versus_finite_differences(case.fn(jbp), case.args(jnp.float64),
                                                 names=case.names)
    assert result.ok, str(result)


# Layers the grid calls as ``layer(*args, **case.kwargs)``; the rest close over fixed inputs
# (batch norm's running statistics, dropout's and stochastic depth's key, integer labels,
# max_unpool's indices); concat takes its arrays as one list.
_DIRECT = [c for c in CASES if not (c.layer in ("batch_norm", "dropout", "stochastic_depth",
                                                 "max_unpool", "concat")
                                     or c.names == ("logits",))]


@pytest.mark.parametrize("direct", _DIRECT, ids=[c.id for c in _DIRECT])
def test_kwargs_are_the_layer_call(direct):
    """``Case.kwargs`` is the configuration the case really runs: calling the public layer with
    it gives the case's own function's output, bit for bit."""
    args = direct.args(jnp.float64)
    want = jax.jit(direct.fn(jbp))(*args)
    got = jax.jit(lambda *a: getattr(jbp, direct.layer)(*a, **direct.kwargs))(*args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _rule_has_its_own_forward(case, args) -> bool:
    """conv2d's rule computes small wide layers by a ``rule_only`` form of the table on CPU
    (jbp._conv_kernels): the same sum in another order, so equal to the autodiff forward only
    to rounding."""
    if case.layer != "conv2d" or jax.default_backend() != "cpu":
        return False
    kw = {k: v for k, v in case.kwargs.items() if k != "padding_mode"}
    cfg = conv.conv_config(args[0], args[1], **kw)
    chosen = _conv_kernels.choose("forward", args[0].shape, args[1].shape, cfg, args[0].dtype)
    return chosen is not None and chosen[0].rule_only


def test_primal_of_fwd_equals_plain_call(case):
    args = case.args(jnp.float64)
    manual = case.fn(jbp)
    # Each its own compiled program (one program could share their common work).
    primal_from_fwd = jax.jit(lambda *a: jax.vjp(manual, *a)[0])(*args)  # runs the rule's fwd
    plain = jax.jit(manual)(*args)                    # runs the custom_vjp primal
    reference = jax.jit(case.fn(jbp.autodiff))(*args)  # the shared forward, no rule at all
    own_forward = _rule_has_its_own_forward(case, args)
    for a, b, c in zip(jax.tree.leaves(primal_from_fwd), jax.tree.leaves(plain),
                       jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
        if own_forward:      # float64 rounding of a reordered sum of 576 products
            np.testing.assert_allclose(a, c, rtol=0, atol=1e-13 * float(np.max(np.abs(c))))
        else:
            np.testing.assert_array_equal(a, c)


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16],
                         ids=["float32", "float64", "bfloat16"])
def test_gradient_dtype_is_input_dtype(case, dtype):
    args = case.args(dtype)
    out, grads, _ = gradcheck.vjp_at(case.fn(jbp), args)
    for o in jax.tree.leaves(out):
        assert o.dtype == dtype
    for name, a, g in zip(case.names, args, grads):
        assert g.dtype == a.dtype, f"{name}: gradient {g.dtype} for a {a.dtype} input"
        assert g.shape == a.shape
        assert bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
def test_bfloat16_gradients_close_to_float32(case):
    """Half precision computes the same gradients, to bfloat16 accuracy.

    The float32 reference runs on the bfloat16-rounded inputs and cotangent, so both see the same
    numbers (rounding can create ties that move a max-pool's first maximum).
    """
    args16 = case.args(jnp.bfloat16)
    args32 = tuple(a.astype(jnp.float32) for a in args16)
    fn = case.fn(jbp)
    _, grads16, u16 = gradcheck.vjp_at(fn, args16)
    u32 = jax.tree.map(lambda u: u.astype(jnp.float32), u16)
    _, grads32, _ = gradcheck.vjp_at(fn, args32, u32)
    for name, g16, g32 in zip(case.names, grads16, grads32):
        # bfloat16 keeps 8 significant bits (relative spacing 2^-8 ≈ 4e-3); sums of tens of
        # terms lose a few more. Relative to the largest entry, 3e-2 is ~8 ulps.
        err = gradcheck.arg_error(name, g16.astype(jnp.float32), g32, rtol=3e-2, atol=0.0)
        assert err.ok and err.cosine > 0.999, err


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
@pytest.mark.parametrize("namespace", ["manual", "autodiff"])
def test_jit_gradients_equal_eager(case, namespace):
    """Under jax.jit, both the hand-written rules and the autodiff twins give eager gradients."""
    args = case.args(jnp.float32)
    fn = case.fn(jbp if namespace == "manual" else jbp.autodiff)
    out = fn(*args)
    u = gradcheck.random_cotangent(out)

    def grads(*a):
        return jax.vjp(fn, *a)[1](u)

    eager = grads(*args)
    jitted = jax.jit(grads)(*args)
    for e, j in zip(eager, jitted):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=1e-5, atol=1e-6)

"""The rules under JAX transformations: vmap, checkpoint, second order, and forward mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import gradcheck
from jbp.layers import conv
from jbp.testing.grid import CASES


def _first_per_layer():
    seen, out = set(), []
    for c in CASES:
        if c.layer not in seen:
            seen.add(c.layer)
            out.append(c)
    return out


ONE_PER_LAYER = _first_per_layer()
# Layers whose output for example i depends on example i alone (batch norm in training mode
# couples the batch; dropout draws its mask for the whole batch shape; losses average the batch).
PER_EXAMPLE = [c for c in CASES if c.layer in {
    "conv2d", "dense", "flatten", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
    "log_softmax", "max_pool", "avg_pool", "global_avg_pool"} and c.config.split()[0] != "1x7->10"
    and len(c.shapes[0]) > 0]                                   # a 0-d input has no batch axis
PER_EXAMPLE += [c for c in CASES if c.layer == "batch_norm" and c.config.endswith("eval")]


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
@pytest.mark.parametrize("case", PER_EXAMPLE, ids=[c.id for c in PER_EXAMPLE])
def test_vmap_per_example_gradients_equal_python_loop(case):
    """jax.vmap(jax.grad(...)) over examples == a Python loop of jax.grad, parameters included."""
    args = case.args(jnp.float64)
    x, params = args[0], args[1:]
    fn = case.fn(jbp)
    u = gradcheck.random_cotangent(jax.eval_shape(fn, *args))

    def example_loss(xi, ui, *p):
        return jnp.sum(ui * fn(xi[None], *p)[0])

    grads = jax.grad(example_loss, argnums=(0, *range(2, 2 + len(params))))
    batched = jax.jit(jax.vmap(grads, in_axes=(0, 0) + (None,) * len(params)))(x, u, *params)
    one = jax.jit(grads)                      # compiled once, called for every example
    for i in range(x.shape[0]):
        looped = one(x[i], u[i], *params)
        for b, l in zip(batched, looped):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(l), rtol=1e-12, atol=1e-12)


BATCH_COUPLED = [c for c in CASES if (c.layer == "batch_norm" and c.config.endswith("train"))
                 or c.layer in ("softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy",
                                "dropout")]


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
@pytest.mark.parametrize("case", BATCH_COUPLED, ids=[c.id for c in BATCH_COUPLED])
def test_vmap_over_independent_batches_equals_loop(case):
    """Layers that couple a batch (batch-norm statistics, batch-mean losses, dropout's mask) under
    jax.vmap over a stack of whole batches: each equals its own un-vmapped gradient."""
    stacks = [case.args(jnp.float64, seed=s) for s in range(3)]
    stacked = tuple(jnp.stack(parts) for parts in zip(*stacks))
    fn = case.fn(jbp)
    argnums = tuple(range(len(stacked)))

    def loss(*a):
        return jnp.sum(jnp.sin(fn(*a)))

    batched = jax.jit(jax.vmap(jax.grad(loss, argnums)))(*stacked)
    one = jax.jit(jax.grad(loss, argnums))          # compiled once, called for every batch
    for i, args in enumerate(stacks):
        for b, l in zip(batched, one(*args)):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(l), rtol=1e-12, atol=1e-12)


def _count_ops(fn, *args, op):
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return sum(hlo.count(f" {o}(") for o in op.split("|"))


# One signature op per layer: its count in the compiled gradient must not grow under checkpoint.
# conv2d: XLA's convolution, or oneDNN's FFI custom call (float32 on CPU, docs/onednn.md).
REMAT_OPS = [("conv2d", "convolution|custom-call"), ("dense", "dot"), ("max_pool", "reduce-window"),
             ("avg_pool", "reduce-window"), ("sigmoid", "exponential"), ("tanh", "tanh"),
             ("softmax", "exponential"), ("log_softmax", "exponential"),
             ("batch_norm", "rsqrt"), ("softmax_cross_entropy", "exponential")]


@pytest.mark.parametrize("layer,op", REMAT_OPS, ids=[layer for layer, _ in REMAT_OPS])
def test_checkpoint_runs_forward_once_and_keeps_gradients(layer, op):
    """Under jax.checkpoint: same gradients, and no extra forward op is compiled.

    Without JAX's dead-code elimination of the discarded residuals, checkpointing would run the
    rule's fwd twice (once in the primal pass, again when recomputing residuals) and this count
    would grow.
    """
    case = next(c for c in CASES if c.layer == layer)
    args = case.args(jnp.float32)
    fn = case.fn(jbp)
    u = gradcheck.random_cotangent(fn(*args))

    def loss(*a):
        return jnp.sum(jnp.sin(fn(*a)) * u)

    argnums = tuple(range(len(args)))
    plain = jax.grad(loss, argnums)(*args)
    remat = jax.grad(jax.checkpoint(loss), argnums)(*args)
    for p, r in zip(plain, remat):
        np.testing.assert_allclose(np.asarray(r), np.asarray(p), rtol=1e-6, atol=1e-6)
    count = _count_ops(jax.grad(loss, argnums), *args, op=op)
    assert count >= 1, f"{op} not found in the compiled gradient of {layer}"
    assert _count_ops(jax.grad(jax.checkpoint(loss), argnums), *args, op=op) == count


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hessian_vector_product_matches_autodiff(case):
    """Reverse-over-reverse under jax.jit: H v through the rule == through jax.grad."""
    args = case.args(jnp.float64)
    rng = np.random.default_rng(5)
    vs = [jnp.asarray(rng.standard_normal(a.shape)) for a in args]
    u = gradcheck.random_cotangent(jax.eval_shape(case.fn(jbp), *args), seed=3)

    def hvp(ns):
        fn = case.fn(ns)

        def loss(*a):       # a non-linear scalar so that second derivatives are not all zero
            out = fn(*a)
            return jnp.sum(jnp.sin(out) * u) + 0.5 * jnp.sum(out ** 2)

        def directional(*a):
            g = jax.grad(loss, tuple(range(len(a))))(*a)
            return sum(jnp.vdot(gi, vi) for gi, vi in zip(g, vs))

        return jax.jit(jax.grad(directional, tuple(range(len(args)))))(*args)

    result = gradcheck.compare("manual", "autodiff", hvp(jbp), hvp(jbp.autodiff), case.names,
                               rtol=1e-9, atol=1e-11, detail="Hessian-vector product")
    assert result.ok, str(result)


def test_second_derivative_of_scalar_composition():
    """jax.grad(jax.grad(f)) through sigmoid, tanh and a loss, against closed forms."""
    x = jnp.array([0.3, -1.2, 2.0])
    d2_sigmoid = jax.vmap(jax.grad(jax.grad(lambda t: jbp.sigmoid(t[None])[0])))(x)
    s = 1 / (1 + np.exp(-np.asarray(x)))
    np.testing.assert_allclose(d2_sigmoid, s * (1 - s) * (1 - 2 * s), rtol=1e-12)
    d2_tanh = jax.vmap(jax.grad(jax.grad(lambda t: jbp.tanh(t[None])[0])))(x)
    t = np.tanh(np.asarray(x))
    np.testing.assert_allclose(d2_tanh, -2 * t * (1 - t ** 2), rtol=1e-12)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd"])
def test_forward_mode_error_says_what_to_use(transform):
    x = jnp.ones((1, 4, 4, 2))
    w = jnp.ones((3, 3, 2, 2))
    f = functools.partial(conv.conv2d, w=w)
    if transform == "jvp":
        call = functools.partial(jax.jvp, f, (x,), (x,))
    else:
        call = functools.partial(jax.jacfwd(f), x)
    with pytest.raises(TypeError, match=r"jbp\.conv2d has a hand-written reverse-mode rule") as e:
        call()
    assert "jax.grad" in str(e.value) and "jbp.autodiff.conv2d" in str(e.value)


def test_hessian_forward_over_reverse_matches_autodiff():
    """jax.hessian is jacfwd(jacrev): the JVP applies to the linearized rule, which works."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 2)))
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 2)))

    def loss(ns):
        return lambda x: jnp.sum(jnp.tanh(ns.conv2d(x, w, stride=2)) ** 2)

    np.testing.assert_allclose(np.asarray(jax.hessian(loss(jbp))(x)),
                               np.asarray(jax.hessian(loss(jbp.autodiff))(x)),
                               rtol=1e-10, atol=1e-12)


def test_autodiff_twin_supports_forward_mode():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 5, 5, 2)))
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 2, 2)))
    f_manual = functools.partial(jbp.conv2d, w=w)
    f_auto = functools.partial(jbp.autodiff.conv2d, w=w)
    fwd = jax.jacfwd(f_auto)(x)
    rev = jax.jacrev(f_manual)(x)
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), rtol=1e-12, atol=1e-12)


@pytest.mark.xfail(strict=False, reason="jax 0.10: optimize_remat=True breaks reverse-over-reverse "
                   "(JAX PR #38452). If this XPASSes, jbp._rule.OPTIMIZE_REMAT can be turned on.")
def test_canary_jax_optimize_remat_supports_second_order():
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda r, g: (g * r,), optimize_remat=True)
    np.testing.assert_allclose(jax.grad(jax.grad(f))(1.0), -np.sin(1.0), rtol=1e-6)

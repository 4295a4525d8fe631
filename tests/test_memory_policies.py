"""Memory policies: compressed residuals in the conv and batch-norm rules, remat of resnet blocks.

The compressed-residual gradients are checked two ways: against JAX's autodiff evaluated at the
decompressed input ã (an identity: only ∂L/∂W reads a), and against error bounds derived from the
quantisation step (jbp._residuals): bf16 |ã − a| ≤ 2⁻⁸|a|, int8 |ã − a| ≤ s_c/2 with
s_c = max|a[..., c]| / 127. The gradients are linear in ã − a, so the bounds below follow by the
triangle inequality; float64 keeps the arithmetic's own rounding negligible (1e-12 slack).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import _residuals
from jbp import LayerPolicy
from jbp.models import resnet

#: Outside the fast loop (``pytest -m 'not slow'``): whole-model programs per residual policy. CI
#: runs it.
pytestmark = pytest.mark.slow

SLACK = 1e-12


def _elementwise_bound(a, policy):
    """e ≥ |ã − a| elementwise. bf16: 2⁻⁸|a| (half an ulp of 8 significant bits), with 2⁻²⁴
    relative for a float32 intermediate rounding (f64 -> f32 -> bf16); int8: s_c / 2."""
    if policy == "bf16":
        return jnp.abs(a) * (2.0 ** -8 + 2.0 ** -24)
    scale = jnp.max(jnp.abs(a), axis=tuple(range(a.ndim - 1))) / 127
    return jnp.broadcast_to(scale / 2, a.shape)


def _data(key, shape, dtype=jnp.float64):
    return jax.random.normal(key, shape, dtype)


CONV_CASES = [dict(stride=1, padding="SAME"), dict(stride=2, padding=1),
              dict(stride=1, padding="VALID", dilation=2)]


@pytest.mark.parametrize("policy", ["bf16", "int8"])
@pytest.mark.parametrize("kw", CONV_CASES)
def test_conv_weight_gradient_is_autodiffs_at_the_kept_input_and_within_the_bound(policy, kw):
    k = jax.random.split(jax.random.key(0), 4)
    x = _data(k[0], (3, 9, 9, 4)) * jnp.arange(1, 5)        # channels of different range
    w, b = _data(k[1], (3, 3, 4, 5)), _data(k[2], (5,))
    out, vjp_exact = jax.vjp(lambda x, w, b: jbp.conv2d(x, w, b, **kw), x, w, b)
    g = _data(k[3], out.shape)
    dx0, dw0, db0 = vjp_exact(g)
    out_p, vjp_p = jax.vjp(lambda x, w, b: jbp.conv2d(x, w, b, residuals=policy, **kw), x, w, b)
    dx, dw, db = vjp_p(g)
    np.testing.assert_array_equal(out_p, out)               # the forward is untouched
    np.testing.assert_array_equal(dx, dx0)                  # ∂L/∂a does not read a
    np.testing.assert_array_equal(db, db0)
    x_kept = _residuals.decompress(_residuals.compress(x, policy), policy, x.dtype)
    _, vjp_ad = jax.vjp(lambda w: jbp.autodiff.conv2d(x_kept, w, b, **kw), w)
    np.testing.assert_allclose(dw, vjp_ad(g)[0], rtol=1e-10, atol=1e-10)
    # |ΔdW[i,j,c,k]| = |Σ δ[n,h,w,k] (ã − a)[n, h·s+i·d, w·s+j·d, c]| ≤ Σ |δ| e  (e ≥ |ã − a|)
    e = _elementwise_bound(x, policy)
    _, vjp_bound = jax.vjp(lambda w: jbp.autodiff.conv2d(e, w, **kw), w)
    bound = vjp_bound(jnp.abs(g))[0]
    err = jnp.abs(dw - dw0)
    assert float(jnp.max(err)) > 0                          # the policy really compresses
    assert bool(jnp.all(err <= bound * (1 + SLACK) + SLACK)), float(jnp.max(err / bound))


@pytest.mark.parametrize("policy", ["bf16", "int8"])
def test_batch_norm_gradients_within_the_bound(policy):
    k = jax.random.split(jax.random.key(1), 4)
    x = _data(k[0], (4, 5, 5, 3)) * jnp.array([0.5, 2.0, 7.0]) + jnp.array([1.0, -3.0, 0.0])
    gamma, beta = 1 + 0.3 * _data(k[1], (3,)), _data(k[2], (3,))
    zeros, ones = jnp.zeros(3, x.dtype), jnp.ones(3, x.dtype)

    def f(policy):
        return lambda x, gm, bt: jbp.batch_norm(x, gm, bt, zeros, ones, train=True,
                                                residuals=policy)[0]

    y, vjp0 = jax.vjp(f("exact"), x, gamma, beta)
    g = _data(k[3], y.shape)
    dx0, dg0, db0 = vjp0(g)
    y_p, vjp_p = jax.vjp(f(policy), x, gamma, beta)
    dx, dg, db = vjp_p(g)
    np.testing.assert_array_equal(y_p, y)
    np.testing.assert_array_equal(db, db0)                  # ∂L/∂β = Σ δ does not read x
    # x̂ = (x − μ) r with r = 1/σ from the exact forward: |Δx̂| ≤ r e, |Δ∂L/∂γ| ≤ r Σ |δ| e,
    # ∂L/∂x = (γ r / M)(M δ − Σ δ − x̂ ∂L/∂γ):  |Δ∂L/∂x| ≤ |γ| r / M (r e |∂L/∂γ'| + |x̂| |Δ∂L/∂γ|)
    axes = (0, 1, 2)
    m = x.size // 3
    mu = jnp.mean(x, axes)
    r = 1 / jnp.sqrt(jnp.mean((x - mu) ** 2, axes) + 1e-5)
    e = _elementwise_bound(x, policy)
    bound_dg = r * jnp.sum(jnp.abs(g) * e, axes)
    bound_dx = jnp.abs(gamma) * r / m * (r * e * jnp.abs(dg) + jnp.abs((x - mu) * r) * bound_dg)
    for err, bound in ((jnp.abs(dg - dg0), bound_dg), (jnp.abs(dx - dx0), bound_dx)):
        assert float(jnp.max(err)) > 0
        assert bool(jnp.all(err <= bound * (1 + SLACK) + SLACK)), float(jnp.max(err / bound))


def test_int8_and_bf16_residuals_are_smaller():
    x = jnp.ones((2, 8, 8, 4), jnp.float32)
    w = jnp.ones((3, 3, 4, 4), jnp.float32)
    sizes = {}
    for policy in ("exact", "bf16", "int8"):
        vjp = jax.vjp(lambda x, w: jbp.conv2d(x, w, residuals=policy), x, w)[1]
        sizes[policy] = sum(v.nbytes for v in jax.tree.leaves(vjp))
    assert sizes["exact"] == x.size * 4 + w.size * 4
    assert sizes["bf16"] == x.size * 2 + w.size * 4
    assert sizes["int8"] == x.size * 1 + 4 * 4 + w.size * 4     # codes + one scale per channel


@pytest.mark.parametrize("policy", ["bf16", "int8"])
def test_relu_keeps_a_mask_under_compressed_policies(policy):
    """Under a compressed policy the next convolution keeps only a compressed copy of ReLU's
    output, so ReLU keeps the mask 1[a > 0] (1 byte a value) instead of that float output; its
    gradient δ ⊙ 1[z > 0] is exact either way."""
    x = _data(jax.random.key(4), (3, 5, 5, 4))
    x = x.at[0, 0, 0, 0].set(0.0)                           # the kink: gradient 0 in both
    g = _data(jax.random.key(5), x.shape)
    saved, grads = {}, {}
    for p in ("exact", policy):
        y, vjp = jax.vjp(lambda x: jbp.relu(x, residuals=p), x)
        (grads[p],) = vjp(g)
        saved[p] = jax.tree.leaves(vjp)
        np.testing.assert_array_equal(y, jnp.maximum(x, 0))
    np.testing.assert_array_equal(grads[policy], grads["exact"])
    np.testing.assert_array_equal(grads[policy], jnp.where(x > 0, g, 0))
    assert [(a.dtype, a.shape) for a in saved["exact"]] == [(x.dtype, x.shape)]
    assert [(a.dtype, a.shape) for a in saved[policy]] == [(jnp.dtype(bool), x.shape)]


def test_compressed_policies_keep_no_float_activation_for_the_backward():
    """What a resnet's manual gradient saves (the leaves of jax.vjp's closure): under bf16 and
    int8 no float32 activation is left — only parameters and per-channel statistics — so the
    saved bytes fall. Before ReLU kept a mask, its float32 output (the next convolution's input)
    stayed among them and half the activations were still float32."""
    x = jax.random.normal(jax.random.key(6), (8, 12, 12, 1), jnp.float32)
    y = jnp.arange(8) % 10
    params, state = resnet._init(TINY, jax.random.key(0), x.shape[1:], 10)
    param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    saved = {}
    for policy in ("exact", "bf16", "int8"):
        nn = LayerPolicy("manual", policy)

        def loss(p, nn=nn):
            logits, _ = resnet._apply(TINY, p, state, x, True, nn)
            return jbp.softmax_cross_entropy(logits, y)
        leaves = jax.tree.leaves(jax.vjp(loss, params)[1])
        saved[policy] = {str(d): sum(a.nbytes for a in leaves if str(a.dtype) == d)
                         for d in {str(a.dtype) for a in leaves}}
    activation = x.shape[0] * 12 * 12 * 4                   # one stem-sized activation
    assert saved["exact"]["float32"] > param_bytes + 4 * activation * 4
    for policy in ("bf16", "int8"):
        # Parameters (kernels kept for ∂L/∂a, γ, β) plus C-sized stats: far below one activation.
        assert saved[policy]["float32"] <= 2 * param_bytes + activation, saved[policy]
    total = {p: sum(v.values()) for p, v in saved.items()}
    assert total["int8"] < total["bf16"] < total["exact"], total


def test_unknown_policy_is_a_clear_error():
    x = jnp.ones((1, 4, 4, 1))
    with pytest.raises(ValueError, match="residuals: expected one of"):
        jbp.conv2d(x, jnp.ones((3, 3, 1, 1)), residuals="fp8")


TINY = resnet.Spec("tiny_resnet", 3, 1, 1, False, (4, 8), 1, 4)   # stem + 2 blocks (1 proj)


def _tiny_grads(remat, jit):
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 1), jnp.float32)
    y = jnp.arange(2)
    params, state = resnet._init(TINY, jax.random.key(0), x.shape[1:], 10)

    def loss(p):
        logits, _ = resnet._apply(TINY, p, state, x, True, LayerPolicy(), True, remat)
        return jbp.softmax_cross_entropy(logits, y)

    return jax.tree.leaves((jax.jit(jax.grad(loss)) if jit else jax.grad(loss))(params))


def test_remat_blocks_gradients_bit_identical_op_by_op():
    """Eagerly every op runs as its own kernel, so recomputing a block's forward in the backward
    reproduces its activations bit for bit, and the gradients are identical."""
    for a, b in zip(_tiny_grads("none", jit=False), _tiny_grads("blocks", jit=False)):
        np.testing.assert_array_equal(a, b)


def test_remat_blocks_gradients_under_jit_equal_to_rounding():
    """Under jit XLA:CPU fuses the recomputed forward into the backward differently (reduction
    order): equal to float32 rounding (measured 1.7e-6 relative on ResNet-20), not bit for bit."""
    for a, b in zip(_tiny_grads("none", jit=True), _tiny_grads("blocks", jit=True)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * float(np.max(np.abs(a))))


def test_int8_model_gradients_close_to_exact():
    """A small resnet: every leaf's int8-residual gradient within 5% (relative to the leaf's
    largest entry) of the exact one; a coarse end-to-end check, the bounds are the tests above."""
    x = jax.random.normal(jax.random.key(3), (8, 6, 6, 1), jnp.float32)
    y = jnp.arange(8) % 10
    params, state = resnet._init(TINY, jax.random.key(0), x.shape[1:], 10)

    def grads(nn):
        def loss(p):
            logits, _ = resnet._apply(TINY, p, state, x, True, nn)
            return jbp.softmax_cross_entropy(logits, y)
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads(LayerPolicy("manual")), grads(LayerPolicy("manual", "int8"))):
        assert float(jnp.max(jnp.abs(a - b))) <= 0.05 * float(jnp.max(jnp.abs(a))) + 1e-7
    with pytest.raises(ValueError, match="policy of jbp's rules"):
        LayerPolicy("autodiff", residuals="int8")

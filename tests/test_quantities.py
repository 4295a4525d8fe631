"""jbp.quantities against independent computations with the autodiff twin, in float64:
per-example quantities against ``jax.vmap(jax.grad(ℓ_n))``, ``diag_ggn`` and the one-example K-FAC
property against the dense ``Jᵀ H J`` of ``jax.jacrev``/``jax.hessian``, the MC estimate against
the exact value within a bound derived from the estimator's exact variance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jbp
from jbp import quantities as Q
from jbp.layers import conv as conv_module
from jbp.layers.conv_equations import ConvConfig
from jbp.models import lenet5
from jbp.policy import LayerPolicy

AUTODIFF = LayerPolicy("autodiff")
FIRST = ("batch_grad", "batch_l2", "sum_grad_squared", "variance")


# --- small models: a dense MLP and a conv net with batch norm (eval) ---------------------------

def mlp_init(key):
    k = jax.random.split(key, 4)
    return {"l1": {"w": jax.random.normal(k[0], (12, 7)), "b": jax.random.normal(k[1], (7,))},
            "l2": {"w": jax.random.normal(k[2], (7, 4)) / 2, "b": jax.random.normal(k[3], (4,))}}


def mlp_apply(params, state, x, *, train, layers=LayerPolicy()):
    h = layers.flatten(x)
    h = layers.tanh(layers.dense(h, params["l1"]["w"], params["l1"]["b"]))
    return layers.dense(h, params["l2"]["w"], params["l2"]["b"]), state


def bn_net_init(key):
    """7×7×2 -> conv 3×3 dilation 2 (3 ch) -> BN -> relu -> conv 3×3 VALID (1×1×4) -> BN ->
    relu -> dense 3. conv2's output is 1×1: its K-FAC block is exact for one example."""
    k = jax.random.split(key, 8)
    params = {"c1": {"w": jax.random.normal(k[0], (3, 3, 2, 3)) / 3,
                     "b": jax.random.normal(k[1], (3,)) / 3},
              "bn1": {"gamma": 1 + jax.random.normal(k[2], (3,)) / 4,
                      "beta": jax.random.normal(k[3], (3,)) / 4},
              "c2": {"w": jax.random.normal(k[4], (3, 3, 3, 4)) / 3},
              "bn2": {"gamma": 1 + jax.random.normal(k[5], (4,)) / 4,
                      "beta": jax.random.normal(k[6], (4,)) / 4},
              "fc": {"w": jax.random.normal(k[7], (4, 3)), "b": jnp.zeros(3)}}
    state = {"bn1": {"mean": jnp.full(3, 0.1), "var": jnp.full(3, 1.5)},
             "bn2": {"mean": jnp.full(4, -0.2), "var": jnp.full(4, 0.7)}}
    return params, state


def bn_net_apply(params, state, x, *, train, layers=LayerPolicy()):
    p, s = params, state
    h = layers.conv2d(x, p["c1"]["w"], p["c1"]["b"], padding="VALID", dilation=2)
    h, _ = layers.batch_norm(h, p["bn1"]["gamma"], p["bn1"]["beta"], s["bn1"]["mean"],
                             s["bn1"]["var"], train=train)
    h = layers.relu(h)
    h = layers.conv2d(h, p["c2"]["w"], padding="VALID")
    h, _ = layers.batch_norm(h, p["bn2"]["gamma"], p["bn2"]["beta"], s["bn2"]["mean"],
                             s["bn2"]["var"], train=train)
    h = layers.flatten(layers.relu(h))
    return layers.dense(h, p["fc"]["w"], p["fc"]["b"]), state


# --- the independent computations ----------------------------------------------------------------

def per_example_loss(apply, state, loss, reduction="mean"):
    """ℓ_n(θ) of one example through the autodiff twin (a batch of one, so the mean is ℓ_n;
    per pixel, ``reduction`` says whether ℓ_n is the pixels' mean or sum)."""
    def ell(params, xn, yn):
        logits, _ = apply(params, state, xn[None], train=False, layers=AUTODIFF)
        return getattr(jbp.autodiff, loss)(logits, yn[None], reduction=reduction)
    return ell


def vmap_route(apply, params, state, x, y, loss, reduction):
    grads = jax.jit(jax.vmap(jax.grad(per_example_loss(apply, state, loss, reduction)),
                             (None, 0, 0)))(
        params, x, y)
    n = x.shape[0]
    return jax.tree.map(lambda g: g / n if reduction == "mean" else g, grads)


def dense_ggn(apply, params, state, x, y, loss, reduction):
    """G = (1/N) Σ_n J_nᵀ H_n J_n from jax.jacrev / jax.hessian of the autodiff twin."""
    flat, unravel = ravel_pytree(params)
    n = x.shape[0]

    def logits_n(f, xn):
        return apply(unravel(f), state, xn[None], train=False, layers=AUTODIFF)[0][0]

    def loss_of_logits(z, yn):                                   # ℓ_n (a batch of one)
        return getattr(jbp.autodiff, loss)(z[None], yn[None], reduction=reduction)

    @jax.jit
    def block(xn, yn):
        jac = jax.jacrev(logits_n)(flat, xn)                     # (C, P) or (H, W, C, P)
        hess = jax.hessian(loss_of_logits)(logits_n(flat, xn), yn)
        jac = jac.reshape(-1, flat.size)                         # per pixel: D = H·W·C rows
        return jac.T @ hess.reshape(jac.shape[0], -1) @ jac

    total = sum(block(x[i], y[i]) for i in range(n))
    return total / n if reduction == "mean" else total, unravel


def assert_tree_close(got, want, rtol=1e-9, atol=1e-12):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=rtol, atol=atol), got, want)


def check_first_pass(out, apply, params, state, x, y, loss, reduction):
    grads = vmap_route(apply, params, state, x, y, loss, reduction)
    n = x.shape[0]
    r = n if reduction == "mean" else 1                        # ∇ℓ_n = r · g_n
    assert_tree_close(out["batch_grad"], grads)
    assert_tree_close(out["batch_l2"], jax.tree.map(
        lambda g: jnp.sum(g.reshape(n, -1) ** 2, axis=1), grads))
    assert_tree_close(out["sum_grad_squared"], jax.tree.map(lambda g: jnp.sum(g ** 2, 0), grads))
    assert_tree_close(out["variance"], jax.tree.map(
        lambda g: jnp.var(r * g, axis=0), grads), atol=1e-10)
    assert_tree_close(out["grad"], jax.tree.map(lambda g: jnp.sum(g, 0), grads))


def _data(key, n, shape, classes):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, (n, *shape), jnp.float64),
            jax.random.randint(ky, (n,), 0, classes))


# --- per-example quantities ----------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_per_example_quantities_and_diag_ggn(reduction):
    params = mlp_init(jax.random.key(0))
    x, y = _data(jax.random.key(1), 5, (2, 2, 3), 4)
    out = Q.compute(mlp_apply, params, {}, x, y, quantities=FIRST + ("diag_ggn",),
                    reduction=reduction)
    check_first_pass(out, mlp_apply, params, {}, x, y, "softmax_cross_entropy", reduction)
    ggn, unravel = dense_ggn(mlp_apply, params, {}, x, y, "softmax_cross_entropy", reduction)
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)))
    if reduction == "mean":        # one example: kron(A, G) is the dense layers' GGN block
        one = Q.compute(mlp_apply, params, {}, x[:1], y[:1], quantities=("kfac",))
        ggn1, _ = dense_ggn(mlp_apply, params, {}, x[:1], y[:1], "softmax_cross_entropy", "mean")
        for layer, (start, size) in ((k[0], v) for k, v in _offsets(params).items()
                                     if k[1] == "w"):
            a, g = one["kfac"][layer]["w"]
            np.testing.assert_allclose(np.kron(a, g), ggn1[start:start + size, start:start + size],
                                       rtol=1e-9, atol=1e-12)


def test_mlp_mse_diag_ggn_and_batch_l2():
    params = mlp_init(jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (4, 2, 2, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(4), (4, 4), jnp.float64)
    out = Q.compute(mlp_apply, params, {}, x, y, loss="mse", quantities=("batch_l2", "diag_ggn"))
    grads = vmap_route(mlp_apply, params, {}, x, y, "mse", "mean")
    assert_tree_close(out["batch_l2"], jax.tree.map(
        lambda g: jnp.sum(g.reshape(4, -1) ** 2, axis=1), grads))
    ggn, unravel = dense_ggn(mlp_apply, params, {}, x, y, "mse", "mean")
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)))


def test_bn_net_in_eval_mode_per_example():
    """Conv (dilated, with and without bias; one by per-example gradients, one by Gram
    matrices), batch norm in eval, dense: per-example quantities against vmap(grad)."""
    params, state = bn_net_init(jax.random.key(5))
    x, y = _data(jax.random.key(6), 3, (7, 7, 2), 3)
    out = Q.compute(bn_net_apply, params, state, x, y, quantities=FIRST)
    check_first_pass(out, bn_net_apply, params, state, x, y, "softmax_cross_entropy", "mean")


@pytest.mark.slow
def test_bn_net_in_eval_mode_ggn_and_kfac():
    """The GGN diagonal, and for one example the K-FAC blocks of the dense and the 1×1-output
    conv weight, against the dense GGN."""
    params, state = bn_net_init(jax.random.key(5))
    x, y = _data(jax.random.key(6), 3, (7, 7, 2), 3)
    out = Q.compute(bn_net_apply, params, state, x, y, quantities=("diag_ggn",))
    ggn, unravel = dense_ggn(bn_net_apply, params, state, x, y, "softmax_cross_entropy", "mean")
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)))

    one = Q.compute(bn_net_apply, params, state, x[:1], y[:1], quantities=("kfac",))
    ggn1, _ = dense_ggn(bn_net_apply, params, state, x[:1], y[:1], "softmax_cross_entropy",
                        "mean")
    offsets = _offsets(params)
    for layer in ("c2", "fc"):
        a, g = one["kfac"][layer]["w"]
        start, size = offsets[(layer, "w")]
        block = ggn1[start:start + size, start:start + size]
        np.testing.assert_allclose(np.kron(a, g), block, rtol=1e-9, atol=1e-12)
    assert one["kfac"]["bn1"]["gamma"] is None and one["kfac"]["fc"]["b"] is None


def _offsets(params):
    """Where each leaf sits in ravel_pytree's flat vector: {(layer, name): (start, size)}."""
    out, start = {}, 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        out[tuple(k.key for k in path)] = (start, leaf.size)
        start += leaf.size
    return out


@pytest.mark.slow
def test_lenet5_per_example_quantities():
    params, _ = lenet5.init(jax.random.key(7), (28, 28, 1), 10)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x, y = _data(jax.random.key(8), 3, (28, 28, 1), 10)
    out = Q.compute(lenet5.apply, params, {}, x, y, quantities=FIRST)
    check_first_pass(out, lenet5.apply, params, {}, x, y, "softmax_cross_entropy", "mean")


@pytest.mark.parametrize("stride,dilation,padding,groups,kernel", [
    (2, 2, ((1, 2), (0, 1)), 1, (3, 2)), (1, 1, "SAME", 2, (3, 2)), (2, 1, "VALID", 1, (1, 1))])
def test_conv_batch_l2_both_routes_and_patches(stride, dilation, padding, groups, kernel):
    """Gram matrices and per-example gradients give the same ‖∂ℓ_n/∂W‖², and the patches are
    ordered like W's rows (Σ_t p ⊗ δ reproduces the per-example gradient). The strided 1×1
    case takes the per-example gradient's batched-matmul form."""
    x = jax.random.normal(jax.random.key(9), (3, 7, 6, 4), jnp.float64)
    w = jax.random.normal(jax.random.key(10), (*kernel, 4 // groups, 6), jnp.float64)
    cfg = conv_module.conv_config(x, w, stride=stride, padding=padding, dilation=dilation,
                                  groups=groups)
    z = jbp.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
    g = jax.random.normal(jax.random.key(11), z.shape, jnp.float64)

    @jax.jit
    def both(x, w, g):
        def loss_n(wn, xn, gn):
            return jnp.sum(jbp.autodiff.conv2d(xn[None], wn, stride=stride, padding=padding,
                                               dilation=dilation, groups=groups) * gn[None])
        want = jax.vmap(jax.grad(loss_n), (None, 0, 0))(w, x, g)
        got = {"grad": conv_module.per_example_weight_grad(x, g, w.shape, cfg)}
        if groups == 1:
            got["gram"] = conv_module.batch_l2_by_gram(x, g, w.shape, cfg)
            p = conv_module.patches(x, w.shape, cfg)
            got["patches"] = jnp.einsum("ntk,ntc->nkc", p, g.reshape(3, -1, 6)).reshape(
                want.shape)
        return want, got

    want, got = both(x, w, g)
    np.testing.assert_allclose(got["grad"], want, rtol=1e-10, atol=1e-12)
    if groups == 1:
        l2 = jnp.sum(want.reshape(3, -1) ** 2, axis=1)
        np.testing.assert_allclose(got["gram"], l2, rtol=1e-10)
        np.testing.assert_allclose(got["patches"], want, rtol=1e-10, atol=1e-12)


# --- every other parameterised layer: transposed and grouped convolutions ----------------------

# (input shape, conv_transpose2d options, conv2d options). "general": strides, dilation, output
# padding, two groups each, a bias; "one_by_one": every convolution's output is 1×1, so for one
# example each group's kron(A[g], G[g]) is exactly that group's GGN block (KFC's exact case).
FAMILY_NETS = {
    "general": ((3, 3, 4), dict(stride=2, padding=1, output_padding=1, dilation=2, groups=2),
                dict(stride=2, padding="VALID", groups=2), (72, 3)),
    "one_by_one": ((2, 2, 4), dict(stride=1, padding=1, groups=2),
                   dict(stride=1, padding="VALID", groups=3), (6, 3)),
}


def family_net(case):
    """conv_transpose2d (kernel 3×2 or 2×2, C 4 -> 6, grouped, bias) -> tanh -> grouped conv2d
    (6 -> 6) -> batch norm (eval) -> dense 3."""
    shape, ct, cv, fc = FAMILY_NETS[case]
    k = jax.random.split(jax.random.key(20), 6)
    kernel = (3, 2) if case == "general" else (2, 2)
    params = {"ct": {"w": jax.random.normal(k[0], (*kernel, 4, 6 // ct["groups"])) / 2,
                     "b": jax.random.normal(k[1], (6,)) / 3},
              "cv": {"w": jax.random.normal(k[2], (2, 2, 6 // cv["groups"], 6)) / 2}
              if case == "general" else
              {"w": jax.random.normal(k[2], (1, 1, 6 // cv["groups"], 6))},
              "bn": {"gamma": 1 + jax.random.normal(k[3], (6,)) / 4,
                     "beta": jax.random.normal(k[4], (6,)) / 4},
              "fc": {"w": jax.random.normal(k[5], fc) / 2}}
    state = {"bn": {"mean": jnp.full(6, 0.2), "var": jnp.full(6, 1.3)}}

    def apply(params, state, x, *, train, layers=LayerPolicy()):
        p = params
        h = layers.tanh(layers.conv_transpose2d(x, p["ct"]["w"], p["ct"]["b"], **ct))
        h = layers.conv2d(h, p["cv"]["w"], **cv)
        h, _ = layers.batch_norm(h, p["bn"]["gamma"], p["bn"]["beta"], state["bn"]["mean"],
                                 state["bn"]["var"], train=train)
        return layers.dense(layers.flatten(h), p["fc"]["w"]), state
    return apply, jax.tree.map(lambda a: a.astype(jnp.float64), (params, state)), shape


@pytest.mark.parametrize("case", sorted(FAMILY_NETS))
def test_transposed_and_grouped_conv_quantities(case):
    """conv_transpose2d and grouped conv2d: the first-pass quantities against vmap(grad), the
    GGN diagonal against the dense JᵀHJ, and (1×1 outputs, one example) each group's
    kron(A[g], G[g]) against its block of the dense GGN."""
    apply, (params, state), shape = family_net(case)
    # one_by_one: one example (kron(A, G) is exact for one); general: three
    x, y = _data(jax.random.key(21), 3 if case == "general" else 1, shape, 3)
    kfac = ("kfac",) if case == "one_by_one" else ()
    out = Q.compute(apply, params, state, x, y, quantities=FIRST + ("diag_ggn",) + kfac)
    check_first_pass(out, apply, params, state, x, y, "softmax_cross_entropy", "mean")
    ggn, unravel = dense_ggn(apply, params, state, x, y, "softmax_cross_entropy", "mean")
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)))
    if not kfac:
        return
    offsets = _offsets(params)
    for layer, groups in (("ct", 2), ("cv", 3)):
        w = params[layer]["w"]
        a, g = out["kfac"][layer]["w"]
        assert a.shape[0] == g.shape[0] == groups
        start, size = offsets[(layer, "w")]
        block = ggn[start:start + size, start:start + size].reshape(*w.shape, *w.shape)
        for j in range(groups):
            if layer == "ct":      # W_g = W[:, :, group g's input channels, :]
                cin = w.shape[2] // groups
                sub = block[:, :, j * cin:(j + 1) * cin, :, :, :, j * cin:(j + 1) * cin, :]
            else:                  # W_g = W[..., group g's output channels]
                cout = w.shape[3] // groups
                sub = block[..., j * cout:(j + 1) * cout, :, :, :, j * cout:(j + 1) * cout]
            rows = sub.shape[0] * sub.shape[1] * sub.shape[2] * sub.shape[3]
            np.testing.assert_allclose(np.kron(a[j], g[j]), sub.reshape(rows, rows),
                                       rtol=1e-9, atol=1e-12)


def test_conv_transpose_patches_are_ordered_like_w_rows():
    """Σ_t p_{n,t} ⊗ δ_{n,t} with the transposed convolution's patches reproduces the
    per-example gradient of vmap(grad) (stride, dilation, padding, output padding, a
    non-square kernel), and so does the vmapped weight-gradient equation."""
    from jbp.layers import conv_transpose as ct
    opts = dict(stride=(2, 3), padding=(1, 0), output_padding=(1, 2), dilation=(2, 1))
    x = jax.random.normal(jax.random.key(22), (2, 3, 4, 3), jnp.float64)
    w = jax.random.normal(jax.random.key(23), (3, 2, 3, 4), jnp.float64)
    cfg = ct.conv_transpose_config(x, w, **opts)
    g = jax.random.normal(jax.random.key(24), (2, *cfg.out_hw, 4), jnp.float64)

    @jax.jit
    def both(x, w, g):
        def loss_n(wn, xn, gn):
            return jnp.sum(jbp.autodiff.conv_transpose2d(xn[None], wn, **opts) * gn[None])
        want = jax.vmap(jax.grad(loss_n), (None, 0, 0))(w, x, g)
        p = ct.patches(x, w.shape, cfg)
        by_patches = jnp.einsum("ntk,ntc->nkc", p, g.reshape(2, -1, 4)).reshape(want.shape)
        return want, by_patches, ct.per_example_weight_grad(x, g, w.shape, cfg)

    want, by_patches, by_equation = both(x, w, g)
    np.testing.assert_allclose(by_patches, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(by_equation, want, rtol=1e-10, atol=1e-12)


def per_pixel_net():
    """(N, 3, 3, 2) -> conv2d 2×2 VALID (4, bias) -> tanh -> conv_transpose2d 2×2 stride 2 (3)
    -> per-pixel logits (N, 4, 4, 3)."""
    k = jax.random.split(jax.random.key(25), 3)
    params = {"cv": {"w": jax.random.normal(k[0], (2, 2, 2, 4)) / 2,
                     "b": jax.random.normal(k[1], (4,)) / 3},
              "ct": {"w": jax.random.normal(k[2], (2, 2, 4, 3))}}

    def apply(params, state, x, *, train, layers=LayerPolicy()):
        h = layers.tanh(layers.conv2d(x, params["cv"]["w"], params["cv"]["b"], padding="VALID"))
        return layers.conv_transpose2d(h, params["ct"]["w"], stride=2), state
    return apply, jax.tree.map(lambda a: a.astype(jnp.float64), params)


@pytest.mark.parametrize("loss,reduction", [("softmax_cross_entropy", "mean"), ("mse", "sum")])
def test_per_pixel_logits_diag_ggn_and_batch_l2(loss, reduction):
    """Per-pixel logits (a segmentation net's): ℓ_n is the mean (sum) over the pixels, its
    Hessian block diagonal over them; diag_ggn from the H·W·C columns against the dense JᵀHJ,
    batch_l2 against vmap(grad)."""
    apply, params = per_pixel_net()
    x = jax.random.normal(jax.random.key(26), (2, 3, 3, 2), jnp.float64)
    if loss == "mse":
        y = jax.random.normal(jax.random.key(27), (2, 4, 4, 3), jnp.float64)
    else:
        y = jax.random.randint(jax.random.key(27), (2, 4, 4), 0, 3)
    out = Q.compute(apply, params, {}, x, y, loss=loss, reduction=reduction,
                    quantities=("batch_l2", "diag_ggn"))
    grads = vmap_route(apply, params, {}, x, y, loss, reduction)
    assert_tree_close(out["batch_l2"], jax.tree.map(
        lambda g: jnp.sum(g.reshape(2, -1) ** 2, axis=1), grads))
    ggn, unravel = dense_ggn(apply, params, {}, x, y, loss, reduction)
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)))


@pytest.mark.slow
def test_tiny_mobilenet_like_batch_l2_and_diag_ggn():
    """jbp.models.mobilenet's own blocks at a tiny width (8×8 input; stem 4, an MBConv with
    expansion 2, depthwise 3×3 stride 2, squeeze-and-excitation, one with a shortcut; head 8;
    batch norm in evaluation mode with non-trivial running statistics, no key): batch_l2
    against vmap(grad) of the autodiff twin, and diag_ggn against the dense JᵀHJ."""
    from jbp.models import mobilenet
    spec = mobilenet.Spec("tiny", "silu", ((1, 3, 1, 4, 1), (2, 3, 2, 6, 2)), se=True,
                          stem_width=4, head_width=8, min_size=8)
    params, state = mobilenet._init(spec, jax.random.key(30), (8, 8, 3), 3)
    state = jax.tree.map(lambda v: v + 0.1 * jax.random.uniform(jax.random.key(31), v.shape),
                         state)
    params, state = jax.tree.map(lambda a: a.astype(jnp.float64), (params, state))

    def apply(params, state, x, *, train, layers=LayerPolicy()):
        return mobilenet._apply(spec, params, state, x, train, layers, None, 0.0, 0.0, "none")

    x, y = _data(jax.random.key(32), 2, (8, 8, 3), 3)
    out = Q.compute(apply, params, state, x, y, quantities=("batch_l2", "diag_ggn"))
    grads = vmap_route(apply, params, state, x, y, "softmax_cross_entropy", "mean")
    assert_tree_close(out["batch_l2"], jax.tree.map(
        lambda g: jnp.sum(g.reshape(2, -1) ** 2, axis=1), grads), atol=1e-15)
    ggn, unravel = dense_ggn(apply, params, state, x, y, "softmax_cross_entropy", "mean")
    assert_tree_close(out["diag_ggn"], unravel(jnp.diag(ggn)), atol=1e-15)


# --- Monte Carlo: converging to the exact value within a variance-derived bound ---------------

def test_diag_ggn_mc_converges_within_its_standard_error():
    """The single-sample estimate d(ŷ) = (1/N) Σ_n (J_nᵀ (p_n − e_ŷn))² has the exact mean
    diag_ggn and an exact variance Var(d) = (1/N²) Σ_n Var_ŷ[(J_nᵀ(p_n − e_ŷ))²], enumerated over
    the classes with the dense Jacobians. With M samples the error, in units of √(Var(d)/M),
    must look like a standard normal: RMS ≤ 2 and max ≤ 6 over the parameters, at M = 16 and
    M = 1024 (a fixed seed); and the error must shrink."""
    params = mlp_init(jax.random.key(12))
    x, y = _data(jax.random.key(13), 4, (2, 2, 3), 4)
    flat, unravel = ravel_pytree(params)
    exact = Q.compute(mlp_apply, params, {}, x, y, quantities=("diag_ggn",))["diag_ggn"]
    exact = ravel_pytree(exact)[0]
    var = 0
    for i in range(4):
        def logits_n(f):
            return mlp_apply(unravel(f), {}, x[i][None], train=False, layers=AUTODIFF)[0][0]
        jac = jax.jacrev(logits_n)(flat)
        p = jax.nn.softmax(logits_n(flat))
        v = (jac.T @ (p[:, None] - jnp.eye(4))) ** 2          # (P, C): each class's term
        var = var + (v ** 2 @ p - (v @ p) ** 2)
    var = var / 16
    errors = []
    for m in (16, 1024):
        mc = Q.compute(mlp_apply, params, {}, x, y, quantities=("diag_ggn_mc",),
                       key=jax.random.key(14), mc_samples=m)["diag_ggn_mc"]
        err = ravel_pytree(mc)[0] - exact
        z = err / jnp.sqrt(var / m + 1e-30)
        assert float(jnp.sqrt(jnp.mean(z ** 2))) <= 2.0, m
        assert float(jnp.max(jnp.abs(z))) <= 6.0, m
        errors.append(float(jnp.linalg.norm(err)))
    assert errors[1] < errors[0]


# --- bad input -----------------------------------------------------------------------------

def test_bad_input_messages():
    params = mlp_init(jax.random.key(0))
    x, y = _data(jax.random.key(1), 2, (2, 2, 3), 4)
    with pytest.raises(ValueError, match="unknown quantity 'hessian'"):
        Q.compute(mlp_apply, params, {}, x, y, quantities=("hessian",))
    with pytest.raises(ValueError, match="not defined for 'sigmoid_binary_cross_entropy'"):
        Q.compute(mlp_apply, params, {}, x, y.astype(jnp.float64),
                  loss="sigmoid_binary_cross_entropy", quantities=("diag_ggn",))
    with pytest.raises(ValueError, match="key: 'diag_ggn_mc'"):
        Q.compute(mlp_apply, params, {}, x, y, quantities=("diag_ggn_mc",))
    p, s = bn_net_init(jax.random.key(1))
    with pytest.raises(ValueError, match="not defined through batch_norm in training mode"):
        Q.compute(bn_net_apply, p, s, jnp.zeros((2, 7, 7, 2)), y, quantities=("batch_l2",),
                  train=True)


def test_a_layer_without_quantities_says_so():
    """A parameter wrapped with probes that reaches a layer with no parameters, whose rule
    fills none (here tanh: a weight reparametrised as tanh(v)), is named, instead of failing
    inside the layer."""
    def apply(params, state, x, *, train, layers):
        y = layers.conv2d(x, layers.tanh(params["v"]))
        return y.reshape(y.shape[0], -1), state

    params = {"v": jnp.zeros((2, 2, 1, 1))}
    with pytest.raises(ValueError, match="x: a parameter wrapped by jbp.quantities reached a "
                                         "layer that computes no per-example quantities"):
        Q.compute(apply, params, {}, jnp.zeros((2, 2, 2, 1)), jnp.array([0, 1]),
                  quantities=("batch_l2",))


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "blocks"])
def test_resnet20_eval_batch_norm_and_remat_batch_l2(remat):
    """ResNet-20 (batch norm in evaluation mode, projection shortcuts; with jax.checkpoint
    around every block) on 8×8 images: batch_l2 against vmap(grad) of the autodiff twin."""
    from jbp import models
    from jbp.config import ModelConfig
    model = models.from_config(ModelConfig(name="resnet20", remat=remat))
    params, state = model.init(jax.random.key(0), (8, 8, 1), 3)
    params, state = jax.tree.map(lambda a: a.astype(jnp.float64), (params, state))
    x, y = _data(jax.random.key(1), 2, (8, 8, 1), 3)
    out = Q.compute(model.apply, params, state, x, y, quantities=("batch_l2",))
    grads = vmap_route(model.apply, params, state, x, y, "softmax_cross_entropy", "mean")
    assert_tree_close(out["batch_l2"], jax.tree.map(
        lambda g: jnp.sum(g.reshape(2, -1) ** 2, axis=1), grads), atol=1e-15)

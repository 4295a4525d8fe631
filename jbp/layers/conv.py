"""2-D convolution (cross-correlation) with a hand-written backward.

Layout: images NHWC, kernels HWIO (``w.shape == (KH, KW, C_in // groups, C_out)``).

Equations (EQUATIONS.md, "Convolution"), with stride ``s``, dilation ``d``, ``δ = ∂L/∂z``::

    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k] + b[k]
    ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]    (δ ⋆ a)
    ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]
    ∂L/∂a          = full convolution of δ, dilated by s, with W rotated 180°
                     and its input/output channels swapped (per group)

``a`` above is the zero-padded input; the backward crops the padding away again.

Per-example quantities (``jbp._probes``; EQUATIONS.md, "Per-example quantities"), ``T`` output
positions, ``p_{n,t}`` the patch of ``a_n`` under output position ``t`` flattened as (KH, KW,
C_in) (= W's rows flattened to (KH·KW·C_in, C_out)), ``δ_{n,t}`` its output gradient::

    batch_grad        ∂ℓ_n/∂W = Σ_t p_{n,t} ⊗ δ_{n,t}   (the weight-gradient equation on example n
                      alone, vmapped over n: no patches),  ∂ℓ_n/∂b = Σ_t δ_{n,t}
    batch_l2          ‖∂ℓ_n/∂W‖² = Σ_{t,t'} (p_{n,t}·p_{n,t'}) (δ_{n,t}·δ_{n,t'})  (patches and Gram
                      matrices, N·(T·K + T²) values) when they are fewer than the per-example
                      gradients (N·K·C_out values, K = KH·KW·C_in), else from those
    sum_grad_squared  Σ_n (∂ℓ_n/∂W)²
    kfac (KFC)        A = Σ_{n,t} p_{n,t} p_{n,t}ᵀ,  G = (1/T) Σ_{n,t} δ_{n,t} δ_{n,t}ᵀ; with groups > 1
                      one pair per group from its own channels, stacked (``kfac_factors``)

What runs: each equation is named once here and run by ``jbp._conv_kernels.dispatch``. Its
generic form, one XLA convolution (``jbp.layers.conv_equations``), is what runs on GPU and TPU.
On CPU, where XLA runs some shapes of those convolutions slowly, the same sums have faster
formulations, chosen per call from the table ``jbp._conv_kernels.FORMS``: by default oneDNN's
kernels for float32 k×k convolutions where the ``[onednn]`` extra is installed and builds
(docs/onednn.md; ``JBP_CONV_BACKEND=xla`` or ``jbp.set_conv_backend("xla")`` turns them off),
else and elsewhere XLA's own forms (docs/performance.md). ``lax.platform_dependent`` is emitted
only where a form is chosen.
"""

from __future__ import annotations

from typing import Optional

import jax

import jax.numpy as jnp
from jax import lax

from jbp import _checks, _probes, _residuals
from jbp._conv_kernels import dispatch, is_pointwise, tap_forms
from jbp.layers import padding as _padding
from jbp.layers.conv_equations import ConvConfig, channel_sum, out_hw, weight_grad
from jbp._registry import layer
from jbp._rule import call_probed, cast_like, manual_rule


# --- the rule: forward, residuals, backward ---------------------------------------------------

def _forward(x, w, b, cfg: ConvConfig, rule: bool = False):
    """z = a ⋆ W + b. What ``jbp.autodiff`` differentiates (``rule=False``); the hand-written
    rule's forward (``rule=True``, :func:`_rule_forward`) may also take the table's
    ``rule_only`` forms: the same sum in another order, equal to rounding."""
    z = dispatch("forward", (x, w), (cfg,), rule=rule)    # z = a ⋆ W
    return z if b is None else z + b


def _rule_forward(x, w, b, cfg: ConvConfig):
    return _forward(x, w, b, cfg, rule=True)


def _fwd(x, w, b, cfg: ConvConfig):
    # Residuals: the input a (N·H·W·C_in elements) and the kernel W; the bias only for its
    # dtype/None-ness (C_out elements). Bytes saved = (x.size + w.size + b.size) · itemsize,
    # with a kept as cfg.residuals says (bf16: 2 bytes, int8: 1 byte per element + C_in scales).
    return _rule_forward(x, w, b, cfg), (_residuals.compress(x, cfg.residuals), w, b)


def _bwd(cfg: ConvConfig, res, g):
    """The three gradients from δ = g; ã is the kept input (= a for ``residuals="exact"``;
    ∂L/∂a does not read it)."""
    kept, w, b = res
    x = _residuals.decompress(kept, cfg.residuals, w.dtype)
    # ∂L/∂a = full convolution of the s-dilated δ with W rotated 180°, channels swapped
    dx = dispatch("input_grad", (g, w), (x.shape, cfg))
    # ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · ã[n, h·s+i·d, w·s+j·d, c]
    dw = dispatch("weight_grad", (x, g), (w.shape, cfg))
    # ∂L/∂b[k] = Σ_{n,h,w} δ[n,h,w,k]
    db = None if b is None else channel_sum(g)
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


# --- per-example quantities from the same residuals and δ (module docstring) -------------------

def per_example_weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂ℓ_n/∂W for every n, shape (N, KH, KW, C_in // groups, C_out): the weight-gradient
    equation on each example alone (N·K·C_out values, no patches), computed as ONE weight
    gradient of the convolution whose groups are the examples: a_n and δ_n laid side by side
    along the channels, ``(1, H, W, N·C_in)`` and ``(1, H_out, W_out, N·C_out)``, with
    ``N·groups`` groups, so group ``n·groups + j`` is example ``n``'s group ``j``. It runs on the
    convolution table like the batch's own weight gradient (grouped kernels on CPU). A 1×1
    kernel of one group without padding is one batched matmul instead, ``∂ℓ_n/∂W[0,0] = a_nᵀ δ_n``
    over the strided pixels (as a grouped convolution it took XLA's generic, slow form)."""
    if is_pointwise(w_shape, cfg):            # the batch's pointwise form, one example each
        return jax.vmap(lambda xn, gn: tap_forms.pointwise_weight_grad(
            xn[None], gn[None], w_shape, cfg))(x, g)
    n = x.shape[0]
    kh, kw, cin_g, cout = w_shape
    a = jnp.moveaxis(x, 0, 2).reshape(1, x.shape[1], x.shape[2], n * x.shape[3])
    d = jnp.moveaxis(g, 0, 2).reshape(1, g.shape[1], g.shape[2], n * cout)
    folded = cfg._replace(groups=n * cfg.groups)
    grad = dispatch("weight_grad", (a, d), ((kh, kw, cin_g, n * cout), folded))
    return jnp.moveaxis(grad.reshape(kh, kw, cin_g, n, cout), 3, 0)


def patches(x, w_shape, cfg: ConvConfig):
    """p_{n,t}: shape (N, T, KH·KW·C_in), T = H_out·W_out, each patch flattened as (KH, KW,
    C_in) like W's rows (groups = 1; grouped: pass w_shape with all C_in channels and split
    them by group, ``kfac_factors``): KH·KW strided slices of the zero-padded input,
    p[n, (h, w), (i, j, c)] = a[n, h·s+i·d, w·s+j·d, c] (memory moves, no arithmetic)."""
    kh, kw, cin, _ = w_shape
    (sh, sw), (dh, dw) = cfg.stride, cfg.dilation
    ho, wo = out_hw(x.shape, w_shape, cfg)
    a = jnp.pad(x, ((0, 0), *cfg.padding, (0, 0)))
    taps = [lax.slice(a, (0, i * dh, j * dw, 0),
                      (a.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, cin),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]                     # each (N, H_out, W_out, C)
    return jnp.stack(taps, axis=3).reshape(x.shape[0], ho * wo, kh * kw * cin)


def batch_l2_by_gram(x, g, w_shape, cfg: ConvConfig):
    """‖∂ℓ_n/∂W‖² = Σ_{t,t'} (p_{n,t}·p_{n,t'}) (δ_{n,t}·δ_{n,t'}), shape (N,) (groups = 1)."""
    p = patches(x, w_shape, cfg)
    d = g.reshape(g.shape[0], -1, g.shape[-1])
    return jnp.einsum("nts,nts->n", jnp.einsum("ntk,nsk->nts", p, p),
                      jnp.einsum("ntc,nsc->nts", d, d))


def kfac_factors(p, g, taps, groups):
    """KFC's ``A = Σ_{n,t} p pᵀ`` and ``G = (1/T) Σ_{n,t} δ δᵀ`` from the patches ``p`` of the
    whole input, (N, T, taps·C_in) flattened (taps = KH·KW, C_in), and ``δ`` (N, H_out, W_out,
    C_out). With ``groups`` > 1 one pair per group, stacked: ``A[g]`` from group g's input
    channels, ``G[g]`` from its output channels, shapes (G, taps·C_in/G, taps·C_in/G) and
    (G, C_out/G, C_out/G); the blocks between groups are K-FAC's dropped off-diagonal blocks."""
    t = g.shape[1] * g.shape[2]
    rows = p.shape[0] * p.shape[1]
    if groups == 1:
        p, d = p.reshape(rows, -1), g.reshape(rows, -1)
        return p.T @ p, d.T @ d / t
    p = p.reshape(rows, taps, groups, -1)                  # (rows, KH·KW, G, C_in/G)
    d = g.reshape(rows, groups, -1)                        # (rows, G, C_out/G)
    a = jnp.einsum("rigc,rjgk->gicjk", p, p).reshape(groups, taps * p.shape[-1], -1)
    return a, jnp.einsum("rgc,rgk->gck", d, d) / t


def kfac_shapes(w_shape, groups):
    """The shapes of :func:`kfac_factors`' ``(A, G)`` for a kernel (KH, KW, C_in/G, C_out)."""
    kh, kw, cin_g, cout = w_shape
    if groups == 1:
        return (kh * kw * cin_g,) * 2, (cout,) * 2
    return (groups, *(kh * kw * cin_g,) * 2), (groups, *(cout // groups,) * 2)


def gram_is_smaller(x_shape, g_shape, w_shape, groups) -> bool:
    """Whether the Gram route of ``batch_l2`` holds fewer values than the per-example
    gradients: patches and Gram matrices, T·K + T², against K·C_out per example (groups = 1)."""
    t = g_shape[1] * g_shape[2]
    k = w_shape[0] * w_shape[1] * w_shape[2]
    return groups == 1 and t * k + t * t < k * w_shape[3]


def _quantities(cfg: ConvConfig, res, g, names):
    """The per-example quantities of W and b (module docstring)."""
    kept, w, b = res
    x = _residuals.decompress(kept, cfg.residuals, w.dtype)
    _, names_w, names_b = names
    qw, qb = {}, {}
    if names_w:
        materialised = [n for n in names_w if n in ("batch_grad", "sum_grad_squared")]
        if "batch_l2" in names_w and not gram_is_smaller(x.shape, g.shape, w.shape, cfg.groups):
            materialised.append("batch_l2")
        if materialised:
            grad_n = per_example_weight_grad(x, g, w.shape, cfg)
            qw.update(_probes.from_per_example(grad_n, materialised, w.dtype))
        if "batch_l2" in names_w and "batch_l2" not in qw:
            qw["batch_l2"] = cast_like(batch_l2_by_gram(x, g, w.shape, cfg), w)
        if "kfac" in names_w:
            p = patches(x, (*w.shape[:2], x.shape[-1], w.shape[3]), cfg)
            qw["kfac"] = tuple(cast_like(f, w) for f in kfac_factors(
                p, g, w.shape[0] * w.shape[1], cfg.groups))
    if names_b:
        _probes.check_kfac(names_b, "a bias")
        qb = _probes.from_per_example(jnp.sum(g, axis=(1, 2)), names_b, b.dtype)
    return None, qw or None, qb or None


_conv2d_rule = manual_rule("conv2d", _forward, _fwd, _bwd, num_args=4, primal=_rule_forward,
                           quantities=_quantities)


def conv_config(x, w, b=None, *, stride=1, padding="SAME", dilation=1, groups=1,
                residuals="exact") -> ConvConfig:
    """Check the arguments of :func:`conv2d` and resolve them to a :class:`ConvConfig`."""
    _checks.require_rank("x", x, 4, "(N, H, W, C_in) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 4, "(KH, KW, C_in // groups, C_out) in HWIO layout")
    _checks.check_kernel_layout(x, w, groups)          # a PyTorch (C_out, C_in, KH, KW) kernel
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    stride = _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    n, h, wd, cin = x.shape
    kh, kw, w_cin, cout = w.shape
    if cin == 0:     # PyTorch answers with 0 output channels; the empty sum would be 0
        raise ValueError(f"x: has no input channels (shape {tuple(x.shape)}); a convolution "
                         f"needs C_in >= 1")
    if cin % groups:
        raise ValueError(f"groups: x has C_in={cin} channels, not divisible by groups={groups}")
    if w_cin != cin // groups:
        raise ValueError(
            f"w: kernel input channels w.shape[2]={w_cin} must equal C_in / groups = "
            f"{cin} / {groups} = {cin // groups} (w.shape={tuple(w.shape)}, x.shape="
            f"{tuple(x.shape)})." + _checks.warn_if_nchw("x", x, w_cin * groups)
        )
    if cout % groups:
        raise ValueError(f"w: C_out={cout} (w.shape[3]) is not divisible by groups={groups}")
    if b is not None:
        _checks.require_array("b", b)
        if tuple(b.shape) != (cout,):
            raise ValueError(f"b: expected shape ({cout},) (C_out), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"b: dtype {b.dtype} differs from x dtype {x.dtype}")
    k_eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = _checks.resolve_padding("padding", padding, (h, wd), k_eff, stride)
    for axis, what in ((0, "height"), (1, "width")):
        _checks.output_size("w", (h, wd)[axis], k_eff[axis], stride[axis], pads[axis],
                            f"dilated kernel {what}")
    return ConvConfig(stride, pads, dilation, groups, _residuals.check(residuals))


@layer(_conv2d_rule, _padding.pad, options=("residuals",))
def conv2d(rule, pad, x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None, *,
           stride=1, padding="SAME", dilation=1, groups=1,
           padding_mode: str = "zeros", residuals="exact") -> jax.Array:
    """2-D convolution: ``z = a ⋆ W + b``.

    Args:
      x: input ``a``, shape ``(N, H, W, C_in)``.
      w: kernel ``W``, shape ``(KH, KW, C_in // groups, C_out)``.
      b: optional bias, shape ``(C_out,)``.
      stride, dilation: int or ``(sh, sw)``.
      padding: ``"SAME"`` (output ``ceil(H / sh)``), ``"VALID"``, an int, or
        ``((top, bottom), (left, right))``.
      groups: feature groups; ``groups == C_in`` is a depthwise convolution.
      padding_mode: ``"zeros"``, or ``"reflect"``, ``"replicate"``, ``"circular"``: the
        input is first padded by :func:`jbp.layers.padding.pad` (whose backward folds the padded
        gradient back) and then convolved unpadded, as PyTorch's ``Conv2d`` does.
      residuals: what the rule keeps of ``x`` for ``∂L/∂W``: ``"exact"``, ``"bf16"`` or
        ``"int8"`` (per-channel scale; ``jbp._residuals``). The forward is unchanged.

    Returns:
      ``z`` of shape ``(N, H_out, W_out, C_out)``.

    Backward (hand-written in ``jbp.layers.conv``): ``∂L/∂W = δ ⋆ a``, ``∂L/∂b = Σ_{n,h,w} δ``, and
    ``∂L/∂a`` = full convolution of the stride-dilated ``δ`` with ``W`` rotated 180° and
    channels swapped. Residuals: ``x``, ``w`` and ``b`` (``(x.size + w.size + C_out) ·
    itemsize`` bytes; ``b`` only for its dtype; the padded ``x`` with a padding mode).
    ``w``/``b`` wrapped by ``jbp.quantities`` (``jbp._probes.Probed``): the backward also gives
    their per-example quantities (module docstring).
    """
    probed_w = w
    w, probes_w = _probes.unwrap(w)
    b, probes_b = _probes.unwrap(b)
    cfg = conv_config(x, w, b, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, residuals=residuals)
    _probes.kfac_shapes(probed_w, *kfac_shapes(w.shape, groups))
    if padding_mode != "zeros":
        if padding_mode not in _padding.MODES:
            raise ValueError(f"padding_mode: expected 'zeros' or one of {_padding.MODES}, "
                             f"got {padding_mode!r}")
        x = pad(x, cfg.padding, padding_mode)
        cfg = cfg._replace(padding=((0, 0), (0, 0)))
    return call_probed(rule, (None, probes_w, probes_b), x, w, b, cfg)

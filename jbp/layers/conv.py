"""2-D convolution (cross-correlation) with a hand-written backward.

Layout: images NHWC, kernels HWIO (``w.shape == (KH, KW, C_in // groups, C_out)``).

Equations (EQUATIONS.md, "Convolution"), with stride ``s``, dilation ``d``, ``δ = ∂L/∂z``::

    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k] + b[k]
    ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]    (δ ⋆ a)
    ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]
    ∂L/∂a          = full convolution of δ, dilated by s, with W rotated 180°
                     and its input/output channels swapped (per group)

``a`` above is the zero-padded input; the backward crops the padding away again.

Each equation is written below as one XLA convolution (:func:`correlate`, :func:`input_grad`,
:func:`weight_grad`): what runs on GPU and TPU. On CPU, where XLA runs some shapes of those
convolutions slowly, the same sums have faster formulations, chosen per call from the table in
``jbp._conv_kernels`` (``FORMS``); the rule asks it once per equation and emits
``lax.platform_dependent`` only where a form is chosen.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jbp import _checks, _conv_kernels, _residuals
from jbp.layers import padding as _padding
from jbp._registry import layer
from jbp._rule import cast_like, manual_rule

_NHWC = ("NHWC", "HWIO", "NHWC")


class ConvConfig(NamedTuple):
    """Static (hashable) configuration of one convolution, padding already explicit."""

    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    dilation: Tuple[int, int]
    groups: int
    residuals: str = "exact"    # what the rule keeps of ``a`` for ∂L/∂W (jbp._residuals)


def out_hw(x_shape, w_shape, cfg: ConvConfig) -> Tuple[int, int]:
    """(H_out, W_out) = ⌊(H + pads − ((K − 1)·d + 1)) / s⌋ + 1 per spatial axis."""
    return tuple((x_shape[1 + a] + sum(cfg.padding[a]) - (w_shape[a] - 1) * cfg.dilation[a] - 1)
                 // cfg.stride[a] + 1 for a in (0, 1))


# --- the three equations as XLA convolutions --------------------------------------------------

def correlate(x, w, cfg: ConvConfig):
    """z = a ⋆ W (no bias), as one XLA convolution."""
    return lax.conv_general_dilated(
        x, w, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=_NHWC, feature_group_count=cfg.groups)


def _leftover(size: int, out: int, k_eff: int, stride: int, pad: Tuple[int, int]) -> int:
    """Padded-input cells past the last window (they receive no gradient)."""
    return size + pad[0] + pad[1] - ((out - 1) * stride + k_eff)


def input_grad(g, w, x_shape, cfg: ConvConfig):
    """∂L/∂a: full convolution of δ (dilated by the stride) with W rotated 180°, I/O swapped."""
    kh, kw, cin_g, cout = w.shape
    groups = cfg.groups
    # Rotate 180° and swap input/output channels within each group:
    #   W_rot[i, j, k, g·C_in/G + c] = W[KH-1-i, KW-1-j, c, g·C_out/G + k]
    w_rot = (w[::-1, ::-1]
             .reshape(kh, kw, cin_g, groups, cout // groups)
             .transpose(0, 1, 4, 3, 2)
             .reshape(kh, kw, cout // groups, groups * cin_g))
    pads = []
    for axis, k in ((0, kh), (1, kw)):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        rem = _leftover(x_shape[1 + axis], g.shape[1 + axis], k_eff, cfg.stride[axis], (lo, hi))
        # "full" padding k_eff-1 on each side, minus the forward padding we crop back off.
        pads.append((k_eff - 1 - lo, k_eff - 1 - hi + rem))
    return lax.conv_general_dilated(
        g, w_rot, window_strides=(1, 1), padding=pads, lhs_dilation=cfg.stride,
        rhs_dilation=cfg.dilation, dimension_numbers=_NHWC, feature_group_count=groups)


def weight_grad_pads(x, g, w_shape, cfg: ConvConfig):
    """Forward padding, minus the padded-input cells past the last window (no gradient)."""
    pads = []
    for axis, k in ((0, w_shape[0]), (1, w_shape[1])):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        rem = _leftover(x.shape[1 + axis], g.shape[1 + axis], k_eff, cfg.stride[axis], (lo, hi))
        pads.append((lo, hi - rem))
    return pads


def weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c].

    A correlation of the input with δ in which the batch axis N is the contraction ("feature")
    axis, C_in plays the batch, the stride dilates δ and the dilation strides the window. Groups
    become a batch-group count: group g's input channels pair with group g's output channels.
    """
    return lax.conv_general_dilated(
        x, g, window_strides=cfg.dilation, padding=weight_grad_pads(x, g, w_shape, cfg),
        rhs_dilation=cfg.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"), batch_group_count=cfg.groups)


def channel_sum(g):
    """∂L/∂b[k] = Σ_{n,h,w} δ[n,h,w,k].

    With fewer than 16 channels the rows of δ are first summed R at a time as one
    (N·H·W / R, R·C_out) column sum (R·C_out <= 128) and the R partial sums folded: XLA:CPU
    reduces a 6-wide minor axis slowly (docs/performance.md)."""
    c = g.shape[-1]
    rows = g.size // c
    r = next((r for r in (16, 8, 4, 2) if r * c <= 128 and rows % r == 0), 1)
    if c >= 16 or r == 1:
        return jnp.sum(g, axis=(0, 1, 2))
    return jnp.sum(jnp.sum(g.reshape(rows // r, r * c), axis=0).reshape(r, c), axis=0)


def _on_cpu_if_chosen(equation, generic, operands, static, x_shape, w_shape, cfg, dtype,
                      rule=True):
    """``generic(*operands)``, or, where ``jbp._conv_kernels`` chooses a form for this call,
    that form on XLA:CPU and ``generic`` on every other backend."""
    chosen = _conv_kernels.choose(equation, x_shape, w_shape, cfg, dtype, rule=rule)
    if chosen is None:
        return generic(*operands)
    form, params = chosen
    return lax.platform_dependent(*operands, cpu=lambda *ops: form.fn(*ops, *static, **params),
                                  default=generic)


# --- the rule: forward, residuals, backward ---------------------------------------------------

def _forward(x, w, b, cfg: ConvConfig, rule: bool = False):
    """z = a ⋆ W + b. What ``jbp.autodiff`` differentiates (``rule=False``); the hand-written
    rule's forward (``rule=True``, :func:`_rule_forward`) may also take the table's
    ``rule_only`` forms: the same sum in another order, equal to rounding."""
    z = _on_cpu_if_chosen("forward", lambda x, w: correlate(x, w, cfg), (x, w), (cfg,),
                          x.shape, w.shape, cfg, x.dtype, rule=rule)
    return z if b is None else z + b


def _rule_forward(x, w, b, cfg: ConvConfig):
    return _forward(x, w, b, cfg, rule=True)


def _fwd(x, w, b, cfg: ConvConfig):
    # Residuals: the input a (N·H·W·C_in elements) and the kernel W; the bias only for its
    # dtype/None-ness (C_out elements). Bytes saved = (x.size + w.size + b.size) · itemsize,
    # with a kept as cfg.residuals says (bf16: 2 bytes, int8: 1 byte per element + C_in scales).
    return _rule_forward(x, w, b, cfg), (_residuals.compress(x, cfg.residuals), w, b)


def _bwd(cfg: ConvConfig, res, g):
    """∂L/∂a = input_grad(δ, W), ∂L/∂W = weight_grad(ã, δ), ∂L/∂b = Σ_{n,h,w} δ, where ã is
    the kept input (= a for ``residuals="exact"``; ``∂L/∂a`` does not read it)."""
    kept, w, b = res
    x = _residuals.decompress(kept, cfg.residuals, w.dtype)
    dx = _on_cpu_if_chosen("input_grad", lambda g, w: input_grad(g, w, x.shape, cfg), (g, w),
                           (x.shape, cfg), x.shape, w.shape, cfg, g.dtype)
    dw = _on_cpu_if_chosen("weight_grad", lambda x, g: weight_grad(x, g, w.shape, cfg), (x, g),
                           (w.shape, cfg), x.shape, w.shape, cfg, x.dtype)
    db = None if b is None else channel_sum(g)
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


_conv2d_rule = manual_rule("conv2d", _forward, _fwd, _bwd, num_args=4, primal=_rule_forward)


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
    """
    cfg = conv_config(x, w, b, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, residuals=residuals)
    if padding_mode != "zeros":
        if padding_mode not in _padding.MODES:
            raise ValueError(f"padding_mode: expected 'zeros' or one of {_padding.MODES}, "
                             f"got {padding_mode!r}")
        x = pad(x, cfg.padding, padding_mode)
        cfg = cfg._replace(padding=((0, 0), (0, 0)))
    return rule(x, w, b, cfg)

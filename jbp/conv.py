"""2-D convolution (cross-correlation) with a hand-written backward.

Layout: images NHWC, kernels HWIO (``w.shape == (KH, KW, C_in // groups, C_out)``).

Equations (EQUATIONS.md, "Convolution"), with stride ``s``, dilation ``d``, ``δ = ∂L/∂z``::

    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k] + b[k]
    ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]    (δ ⋆ a)
    ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]
    ∂L/∂a          = full convolution of δ, dilated by s, with W rotated 180°
                     and its input/output channels swapped (per group)

``a`` above is the zero-padded input; the backward crops the padding away again.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jbp import _checks
from jbp._rule import cast_like, manual_rule

_NHWC = ("NHWC", "HWIO", "NHWC")


class ConvConfig(NamedTuple):
    """Static (hashable) configuration of one convolution, padding already explicit."""

    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    dilation: Tuple[int, int]
    groups: int


def _forward(x, w, b, cfg: ConvConfig):
    z = lax.conv_general_dilated(
        x, w, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=_NHWC, feature_group_count=cfg.groups)
    return z if b is None else z + b


def _fwd(x, w, b, cfg: ConvConfig):
    # Residuals: the input a (N·H·W·C_in elements) and the kernel W; the bias only for its
    # dtype/None-ness (C_out elements). Bytes saved = (x.size + w.size + b.size) · itemsize.
    return _forward(x, w, b, cfg), (x, w, b)


def _leftover(size: int, out: int, k_eff: int, stride: int, pad: Tuple[int, int]) -> int:
    """Padded-input cells past the last window (they receive no gradient)."""
    return size + pad[0] + pad[1] - ((out - 1) * stride + k_eff)


def _input_grad(g, w, x_shape, cfg: ConvConfig):
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


def _weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c].

    A correlation of the input with δ in which the batch axis N is the contraction ("feature")
    axis, C_in plays the batch, the stride dilates δ and the dilation strides the window. Groups
    become a batch-group count: group g's input channels pair with group g's output channels.
    """
    kh, kw = w_shape[:2]
    pads = []
    for axis, k in ((0, kh), (1, kw)):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        rem = _leftover(x.shape[1 + axis], g.shape[1 + axis], k_eff, cfg.stride[axis], (lo, hi))
        pads.append((lo, hi - rem))
    return lax.conv_general_dilated(
        x, g, window_strides=cfg.dilation, padding=pads, rhs_dilation=cfg.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"), batch_group_count=cfg.groups)


def _bwd(cfg: ConvConfig, res, g):
    x, w, b = res
    dx = _input_grad(g, w, x.shape, cfg)
    dw = _weight_grad(x, g, w.shape, cfg)
    db = None if b is None else jnp.sum(g, axis=(0, 1, 2))
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


_conv2d_rule = manual_rule("conv2d", _forward, _fwd, _bwd, num_args=4)


def conv_config(x, w, b=None, *, stride=1, padding="SAME", dilation=1, groups=1) -> ConvConfig:
    """Check the arguments of :func:`conv2d` and resolve them to a :class:`ConvConfig`."""
    _checks.require_rank("x", x, 4, "(N, H, W, C_in) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 4, "(KH, KW, C_in // groups, C_out) in HWIO layout")
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    stride = _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    n, h, wd, cin = x.shape
    kh, kw, w_cin, cout = w.shape
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
    return ConvConfig(stride, pads, dilation, groups)


def _conv2d_api(rule):
    def conv2d(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None, *,
               stride=1, padding="SAME", dilation=1, groups=1) -> jax.Array:
        """2-D convolution: ``z = a ⋆ W + b``.

        Args:
          x: input ``a``, shape ``(N, H, W, C_in)``.
          w: kernel ``W``, shape ``(KH, KW, C_in // groups, C_out)``.
          b: optional bias, shape ``(C_out,)``.
          stride, dilation: int or ``(sh, sw)``.
          padding: ``"SAME"`` (output ``ceil(H / sh)``), ``"VALID"``, an int, or
            ``((top, bottom), (left, right))``.
          groups: feature groups; ``groups == C_in`` is a depthwise convolution.

        Returns:
          ``z`` of shape ``(N, H_out, W_out, C_out)``.

        Backward (hand-written in ``jbp.conv``): ``∂L/∂W = δ ⋆ a``, ``∂L/∂b = Σ_{n,h,w} δ``, and
        ``∂L/∂a`` = full convolution of the stride-dilated ``δ`` with ``W`` rotated 180° and
        channels swapped. Residuals: ``x``, ``w`` and ``b`` (``(x.size + w.size + C_out) ·
        itemsize`` bytes; ``b`` only for its dtype).
        """
        cfg = conv_config(x, w, b, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
        return rule(x, w, b, cfg)

    return conv2d


conv2d = _conv2d_api(_conv2d_rule)
autodiff_conv2d = _conv2d_api(_conv2d_rule.forward)

"""conv2d's equations, each as one XLA convolution: the generic form every backend can run.

Layout: images NHWC, kernels HWIO (``w.shape == (KH, KW, C_in // G, C_out)``). With stride
``s``, dilation ``d``, ``a`` the zero-padded input, ``δ = ∂L/∂z`` and ``c`` running over the input
channels of ``k``'s group (EQUATIONS.md, "Convolution")::

    correlate    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k]
    input_grad   ∂L/∂a[n,p,q,c] = Σ_{h,w,i,j,k : h·s+i·d = p, w·s+j·d = q} δ[n,h,w,k] · W[i,j,c,k]
    weight_grad  ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]
    channel_sum  ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]

A leaf module: ``jbp.layers.conv`` (the rule) and ``jbp._conv_kernels`` (the faster CPU forms of
the same sums, which fall back on and differentiate through these) both import it. Each function
takes its operands, then its static arguments: ``correlate(x, w, cfg)``,
``input_grad(g, w, x_shape, cfg)``, ``weight_grad(x, g, w_shape, cfg)`` — the calling convention
of ``jbp._conv_kernels.dispatch``.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax.numpy as jnp
from jax import lax

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


def _edges(x_shape, g_shape, w_shape, cfg: ConvConfig):
    """Per spatial axis ``(K_eff, pad_lo, pad_hi, leftover)``: the dilated kernel
    K_eff = (K − 1)·d + 1, the forward padding, and the padded-input cells past the last window,
    H + pads − ((H_out − 1)·s + K_eff), which receive no gradient."""
    for axis in (0, 1):
        k_eff = (w_shape[axis] - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        reach = (g_shape[1 + axis] - 1) * cfg.stride[axis] + k_eff
        yield k_eff, lo, hi, x_shape[1 + axis] + lo + hi - reach


def correlate(x, w, cfg: ConvConfig):
    """z[n,h,w,k] = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k]   (z = a ⋆ W, no bias)."""
    return lax.conv_general_dilated(
        x, w, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=_NHWC, feature_group_count=cfg.groups)


def input_grad(g, w, x_shape, cfg: ConvConfig):
    """∂L/∂a = full convolution of δ, dilated by s, with W rotated 180° and its input/output
    channels swapped per group; the forward padding cropped off again."""
    kh, kw, cin_g, cout = w.shape
    groups = cfg.groups
    # Rotate 180° and swap input/output channels within each group:
    #   W_rot[i, j, k, g·C_in/G + c] = W[KH-1-i, KW-1-j, c, g·C_out/G + k]
    w_rot = (w[::-1, ::-1]
             .reshape(kh, kw, cin_g, groups, cout // groups)
             .transpose(0, 1, 4, 3, 2)
             .reshape(kh, kw, cout // groups, groups * cin_g))
    # "full" padding K_eff − 1 on each side, minus the forward padding we crop back off.
    pads = [(k_eff - 1 - lo, k_eff - 1 - hi + rem)
            for k_eff, lo, hi, rem in _edges(x_shape, g.shape, w.shape, cfg)]
    return lax.conv_general_dilated(
        g, w_rot, window_strides=(1, 1), padding=pads, lhs_dilation=cfg.stride,
        rhs_dilation=cfg.dilation, dimension_numbers=_NHWC, feature_group_count=groups)


def weight_grad_pads(x, g, w_shape, cfg: ConvConfig):
    """Forward padding, minus the padded-input cells past the last window (no gradient)."""
    return [(lo, hi - rem) for _, lo, hi, rem in _edges(x.shape, g.shape, w_shape, cfg)]


def weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]   (δ ⋆ a).

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

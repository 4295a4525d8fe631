"""Depthwise convolutions (``groups == C_in == C_out``, one kernel per channel) as sums of
shifted slices: elementwise passes, no convolution.

With one input channel per group the kernel is ``W[i, j, 0, c]`` and every equation of
``jbp.layers.conv_equations`` is a sum over the KH·KW taps of per-channel products, ``a`` the
zero-padded input, stride ``s``, dilation ``d``::

    correlate    z[n,h,w,c]     = Σ_{i,j} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,0,c]
    input_grad   ∂L/∂a[n,p,q,c] = Σ_{i,j} δ̂[n, p−i·d, q−j·d, c] · W[i,j,0,c]
                 (δ̂: δ with s−1 zeros between its rows and columns; 0 outside)
    weight_grad  ∂L/∂W[i,j,0,c] = Σ_{n,h,w} δ[n,h,w,c] · a[n, h·s+i·d, w·s+j·d, c]

Each tap is a strided slice of one padded operand scaled by a per-channel vector: XLA:CPU
fuses the KH·KW slices into one loop over the output, and the weight gradient into one pass of
per-tap reductions. XLA:CPU's grouped convolution (``feature_group_count = C``) runs these as C
tiny convolutions; docs/onednn.md ("Depthwise and pointwise convolutions") has the timings that
chose these forms. Same calling convention as the other forms of ``jbp._conv_kernels``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jbp.layers import conv_equations as E


def is_depthwise(x_shape, w_shape, cfg) -> bool:
    """One input and one output channel per group: ``groups == C_in == C_out`` (> 1)."""
    c = x_shape[3]
    return cfg.groups == c and c > 1 and tuple(w_shape[2:]) == (1, c)


def _taps(xp, w_shape, out_hw, cfg):
    """The KH·KW strided views ``a[n, h·s+i·d, w·s+j·d, :]`` of the padded input, (i, j) order."""
    kh, kw = w_shape[:2]
    ho, wo = out_hw
    (sh, sw), (dh, dw) = cfg.stride, cfg.dilation
    n, _, _, c = xp.shape
    return [lax.slice(xp, (0, i * dh, j * dw, 0),
                      (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _pad(x, pads):
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def correlate(x, w, cfg):
    """z[n,h,w,c] = Σ_{i,j} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,0,c]: one fused pass."""
    kh, kw = w.shape[:2]
    views = _taps(_pad(x, cfg.padding), w.shape, E.out_hw(x.shape, w.shape, cfg), cfg)
    taps = w.reshape(kh * kw, -1)
    out = views[0] * taps[0]
    for view, tap in zip(views[1:], taps[1:]):
        out = out + view * tap
    return out


def input_grad(g, w, x_shape, cfg):
    """∂L/∂a[n,p,q,c] = Σ_{i,j} δ̂[n, p+pt−i·d, q+pl−j·d, c] · W[i,j,0,c] over the unpadded
    input's (p, q): δ̂ is δ with s−1 zeros interleaved, padded so that every tap's window is a
    plain slice (``lax.pad`` with interior padding: no zeros are multiplied past XLA's fusion of
    the pad into the sum)."""
    kh, kw = w.shape[:2]
    pads = []
    for axis, k in ((0, kh), (1, kw)):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        size = x_shape[1 + axis]
        dilated = (g.shape[1 + axis] - 1) * cfg.stride[axis] + 1
        lo = k_eff - 1 - cfg.padding[axis][0]          # δ̂[e − lo] sits at E[e]
        pads.append((lo, size + k_eff - 1 - lo - dilated, cfg.stride[axis] - 1))
    e = lax.pad(g, jnp.zeros((), g.dtype), ((0, 0, 0), *pads, (0, 0, 0)))
    n, _, _, c = g.shape
    (dh, dw) = cfg.dilation
    k_h, k_w = (kh - 1) * dh, (kw - 1) * dw
    out = None
    for i in range(kh):
        for j in range(kw):
            view = lax.slice(e, (0, k_h - i * dh, k_w - j * dw, 0),
                             (n, k_h - i * dh + x_shape[1], k_w - j * dw + x_shape[2], c))
            term = view * w[i, j, 0]
            out = term if out is None else out + term
    return out


def weight_grad(x, g, w_shape, cfg):
    """∂L/∂W[i,j,0,c] = Σ_{n,h,w} δ[n,h,w,c] · a[n, h·s+i·d, w·s+j·d, c]: KH·KW per-channel
    reductions of shifted products, one pass over δ and the padded input."""
    kh, kw = w_shape[:2]
    xp = _pad(x, E.weight_grad_pads(x, g, w_shape, cfg))
    views = _taps(xp, w_shape, g.shape[1:3], cfg)
    sums = [jnp.sum(v * g, axis=(0, 1, 2)) for v in views]
    return jnp.stack(sums).reshape(kh, kw, 1, -1)

"""Channel scaling, the last step of squeeze-and-excitation, with a hand-written backward.

Squeeze-and-excitation (Hu et al., 2018; MobileNetV3, EfficientNet) computes a per-example,
per-channel scale ``s = σ(W₂ act(W₁ pool(x) + b₁) + b₂)`` from the block's own activation and
multiplies it back in. Every step before the product is an existing rule (``global_avg_pool``,
``dense``, ``silu``/``relu``, ``sigmoid``); the product is this one (EQUATIONS.md,
"Squeeze-and-excitation")::

    y[n,h,w,c] = x[n,h,w,c] · s[n,c]
    ∂L/∂x = δ ⊙ s          (s broadcast over H, W)
    ∂L/∂s[n,c] = Σ_{h,w} δ[n,h,w,c] · x[n,h,w,c]

Both operands receive a gradient: ``x`` is the block's activation, ``s`` carries the gradient
back into the excitation branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbp import _checks
from jbp._registry import layer
from jbp._rule import cast_like, compute_dtype, manual_rule


def _forward(x, s):
    return x * s[:, None, None, :]                # y = x ⊙ s, s over H, W


def _fwd(x, s):
    return _forward(x, s), (x, s)                 # residuals: x and s ((N·H·W + N)·C values)


def _bwd(res, g):
    x, s = res
    dx = g * s[:, None, None, :]                  # ∂L/∂x = δ ⊙ s
    acc = compute_dtype(g.dtype)                  # ∂L/∂s = Σ_hw δ ⊙ x (float32 for bf16)
    ds = jnp.sum(g.astype(acc) * x.astype(acc), axis=(1, 2))
    return cast_like(dx, x), cast_like(ds, s)


_channel_scale_rule = manual_rule("channel_scale", _forward, _fwd, _bwd, num_args=2,
                                  num_static=0)


@layer(_channel_scale_rule)
def channel_scale(rule, x: jax.Array, s: jax.Array) -> jax.Array:
    """``y = x ⊙ s`` with a per-example, per-channel scale: squeeze-and-excitation's product.

    Args:
      x: shape ``(N, H, W, C)``, floating point.
      s: shape ``(N, C)``, the same dtype, broadcast over ``H`` and ``W``.

    Returns:
      ``y`` of shape ``(N, H, W, C)``.

    Backward ``∂L/∂x = δ ⊙ s``, ``∂L/∂s = Σ_{h,w} δ ⊙ x``. Residuals: ``x`` and ``s``.
    """
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_array("s", s)
    n, _, _, c = x.shape
    if tuple(s.shape) != (n, c):
        raise ValueError(f"s: expected shape ({n}, {c}) (N, C: one scale per example and "
                         f"channel of x, shape {tuple(x.shape)}), got {tuple(s.shape)}")
    if s.dtype != x.dtype:
        raise TypeError(f"s: dtype {s.dtype} differs from x dtype {x.dtype}")
    return rule(x, s)

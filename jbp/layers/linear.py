"""Fully connected layer and flatten, with hand-written backwards.

Equations (EQUATIONS.md, "Fully connected"), ``z = a W + b`` with ``a: (N, in)``,
``W: (in, out)``, ``δ = ∂L/∂z``::

    ∂L/∂W = aᵀ δ          (a sum over the batch of outer products a_n ⊗ δ_n)
    ∂L/∂b = Σ_n δ_n
    ∂L/∂a = δ Wᵀ
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks
from jbp._registry import layer
from jbp._rule import cast_like, manual_rule


def _dense_forward(x, w, b, _cfg=None):
    z = x @ w
    return z if b is None else z + b


def _dense_fwd(x, w, b, cfg):
    # Residuals: a and W, (N·in + in·out) · itemsize bytes (b only for None-ness/dtype).
    return _dense_forward(x, w, b), (x, w, b)


def _dense_bwd(_cfg, res, g):
    x, w, b = res
    dx = g @ w.T                     # ∂L/∂a = δ Wᵀ
    dw = x.T @ g                     # ∂L/∂W = aᵀ δ
    db = None if b is None else jnp.sum(g, axis=0)   # ∂L/∂b = Σ_n δ_n
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


_dense_rule = manual_rule("dense", _dense_forward, _dense_fwd, _dense_bwd, num_args=4)


def _check_dense(x, w, b):
    _checks.require_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected shape (..., in) with at least one axis, got a scalar")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 2, "(in, out)")
    if w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w: expected shape ({x.shape[-1]}, out) to match x features in={x.shape[-1]} "
            f"(x.shape={tuple(x.shape)}), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    if b is not None:
        _checks.require_array("b", b)
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"b: expected shape ({w.shape[1]},) (out), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"b: dtype {b.dtype} differs from x dtype {x.dtype}")


@layer(_dense_rule)
def dense(rule, x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None) -> jax.Array:
    """Fully connected layer ``z = a W + b``.

    Args:
      x: ``a``, shape ``(..., in)``: any leading axes (PyTorch's ``F.linear``), which the
        rule sees flattened into one batch axis N; images: flatten them with
        :func:`jbp.flatten` first.
      w: ``W``, shape ``(in, out)`` (PyTorch's weight transposed).
      b: optional bias, shape ``(out,)``.

    Returns:
      ``z``, shape ``(..., out)``.

    Backward (``jbp.layers.linear``): ``∂L/∂W = aᵀ δ``, ``∂L/∂b = Σ_n δ_n``, ``∂L/∂a = δ Wᵀ``.
    Residuals: ``a``, ``W`` and ``b`` (``(N·in + in·out + out) · itemsize`` bytes).
    """
    _check_dense(x, w, b)
    if x.ndim == 2:
        return rule(x, w, b, None)
    z = rule(x.reshape(-1, x.shape[-1]), w, b, None)     # N = the product of leading axes
    return z.reshape(*x.shape[:-1], w.shape[1])


# --- flatten ---------------------------------------------------------------------------------

def _flatten_forward(x, _shape=None):
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))     # not -1: N may be 0


def _flatten_fwd(x, shape):
    return _flatten_forward(x), None          # no residuals: the shape is static config


def _flatten_bwd(shape, _res, g):
    return (g.reshape(shape),)                # ∂L/∂a = δ reshaped back to a's shape


_flatten_rule = manual_rule("flatten", _flatten_forward, _flatten_fwd, _flatten_bwd, num_args=2)


@layer(_flatten_rule)
def flatten(rule, x: jax.Array) -> jax.Array:
    """Flatten every axis but the first: ``(N, d1, d2, ...) -> (N, d1·d2·...)``.

    NHWC order is kept (row-major), so an NHWC image flattens H, then W, then C.
    Backward: ``δ`` reshaped to the input shape. Residuals: none (0 bytes).
    """
    _checks.require_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected at least a batch axis, got a scalar")
    return rule(x, tuple(x.shape))

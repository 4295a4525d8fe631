"""Sigmoid binary cross-entropy with hand-written backwards: the default rule (a mean over
elements) and the weighted rule (PyTorch's ``weight``, ``pos_weight`` and ``reduction``).

Equations (EQUATIONS.md, "Loss"), ``softplus(x) = log(1 + e^x)``, ``size`` the element count::

    default   L = mean(softplus(z) − z y),   δ = (σ(z) − y)/size,   ∂L/∂y = −z/size
    weighted  l = (1 − y) z + (1 + (p − 1) y) softplus(−z),   p the positive weight
              δ = c ((1 − y) − (1 + (p − 1) y) σ(−z)),   ∂L/∂y = c (−z + (p − 1) softplus(−z))

with ``c = ∂L/∂l`` of the reduction (``jbp.losses._reduction``). Both rules compute softplus
with :func:`_softplus`, which neither overflows nor loses ``log1p``'s precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbp import _checks
from jbp._registry import layer
from jbp._rule import compute_dtype, manual_rule
from jbp.losses import _reduction


def _softplus(x):
    """``log(1 + e^x) = max(x, 0) + log(1 + e^{−|x|})``: no overflow for any ``x``."""
    return jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _promoted(z, y):
    return z.astype(compute_dtype(z.dtype)), y.astype(compute_dtype(z.dtype))


# --- the default: a mean over elements --------------------------------------------------------

def _bce_forward(z, y):
    zc, yc = _promoted(z, y)
    return jnp.mean(_softplus(zc) - zc * yc).astype(z.dtype)


def _bce_fwd(z, y):
    return _bce_forward(z, y), (z, y)             # residuals: z and y (2·size values)


def _bce_bwd(res, g):
    zc, yc = _promoted(*res)
    scale = g.astype(zc.dtype) / zc.size
    dz = (lax.logistic(zc) - yc) * scale          # δ = (σ(z) − y)/size
    dy = -zc * scale                              # ∂L/∂y = −z/size
    return dz.astype(g.dtype), dy.astype(g.dtype)


_bce_rule = manual_rule("sigmoid_binary_cross_entropy", _bce_forward, _bce_fwd, _bce_bwd,
                        num_args=2, num_static=0)


# --- weighted: pos_weight p, element weights w, any reduction ---------------------------------

def _weighted_per(z, y, p):
    zc, yc = _promoted(z, y)
    return (1 - yc) * zc + (1 + (p - 1) * yc) * _softplus(-zc), zc, yc


def _weighted_forward(z, y, p, w, reduction):
    per, _, _ = _weighted_per(z, y, p)
    return _reduction.reduce(per, w, reduction, weighted_mean=False).astype(z.dtype)


def _weighted_fwd(z, y, p, w, reduction):
    # Residuals: z, y, and the broadcast weights p and w (4·size values).
    return _weighted_forward(z, y, p, w, reduction), (z, y, p, w)


def _weighted_bwd(reduction, res, g):
    z, y, p, w = res
    _, zc, yc = _weighted_per(z, y, p)
    c = _reduction.loss_cotangent(g, w, reduction, False, z.size)
    dz = c * ((1 - yc) - (1 + (p - 1) * yc) * lax.logistic(-zc))
    dy = c * (-zc + (p - 1) * _softplus(-zc))
    return dz.astype(g.dtype), dy.astype(g.dtype), jnp.zeros_like(p), jnp.zeros_like(w)


_weighted_rule = manual_rule("sigmoid_binary_cross_entropy", _weighted_forward, _weighted_fwd,
                             _weighted_bwd, num_args=5)


@layer(_bce_rule, _weighted_rule)
def sigmoid_binary_cross_entropy(rule, weighted_rule, logits: jax.Array, targets: jax.Array, *,
                                 weight=None, pos_weight=None,
                                 reduction: str = "mean") -> jax.Array:
    """Binary cross-entropy of ``σ(z)`` against targets in ``[0, 1]``, mean over elements.

    Args:
      logits: ``z``, any shape ``(N, ...)``.
      targets: ``y``, same shape, floating point (soft targets allowed).
      weight: optional element weights, broadcastable to ``z``'s shape (PyTorch's
        ``weight``); the mean still divides by the element count, as PyTorch.
      pos_weight: optional weight ``p`` of the positive term, broadcastable (per class:
        shape ``(C,)`` for ``z`` of shape ``(N, C)``):
        ``l = −[p y log σ(z) + (1 − y) log(1 − σ(z))]``.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (elementwise), as PyTorch.

    Returns:
      scalar ``mean(softplus(z) − z y)``, stable for ``|z|`` up to ±1e4 and beyond.

    Backward ``δ = (σ(z) − y)/size``, ``∂L/∂y = −z/size``.
    Residuals: ``z`` and ``y`` (``2 · size · itemsize`` bytes).
    """
    _reduction.check_pair("logits", logits, "targets", targets)
    _reduction.check_reduction(reduction)
    if weight is None and pos_weight is None and reduction == "mean":
        return rule(logits, targets.astype(logits.dtype))
    dtype = compute_dtype(logits.dtype)
    extra = []
    for name, value in (("pos_weight", pos_weight), ("weight", weight)):
        value = jnp.ones((), dtype) if value is None else value
        _checks.require_float(name, value)
        try:
            extra.append(jnp.broadcast_to(value.astype(dtype), logits.shape))
        except ValueError:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not broadcast to the "
                             f"logits' {tuple(logits.shape)}") from None
    return weighted_rule(logits, targets.astype(logits.dtype), *extra, reduction)

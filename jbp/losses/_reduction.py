"""The reductions of PyTorch's loss options, their cotangents, and the checks every loss shares.

Per example (cross-entropy) or element (BCE, MSE) a loss ``l`` and a weight ``w``; the reduction
and ``c = ∂L/∂l`` (``g`` the incoming cotangent)::

    reduction="none":  L_n = w_n l_n                   c_n = g_n w_n
    reduction="sum":   L = Σ_n w_n l_n                 c_n = g w_n
    reduction="mean":  L = Σ_n w_n l_n / Σ_n w_n       c_n = g w_n / Σ_m w_m    (cross-entropy:
                       PyTorch's weighted mean; an all-ignored batch gives 0/0 = NaN as there)
                       L = Σ_n w_n l_n / size                                   (BCE, MSE)

The weights are constants: they receive a zero gradient.
"""

from __future__ import annotations

import jax.numpy as jnp

from jbp import _checks

REDUCTIONS = ("mean", "sum", "none")


def reduce(per, w, reduction, weighted_mean):
    """``L`` from the per-example (per-element) losses ``per`` and weights ``w``."""
    total = per * w
    if reduction == "none":
        return total
    if reduction == "sum":
        return jnp.sum(total)
    return jnp.sum(total) / (jnp.sum(w) if weighted_mean else per.size)


def loss_cotangent(g, w, reduction, weighted_mean, size):
    """c = ∂L/∂l for every example or element."""
    g = g.astype(w.dtype)
    if reduction != "mean":                      # "none": g_n w_n; "sum": g w_n
        return g * w
    return g * w / (jnp.sum(w) if weighted_mean else size)


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def check_batch(name, x):
    if x.shape and x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(x.shape)}); a mean over zero "
                         f"examples is undefined")


def check_pair(pred_name, pred, target_name, target):
    """Two float arrays of one shape, a non-empty batch."""
    _checks.require_float(pred_name, pred)
    _checks.require_float(target_name, target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{target_name}: expected the shape of {pred_name} "
                         f"{tuple(pred.shape)}, got {tuple(target.shape)}")
    check_batch(pred_name, pred)

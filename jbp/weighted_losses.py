"""PyTorch's loss options with hand-written backwards: reductions, class and element weights,
ignored labels, BCE's positive weight. ``jbp.losses`` calls these rules when an option is set
(its defaults keep their own rules).

Equations (EQUATIONS.md, "Loss"). Per example (cross-entropy) or element (BCE, MSE) a loss ``l``
and a weight ``w``; the reduction and ``c = ∂L/∂l`` (``g`` the incoming cotangent)::

    reduction="none":  L_n = w_n l_n                   c_n = g_n w_n
    reduction="sum":   L = Σ_n w_n l_n                 c_n = g w_n
    reduction="mean":  L = Σ_n w_n l_n / Σ_n w_n       c_n = g w_n / Σ_m w_m    (cross-entropy:
                       PyTorch's weighted mean; an all-ignored batch gives 0/0 = NaN as there)
                       L = Σ_n w_n l_n / size                                   (BCE, MSE)

    cross-entropy  l_n = −Σ_k y_nk log ŷ_nk,   w_n = weight[y_n] · 1[y_n ≠ ignore_index]
                   δ_n = c_n (ŷ_n Σ_k y_nk − y_n),   ∂L/∂y_nk = −c_n log ŷ_nk
    BCE            l = (1 − y) z + (1 + (p − 1) y) softplus(−z),   p the positive weight
                   δ = c ((1 − y) − (1 + (p − 1) y) σ(−z)),   ∂L/∂y = c (−z + (p − 1) softplus(−z))
    MSE            l = (ŷ − y)²,   δ = 2 c (ŷ − y),   ∂L/∂y = −δ

The weights are constants: they receive a zero gradient.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jbp._rule import cast_like, compute_dtype, manual_rule

REDUCTIONS = ("mean", "sum", "none")


def _reduce(per, w, reduction, weighted_mean):
    total = per * w
    if reduction == "none":
        return total
    if reduction == "sum":
        return jnp.sum(total)
    return jnp.sum(total) / (jnp.sum(w) if weighted_mean else per.size)


def _loss_cotangent(g, w, reduction, weighted_mean, size):
    """c = ∂L/∂l for every example or element."""
    g = g.astype(w.dtype)
    if reduction != "mean":                      # "none": g_n w_n; "sum": g w_n
        return g * w
    return g * w / (jnp.sum(w) if weighted_mean else size)


# --- cross-entropy ------------------------------------------------------------------------------

def _ce_parts(z, y):
    zc = z.astype(compute_dtype(z.dtype))
    s = zc - lax.stop_gradient(jnp.max(zc, axis=-1, keepdims=True))
    sum_exp = jnp.sum(jnp.exp(s), axis=-1, keepdims=True)
    per = -jnp.sum(y * (s - jnp.log(sum_exp)), axis=-1)              # l_n, log ŷ by log-sum-exp
    return per, s, sum_exp


def _ce_forward(z, y, w, reduction):
    per, _, _ = _ce_parts(z, y)
    return _reduce(per, w, reduction, weighted_mean=True).astype(z.dtype)


def _ce_fwd(z, y, w, reduction):
    per, s, sum_exp = _ce_parts(z, y)
    # Residuals: s = z − max z, Σ_k e^{s_k}, the targets y and the weights w ((2K + 2)·N values).
    return _reduce(per, w, reduction, weighted_mean=True).astype(z.dtype), (s, sum_exp, y, w)


def _ce_bwd(reduction, res, g):
    s, sum_exp, y, w = res
    c = _loss_cotangent(g, w, reduction, True, s.shape[0])[:, None]           # (N, 1)
    log_p = s - jnp.log(sum_exp)
    dz = c * (jnp.exp(log_p) * jnp.sum(y, axis=-1, keepdims=True) - y)       # c (ŷ Σy − y)
    dy = -c * log_p                                                           # −c log ŷ
    return dz.astype(g.dtype), cast_like(dy, y), jnp.zeros_like(w)


weighted_cross_entropy = manual_rule("softmax_cross_entropy", _ce_forward, _ce_fwd, _ce_bwd,
                                     num_args=4)


# --- sigmoid binary cross-entropy ---------------------------------------------------------------

def _softplus(x):
    return jnp.maximum(x, 0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _bce_per(z, y, p):
    zc, yc = z.astype(compute_dtype(z.dtype)), y.astype(compute_dtype(z.dtype))
    return (1 - yc) * zc + (1 + (p - 1) * yc) * _softplus(-zc), zc, yc


def _bce_forward(z, y, p, w, reduction):
    per, _, _ = _bce_per(z, y, p)
    return _reduce(per, w, reduction, weighted_mean=False).astype(z.dtype)


def _bce_fwd(z, y, p, w, reduction):
    # Residuals: z, y, and the broadcast weights p and w (4·size values).
    return _bce_forward(z, y, p, w, reduction), (z, y, p, w)


def _bce_bwd(reduction, res, g):
    z, y, p, w = res
    _, zc, yc = _bce_per(z, y, p)
    c = _loss_cotangent(g, w, reduction, False, z.size)
    dz = c * ((1 - yc) - (1 + (p - 1) * yc) * lax.logistic(-zc))
    dy = c * (-zc + (p - 1) * _softplus(-zc))
    return dz.astype(g.dtype), dy.astype(g.dtype), jnp.zeros_like(p), jnp.zeros_like(w)


weighted_bce = manual_rule("sigmoid_binary_cross_entropy", _bce_forward, _bce_fwd, _bce_bwd,
                           num_args=5)


# --- mean squared error ---------------------------------------------------------------------------

def _mse_forward(pred, t, reduction):
    diff = pred.astype(compute_dtype(pred.dtype)) - t.astype(compute_dtype(pred.dtype))
    return _reduce(jnp.square(diff), jnp.ones((), diff.dtype), reduction,
                   weighted_mean=False).astype(pred.dtype)


def _mse_fwd(pred, t, reduction):
    diff = pred.astype(compute_dtype(pred.dtype)) - t.astype(compute_dtype(pred.dtype))
    return _mse_forward(pred, t, reduction), diff          # residual: ŷ − y (size values)


def _mse_bwd(reduction, diff, g):
    c = _loss_cotangent(g, jnp.ones((), diff.dtype), reduction, False, diff.size)
    d_pred = (2.0 * diff * c).astype(g.dtype)                                # 2 c (ŷ − y)
    return d_pred, -d_pred


reduced_mse = manual_rule("mse", _mse_forward, _mse_fwd, _mse_bwd, num_args=3)

"""Softmax cross-entropy with hand-written backwards: the default rule (a mean over the batch)
and the weighted rule (PyTorch's class ``weight``, ``ignore_index`` and ``reduction``).

Equations (EQUATIONS.md, "Loss"), ``N`` examples, ``K`` classes, targets ``y`` (one-hot, soft or
smoothed), ``g`` the incoming cotangent. Logits may carry extra axes before the classes, ``(N, H,
W, K)`` with labels ``(N, H, W)`` (per-pixel, a segmentation's loss, as ``F.cross_entropy`` over
``(N, K, H, W)``): every pixel is then an example and ``N`` below counts them all, ``N·H·W``::

    default   L = −(1/N) Σ_n Σ_k y_nk log ŷ_nk,   ŷ = softmax(z)
              δ = ∂L/∂z = (ŷ Σ_k y_k − y) / N   = (ŷ − y)/N for labels summing to 1
              ∂L/∂y = −log ŷ / N                (soft labels are differentiable)
    weighted  l_n = −Σ_k y_nk log ŷ_nk,   w_n = weight[y_n] · 1[y_n ≠ ignore_index]
              δ_n = c_n (ŷ_n Σ_k y_nk − y_n),   ∂L/∂y_nk = −c_n log ŷ_nk

with ``c = ∂L/∂l`` of the reduction (``jbp.losses._reduction``). Both rules take ``log ŷ`` from
one log-sum-exp (:func:`_log_sum_exp`), never as ``log(softmax)``: logits of ±1e4 give finite
losses and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import _checks
from jbp._registry import layer
from jbp._rule import cast_like, compute_dtype, manual_rule
from jbp.losses import _reduction


def _log_sum_exp(z):
    """``s = z − max z`` and ``Σ_k e^{s_k}`` along the classes, in the compute dtype:
    ``log ŷ = s − log Σ_k e^{s_k}``. The max carries no gradient (softmax is shift-invariant)."""
    zc = z.astype(compute_dtype(z.dtype))
    s = zc - lax.stop_gradient(jnp.max(zc, axis=-1, keepdims=True))
    return s, jnp.sum(jnp.exp(s), axis=-1, keepdims=True)


# --- the default: a mean over the batch ---------------------------------------------------------

def _examples(z) -> int:
    """N: the rows of logits (N, K), the pixels of logits (N, H, W, K)."""
    return z.size // z.shape[-1]


def _ce_parts(z, y):
    """Loss, shifted logits s and Σ_k e^{s_k}: what the backward needs."""
    s, sum_exp = _log_sum_exp(z)
    log_p = s - jnp.log(sum_exp)
    return (-jnp.sum(y * log_p) / _examples(z)).astype(z.dtype), s, sum_exp


def _ce_forward(z, y):
    return _ce_parts(z, y)[0]


def _ce_fwd(z, y):
    loss, s, sum_exp = _ce_parts(z, y)
    # Residuals: s = z − max z, Σ_k e^{s_k} and the targets y ((2K + 1)·N values).
    return loss, (s, sum_exp, y)


def _ce_bwd(res, g):
    s, sum_exp, y = res
    # δ = (ŷ Σ_k y_k − y) / N  (= (ŷ − y)/N for labels summing to 1), with ŷ = e^{s} / Σ e^{s}:
    # finite for any logits. Written as  −y/N + ŷ · Σ_k y_k/N,  in the order JAX differentiates
    # the forward, so that manual and autodiff training runs stay bit-for-bit together.
    d_log_p = y * -(g.astype(s.dtype) / _examples(s))            # ∂L/∂log ŷ = −y/N
    d_lse = jnp.sum(-d_log_p, axis=-1, keepdims=True)            # Σ_k y_k / N
    dz = d_log_p + jnp.exp(s) * (d_lse / sum_exp)
    dy = (s - jnp.log(sum_exp)) * -(g.astype(s.dtype) / _examples(s))   # ∂L/∂y = −log ŷ / N
    return dz.astype(g.dtype), cast_like(dy, y)


_ce_rule = manual_rule("softmax_cross_entropy", _ce_forward, _ce_fwd, _ce_bwd, num_args=2,
                       num_static=0)


# --- weighted: per-example weights, any reduction -------------------------------------------------

def _weighted_parts(z, y):
    s, sum_exp = _log_sum_exp(z)
    per = -jnp.sum(y * (s - jnp.log(sum_exp)), axis=-1)              # l_n
    return per, s, sum_exp


def _weighted_forward(z, y, w, reduction):
    per, _, _ = _weighted_parts(z, y)
    return _reduction.reduce(per, w, reduction, weighted_mean=True).astype(z.dtype)


def _weighted_fwd(z, y, w, reduction):
    per, s, sum_exp = _weighted_parts(z, y)
    # Residuals: s = z − max z, Σ_k e^{s_k}, the targets y and the weights w ((2K + 2)·N values).
    loss = _reduction.reduce(per, w, reduction, weighted_mean=True).astype(z.dtype)
    return loss, (s, sum_exp, y, w)


def _weighted_bwd(reduction, res, g):
    s, sum_exp, y, w = res
    c = _reduction.loss_cotangent(g, w, reduction, True, _examples(s))[..., None]   # (N, 1)
    log_p = s - jnp.log(sum_exp)
    dz = c * (jnp.exp(log_p) * jnp.sum(y, axis=-1, keepdims=True) - y)       # c (ŷ Σy − y)
    dy = -c * log_p                                                           # −c log ŷ
    return dz.astype(g.dtype), cast_like(dy, y), jnp.zeros_like(w)


_weighted_rule = manual_rule("softmax_cross_entropy", _weighted_forward, _weighted_fwd,
                             _weighted_bwd, num_args=4)


# --- targets, weights and labels outside [0, K) ---------------------------------------------------

def _targets(logits, labels, label_smoothing):
    """Dense targets (N, K) from integer labels (N,) or soft labels (N, K), smoothed, and for
    integer labels which of them lie in [0, K) (None for soft labels); (N, H, W, K) and (N, H, W)
    likewise."""
    valid = None
    lead, k = tuple(logits.shape[:-1]), logits.shape[-1]
    _checks.require_array("labels", labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if tuple(labels.shape) != lead and len(lead) == 1:
            raise ValueError(f"labels: integer labels must have shape {lead} (one class per "
                             f"example), got {tuple(labels.shape)}")
        if tuple(labels.shape) != lead:
            raise ValueError(f"labels: integer labels for logits of shape "
                             f"{tuple(logits.shape)} must have shape {lead} (one class per "
                             f"pixel: the logits' shape without the class axis), got "
                             f"{tuple(labels.shape)}")
        if not isinstance(labels, jax.core.Tracer) and labels.size:
            concrete = np.asarray(labels)         # numpy, so nothing is staged under jax.jit
            low, high = int(concrete.min()), int(concrete.max())
            if low < 0 or high >= k:
                raise ValueError(f"labels: class indices must lie in [0, {k}) for logits with "
                                 f"K={k} classes, found {low if low < 0 else high}")
        y = jax.nn.one_hot(labels, k, dtype=compute_dtype(logits.dtype))
        valid = (labels >= 0) & (labels < k)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != tuple(logits.shape):
            raise ValueError(f"labels: one-hot/soft labels must have the logits' shape "
                             f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
        y = labels.astype(compute_dtype(logits.dtype))
    else:
        raise TypeError(f"labels: expected integer class indices or float probabilities, got "
                        f"dtype {labels.dtype}")
    if label_smoothing:
        y = (1.0 - label_smoothing) * y + label_smoothing / k
    return y, valid


def _poison_invalid_rows(logits, valid):
    """``z + 0`` for examples with a valid label, ``z + NaN`` for the others.

    Under ``jax.jit`` the labels are not known at trace time. An out-of-range label would give a
    target row of zeros (no class): loss 0 and a zero gradient for that example, silently. Its
    logits become NaN instead, so that example's δ row (and through it every parameter's
    gradient) is NaN; the caller adds NaN to the loss too (XLA turns ``one_hot · log ŷ`` into a
    select, which would drop the NaN row's term). A finite check then stops (jbp.train's step).
    Adding 0 leaves valid rows' values bit for bit as they were (docs/precision.md, "Labels
    under jit"; tests/test_labels_jit.py).
    """
    return logits + jnp.where(valid, 0.0, jnp.nan).astype(logits.dtype)[..., None]


def _example_weights(logits, labels, weight, ignore_index):
    """Labels with ``ignore_index`` replaced by class 0, and w_n = weight[y_n]·1[y_n ≠ ignore]."""
    k = logits.shape[-1]
    dtype = compute_dtype(logits.dtype)
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise TypeError("labels: weight and ignore_index take integer class labels (N,); "
                        "PyTorch's class weights for probability targets are not supported")
    w = jnp.ones(labels.shape, dtype)
    if ignore_index is not None:
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        kept = labels != ignore_index
        labels = jnp.where(kept, labels, 0)
        w = w * kept.astype(dtype)
    if weight is not None:
        _checks.require_float("weight", weight)
        if tuple(weight.shape) != (k,):
            raise ValueError(f"weight: expected one weight per class, shape ({k},), got "
                             f"{tuple(weight.shape)}")
        w = w * jnp.take(weight.astype(dtype), jnp.clip(labels, 0, k - 1))
    return labels, w


@layer(_ce_rule, _weighted_rule)
def softmax_cross_entropy(rule, weighted_rule, logits: jax.Array, labels: jax.Array, *,
                          label_smoothing: float = 0.0, weight=None, ignore_index=None,
                          reduction: str = "mean") -> jax.Array:
    """Softmax cross-entropy from logits, mean over the batch (over every pixel for per-pixel
    logits).

    Args:
      logits: ``z``, shape ``(N, K)``, or per pixel ``(N, H, W, K)`` (any extra axes before
        the classes: each position is an example, as ``F.cross_entropy`` over
        ``(N, K, H, W)``).
      labels: integer classes ``(N,)`` in ``[0, K)`` (``(N, H, W)`` per pixel), or
        one-hot/soft labels of the logits' shape.
      label_smoothing: ``ε`` in ``[0, 1)``; targets become ``(1 − ε) y + ε / K``.
      weight: optional class weights ``(K,)`` (integer labels, no smoothing): example n
        weighs ``weight[y_n]``, and the mean is PyTorch's weighted mean
        ``Σ w_n l_n / Σ w_n``.
      ignore_index: optional int label whose examples (pixels) weigh 0: no loss, no gradient,
        not counted in the mean, as PyTorch's. No label is ignored by default (PyTorch ignores
        -100 by default; jbp makes NaN of it, as of any label outside ``[0, K)``): pass
        ``ignore_index=-100`` for PyTorch's convention, ``255`` for VOC's void pixels.
      reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example ``w_n l_n``, shape
        ``(N,)``, ``(N, H, W)`` per pixel), as PyTorch.

    Returns:
      scalar ``L = −(1/N) Σ_n Σ_k y_nk log ŷ_nk`` (by default), dtype of ``logits``.

    Backward ``δ = (ŷ − y)/N`` (``(ŷ Σ_k y_k − y)/N`` for unnormalised soft labels) and
    ``∂L/∂y = −log ŷ / N``, from log-sum-exp: finite for logits of ±1e4.
    Residuals: ``s = z − max z``, ``Σ_k e^{s_k}`` and ``y``: ``(2K + 1)·N · 4`` bytes in
    float32 (half precision is kept as float32).

    Integer labels must lie in ``[0, K)``. Concrete labels are checked (``ValueError``).
    Inside ``jax.jit`` (traced labels) no exception is possible: the logits row of an
    out-of-range label is made NaN, so the loss and the gradient (its row ``δ_n``, and
    through it every parameter's) are NaN rather than a silent zero, and a non-finite
    check stops:
    :func:`jbp.train.make_train_step` skips the update and reports it, and
    :func:`jbp.train.evaluate` raises.
    """
    _checks.require_array("logits", logits)
    if logits.ndim < 2:
        _checks.require_rank("logits", logits, 2, "(N, K) or per pixel (N, H, W, K)")
    _checks.require_float("logits", logits)
    _reduction.check_batch("logits", logits)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing: expected a float in [0, 1), got "
                         f"{label_smoothing!r}")
    _reduction.check_reduction(reduction)
    if weight is None and ignore_index is None and reduction == "mean":
        y, valid = _targets(logits, labels, float(label_smoothing))
        if valid is None:
            return rule(logits, y)
        loss = rule(_poison_invalid_rows(logits, valid), y)
        return loss + jnp.where(jnp.all(valid), 0.0, jnp.nan).astype(loss.dtype)
    w = jnp.ones(logits.shape[:-1], compute_dtype(logits.dtype))
    if weight is not None or ignore_index is not None:
        if label_smoothing:
            raise ValueError("label_smoothing: not supported together with weight or "
                             "ignore_index (PyTorch weighs the smoothing term per class)")
        labels, w = _example_weights(logits, labels, weight, ignore_index)
    y, valid = _targets(logits, labels, float(label_smoothing))
    if valid is None:
        return weighted_rule(logits, y, w, reduction)
    loss = weighted_rule(_poison_invalid_rows(logits, valid), y, w, reduction)
    poison = valid if reduction == "none" else jnp.all(valid)
    return loss + jnp.where(poison, 0.0, jnp.nan).astype(loss.dtype)

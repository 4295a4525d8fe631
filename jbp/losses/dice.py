"""Soft Dice loss over per-pixel logits (multi-class, smoothing ε) with a hand-written backward.

Equations (EQUATIONS.md, "Loss: soft Dice"), ``p = softmax(z)`` over the ``K`` classes of every
pixel ``m``, ``y`` the one-hot labels, ``μ_m`` 0 for an ignored pixel and 1 otherwise, sums over
all pixels of the batch (``m`` runs over N·H·W)::

    I_k = Σ_m μ_m p_mk y_mk,    U_k = Σ_m μ_m (p_mk + y_mk) + ε,    D_k = (2 I_k + ε) / U_k
    L   = 1 − (1/K) Σ_k D_k
    ∂L/∂p_mk = −(g/K) μ_m (2 y_mk − D_k) / U_k
    δ_m = ∂L/∂z_m = p_m ⊙ (∂L/∂p_m − Σ_k p_mk ∂L/∂p_mk)            (softmax's backward)

``ε`` keeps a class absent from both prediction and labels at ``D_k = 1`` (it has nothing to
get wrong) and the quotient finite. This is the multi-class soft Dice of Milletari et al. (2016,
V-Net) with the squares dropped (segmentation_models_pytorch's ``DiceLoss`` without its
per-class "absent from the batch" mask): a mean over all ``K`` classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks
from jbp._registry import layer
from jbp._rule import compute_dtype, manual_rule


def _dice_parts(z, y, mask, smooth):
    """p, U, D: the softmax, the denominators and the per-class scores (K,)."""
    zc = z.astype(compute_dtype(z.dtype))
    p = jax.nn.softmax(zc, axis=-1)
    axes = tuple(range(z.ndim - 1))
    m = mask[..., None]
    intersection = jnp.sum(m * p * y, axis=axes)                     # I_k
    union = jnp.sum(m * (p + y), axis=axes) + smooth                 # U_k
    score = (2.0 * intersection + smooth) / union                    # D_k
    return p, union, score


def _dice_forward(z, y, mask, smooth):
    _, _, score = _dice_parts(z, y, mask, smooth)
    return (1.0 - jnp.mean(score)).astype(z.dtype)


def _dice_fwd(z, y, mask, smooth):
    p, union, score = _dice_parts(z, y, mask, smooth)
    # Residuals: p (N·H·W·K), the one-hot y (N·H·W·K), the pixel mask, U and D (K each).
    return (1.0 - jnp.mean(score)).astype(z.dtype), (p, y, mask, union, score)


def _dice_bwd(smooth, res, g):
    p, y, mask, union, score = res
    k = p.shape[-1]
    # ∂L/∂p_mk = −(g/K) μ_m (2 y_mk − D_k) / U_k
    d_p = -(g.astype(p.dtype) / k) * mask[..., None] * (2.0 * y - score) / union
    # δ = p ⊙ (∂L/∂p − Σ_k p_k ∂L/∂p_k)
    dz = p * (d_p - jnp.sum(p * d_p, axis=-1, keepdims=True))
    return dz.astype(g.dtype), jnp.zeros_like(y), jnp.zeros_like(mask)


_dice_rule = manual_rule("dice_loss", _dice_forward, _dice_fwd, _dice_bwd, num_args=4)


@layer(_dice_rule)
def dice_loss(rule, logits: jax.Array, labels: jax.Array, *, smooth: float = 1.0,
              ignore_index=None) -> jax.Array:
    """Soft Dice loss ``1 − (1/K) Σ_k (2 I_k + ε) / (Σ p_k + Σ y_k + ε)`` from per-pixel logits.

    Args:
      logits: ``z``, shape ``(N, H, W, K)`` (or ``(N, K)``: any axes before the classes).
      labels: integer classes of the logits' shape without the class axis, ``(N, H, W)``.
      smooth: ``ε >= 0``, added to numerator and denominator of every class.
      ignore_index: optional int label whose pixels count in no sum (no loss, no gradient).

    Returns:
      scalar ``L`` in ``[0, 1]``, dtype of ``logits``.

    Backward: ``∂L/∂p_mk = −(1/K)(2 y_mk − D_k)/U_k`` through softmax's backward
    (``jbp.losses.dice``). Residuals: ``p`` and the one-hot ``y`` (``2·N·H·W·K`` values),
    the pixel mask, ``U`` and ``D``.

    A label outside ``[0, K)`` that is not ``ignore_index`` raises when the labels are concrete;
    under ``jax.jit`` the loss is NaN instead (as :func:`softmax_cross_entropy`'s).
    """
    _checks.require_array("logits", logits)
    if logits.ndim < 2:
        _checks.require_rank("logits", logits, 2, "(N, H, W, K)")
    _checks.require_float("logits", logits)
    _checks.require_array("labels", labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels: expected integer class indices, got dtype {labels.dtype}")
    k = logits.shape[-1]
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"labels: integer labels for logits of shape {tuple(logits.shape)} "
                         f"must have shape {tuple(logits.shape[:-1])} (one class per pixel: "
                         f"the logits' shape without the class axis), got "
                         f"{tuple(labels.shape)}")
    if logits.size == 0:
        raise ValueError(f"logits: the batch is empty (shape {tuple(logits.shape)})")
    if not isinstance(smooth, (int, float)) or isinstance(smooth, bool) or smooth < 0:
        raise ValueError(f"smooth: expected a number >= 0, got {smooth!r}")
    if ignore_index is not None and (not isinstance(ignore_index, int)
                                     or isinstance(ignore_index, bool)):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    kept = jnp.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    valid = ((labels >= 0) & (labels < k)) | ~kept
    if not isinstance(labels, jax.core.Tracer) and labels.size:
        bad = np.asarray(labels)[~np.asarray(valid)]
        if bad.size:
            raise ValueError(f"labels: class indices must lie in [0, {k}) for logits with "
                             f"K={k} classes, found {int(bad[0])}")
    dtype = compute_dtype(logits.dtype)
    y = jax.nn.one_hot(jnp.where(kept, labels, 0), k, dtype=dtype)
    # Under jit: an invalid pixel's logits become NaN, so the loss and every gradient are NaN
    # (adding 0 leaves the valid pixels' logits bit for bit; cross_entropy's _poison_invalid_rows)
    poisoned = logits + jnp.where(valid, 0.0, jnp.nan).astype(logits.dtype)[..., None]
    loss = rule(poisoned, y, kept.astype(dtype), float(smooth))
    return loss + jnp.where(jnp.all(valid), 0.0, jnp.nan).astype(loss.dtype)

"""Losses with hand-written backwards: where the backward pass starts.

Equations (EQUATIONS.md, "Loss"), for a batch of ``N`` examples, ``g`` the incoming cotangent of
the scalar loss (1 under ``jax.grad``)::

    softmax cross-entropy:  L = −(1/N) Σ_n Σ_k y_nk log ŷ_nk,   ŷ = softmax(z)
                            δ = ∂L/∂z = (ŷ Σ_k y_k − y) / N   = (ŷ − y)/N for labels summing to 1
                            ∂L/∂y = −log ŷ / N               (soft labels are differentiable)
    MSE:                    L = mean((ŷ − y)²),   δ = 2(ŷ − y)/size,   ∂L/∂y = −δ
    sigmoid + BCE:          L = mean(softplus(z) − z y),   δ = (σ(z) − y)/size,   ∂L/∂y = −z/size

``log ŷ`` is computed from the logits by log-sum-exp, never as ``log(softmax)``, so logits of
±1e4 give finite losses and gradients. By default all losses are means, returned as scalars of
the input dtype (half precision is accumulated in float32); PyTorch's options (``reduction``,
class ``weight``, ``ignore_index``, ``pos_weight``, element weights) are rules of their own in
``jbp.weighted_losses``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import _checks
from jbp import weighted_losses as _weighted
from jbp._rule import cast_like, compute_dtype, manual_rule


def _log_softmax(z):
    s = z - lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return s - jnp.log(jnp.sum(jnp.exp(s), axis=-1, keepdims=True))


# --- softmax cross-entropy --------------------------------------------------------------------

def _ce_parts(z, y):
    """Loss, shifted logits s = z − max z and Σ_k e^{s_k}: what the backward needs."""
    zc = z.astype(compute_dtype(z.dtype))
    s = zc - lax.stop_gradient(jnp.max(zc, axis=-1, keepdims=True))
    sum_exp = jnp.sum(jnp.exp(s), axis=-1, keepdims=True)
    log_p = s - jnp.log(sum_exp)                                  # log ŷ by log-sum-exp
    return (-jnp.sum(y * log_p) / z.shape[0]).astype(z.dtype), s, sum_exp


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
    d_log_p = y * -(g.astype(s.dtype) / s.shape[0])              # ∂L/∂log ŷ = −y/N
    d_lse = jnp.sum(-d_log_p, axis=-1, keepdims=True)            # Σ_k y_k / N
    dz = d_log_p + jnp.exp(s) * (d_lse / sum_exp)
    dy = (s - jnp.log(sum_exp)) * -(g.astype(s.dtype) / s.shape[0])   # ∂L/∂y = −log ŷ / N
    return dz.astype(g.dtype), cast_like(dy, y)


_ce_rule = manual_rule("softmax_cross_entropy", _ce_forward, _ce_fwd, _ce_bwd, num_args=2,
                       num_static=0)


def _targets(logits, labels, label_smoothing):
    """Dense targets (N, K) from integer labels (N,) or soft labels (N, K), smoothed, and for
    integer labels which of them lie in [0, K) (None for soft labels)."""
    valid = None
    n, k = logits.shape
    _checks.require_array("labels", labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels: integer labels must have shape ({n},) (one class per "
                             f"example), got {tuple(labels.shape)}")
        if not isinstance(labels, jax.core.Tracer) and labels.size:
            concrete = np.asarray(labels)         # numpy, so nothing is staged under jax.jit
            low, high = int(concrete.min()), int(concrete.max())
            if low < 0 or high >= k:
                raise ValueError(f"labels: class indices must lie in [0, {k}) for logits with "
                                 f"K={k} classes, found {low if low < 0 else high}")
        y = jax.nn.one_hot(labels, k, dtype=compute_dtype(logits.dtype))
        valid = (labels >= 0) & (labels < k)
    elif jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != (n, k):
            raise ValueError(f"labels: one-hot/soft labels must have the logits' shape ({n}, {k}),"
                             f" got {tuple(labels.shape)}")
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
    Adding 0 leaves
    valid rows' values as they were; NaN in the targets instead (the first version) changed how
    XLA fused the backward and moved LeNet-5's gradients by an ulp, this does not
    (tests/test_labels_jit.py).
    """
    return logits + jnp.where(valid, 0.0, jnp.nan).astype(logits.dtype)[:, None]


def _check_reduction(reduction):
    if reduction not in _weighted.REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_weighted.REDUCTIONS}, got {reduction!r}")


def _example_weights(logits, labels, weight, ignore_index):
    """Labels with ``ignore_index`` replaced by class 0, and w_n = weight[y_n]·1[y_n ≠ ignore]."""
    n, k = logits.shape
    dtype = compute_dtype(logits.dtype)
    if not jnp.issubdtype(jnp.asarray(labels).dtype, jnp.integer):
        raise TypeError("labels: weight and ignore_index take integer class labels (N,); "
                        "PyTorch's class weights for probability targets are not supported")
    w = jnp.ones((n,), dtype)
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


def _check_batch(name, x):
    if x.shape and x.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty (shape {tuple(x.shape)}); a mean over zero "
                         f"examples is undefined")


def _softmax_cross_entropy_api(rule):
    def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                              label_smoothing: float = 0.0, weight=None, ignore_index=None,
                              reduction: str = "mean") -> jax.Array:
        """Softmax cross-entropy from logits, mean over the batch.

        Args:
          logits: ``z``, shape ``(N, K)``.
          labels: integer classes ``(N,)`` in ``[0, K)``, or one-hot/soft labels ``(N, K)``.
          label_smoothing: ``ε`` in ``[0, 1)``; targets become ``(1 − ε) y + ε / K``.
          weight: optional class weights ``(K,)`` (integer labels, no smoothing): example n
            weighs ``weight[y_n]``, and the mean is PyTorch's weighted mean
            ``Σ w_n l_n / Σ w_n``.
          ignore_index: optional int label (e.g. PyTorch's -100, a segmentation's void) whose
            examples weigh 0: no loss, no gradient, not counted in the mean.
          reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example ``w_n l_n``, shape
            ``(N,)``), as PyTorch.

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
        _checks.require_rank("logits", logits, 2, "(N, K)")
        _checks.require_float("logits", logits)
        _check_batch("logits", logits)
        if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a float in [0, 1), got "
                             f"{label_smoothing!r}")
        _check_reduction(reduction)
        if weight is None and ignore_index is None and reduction == "mean":
            y, valid = _targets(logits, labels, float(label_smoothing))
            if valid is None:
                return rule(logits, y)
            loss = rule(_poison_invalid_rows(logits, valid), y)
            return loss + jnp.where(jnp.all(valid), 0.0, jnp.nan).astype(loss.dtype)
        w = jnp.ones((logits.shape[0],), compute_dtype(logits.dtype))
        if weight is not None or ignore_index is not None:
            if label_smoothing:
                raise ValueError("label_smoothing: not supported together with weight or "
                                 "ignore_index (PyTorch weighs the smoothing term per class)")
            labels, w = _example_weights(logits, labels, weight, ignore_index)
        y, valid = _targets(logits, labels, float(label_smoothing))
        weighted = _weighted.weighted_cross_entropy if rule is _ce_rule else \
            _weighted.weighted_cross_entropy.forward
        if valid is None:
            return weighted(logits, y, w, reduction)
        loss = weighted(_poison_invalid_rows(logits, valid), y, w, reduction)
        poison = valid if reduction == "none" else jnp.all(valid)
        return loss + jnp.where(poison, 0.0, jnp.nan).astype(loss.dtype)

    return softmax_cross_entropy


softmax_cross_entropy = _softmax_cross_entropy_api(_ce_rule)
autodiff_softmax_cross_entropy = _softmax_cross_entropy_api(_ce_rule.forward)


# --- mean squared error -----------------------------------------------------------------------

def _mse_parts(p, t):
    diff = p.astype(compute_dtype(p.dtype)) - t.astype(compute_dtype(p.dtype))
    return jnp.mean(jnp.square(diff)).astype(p.dtype), diff


def _mse_forward(p, t):
    return _mse_parts(p, t)[0]


def _mse_fwd(p, t):
    loss, diff = _mse_parts(p, t)
    return loss, diff                             # residual: ŷ − y (size values)


def _mse_bwd(diff, g):
    d_pred = (2.0 * diff * (g.astype(diff.dtype) / diff.size)).astype(g.dtype)  # 2(ŷ − y)/size
    return d_pred, -d_pred                                                      # ∂L/∂y = −δ


_mse_rule = manual_rule("mse", _mse_forward, _mse_fwd, _mse_bwd, num_args=2, num_static=0)


def _check_pair(pred_name, pred, target_name, target):
    _checks.require_float(pred_name, pred)
    _checks.require_float(target_name, target)
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"{target_name}: expected the shape of {pred_name} "
                         f"{tuple(pred.shape)}, got {tuple(target.shape)}")
    _check_batch(pred_name, pred)


def _mse_api(rule):
    def mse(pred: jax.Array, target: jax.Array, *, reduction: str = "mean") -> jax.Array:
        """Mean squared error ``mean((ŷ − y)²)`` over every element; shapes must match.
        ``reduction="sum"`` sums, ``"none"`` returns ``(ŷ − y)²`` elementwise (PyTorch's).

        Backward ``δ = 2(ŷ − y)/size``, ``∂L/∂y = −δ``.
        Residuals: ``ŷ − y`` (``size · itemsize`` bytes; float32 for half-precision inputs).
        """
        _check_pair("pred", pred, "target", target)
        _check_reduction(reduction)
        # The target is cast outside the rule: JAX casts its cotangent back to its dtype.
        if reduction == "mean":
            return rule(pred, target.astype(pred.dtype))
        reduced = _weighted.reduced_mse if rule is _mse_rule else _weighted.reduced_mse.forward
        return reduced(pred, target.astype(pred.dtype), reduction)

    return mse


mse = _mse_api(_mse_rule)
autodiff_mse = _mse_api(_mse_rule.forward)


# --- sigmoid binary cross-entropy ----------------------------------------------------------------

def _bce_forward(z, y):
    zc, yc = z.astype(compute_dtype(z.dtype)), y.astype(compute_dtype(z.dtype))
    # softplus(z) − z y, written so that neither exp nor log can overflow:
    # max(z, 0) − z y + log(1 + e^{−|z|}).
    per_element = jnp.maximum(zc, 0) - zc * yc + jnp.log1p(jnp.exp(-jnp.abs(zc)))
    return jnp.mean(per_element).astype(z.dtype)


def _bce_fwd(z, y):
    return _bce_forward(z, y), (z, y)             # residuals: z and y (2·size values)


def _bce_bwd(res, g):
    z, y = res
    zc, yc = z.astype(compute_dtype(z.dtype)), y.astype(compute_dtype(z.dtype))
    scale = g.astype(zc.dtype) / z.size
    dz = (lax.logistic(zc) - yc) * scale          # δ = (σ(z) − y)/size
    dy = -zc * scale                              # ∂L/∂y = −z/size
    return dz.astype(g.dtype), dy.astype(g.dtype)


_bce_rule = manual_rule("sigmoid_binary_cross_entropy", _bce_forward, _bce_fwd, _bce_bwd,
                        num_args=2, num_static=0)


def _bce_api(rule):
    def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array, *, weight=None,
                                     pos_weight=None, reduction: str = "mean") -> jax.Array:
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
        _check_pair("logits", logits, "targets", targets)
        _check_reduction(reduction)
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
        weighted = _weighted.weighted_bce if rule is _bce_rule else _weighted.weighted_bce.forward
        return weighted(logits, targets.astype(logits.dtype), *extra, reduction)

    return sigmoid_binary_cross_entropy


sigmoid_binary_cross_entropy = _bce_api(_bce_rule)
autodiff_sigmoid_binary_cross_entropy = _bce_api(_bce_rule.forward)

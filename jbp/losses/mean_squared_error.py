"""Mean squared error with hand-written backwards: the default rule (a mean over elements) and
the reduced rule (PyTorch's ``reduction="sum"`` / ``"none"``).

Equations (EQUATIONS.md, "Loss"), ``size`` the element count::

    default   L = mean((ŷ − y)²),   δ = 2(ŷ − y)/size,   ∂L/∂y = −δ
    reduced   l = (ŷ − y)²,   δ = 2 c (ŷ − y),   ∂L/∂y = −δ

with ``c = ∂L/∂l`` of the reduction (``jbp.losses._reduction``). Both keep ``ŷ − y`` (in float32
for half-precision inputs) as their one residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbp._registry import layer
from jbp._rule import compute_dtype, manual_rule
from jbp.losses import _reduction


def _difference(pred, target):
    """ŷ − y in the compute dtype: the forward's value and the backward's residual."""
    return pred.astype(compute_dtype(pred.dtype)) - target.astype(compute_dtype(pred.dtype))


# --- the default: a mean over elements --------------------------------------------------------

def _mse_forward(pred, target):
    return jnp.mean(jnp.square(_difference(pred, target))).astype(pred.dtype)


def _mse_fwd(pred, target):
    diff = _difference(pred, target)
    return jnp.mean(jnp.square(diff)).astype(pred.dtype), diff   # residual: ŷ − y


def _mse_bwd(diff, g):
    d_pred = (2.0 * diff * (g.astype(diff.dtype) / diff.size)).astype(g.dtype)  # 2(ŷ − y)/size
    return d_pred, -d_pred                                                      # ∂L/∂y = −δ


_mse_rule = manual_rule("mse", _mse_forward, _mse_fwd, _mse_bwd, num_args=2, num_static=0)


# --- reduced: "sum" or "none" -------------------------------------------------------------------

def _reduced(diff, reduction, dtype):
    return _reduction.reduce(jnp.square(diff), jnp.ones((), diff.dtype), reduction,
                             weighted_mean=False).astype(dtype)


def _reduced_forward(pred, target, reduction):
    return _reduced(_difference(pred, target), reduction, pred.dtype)


def _reduced_fwd(pred, target, reduction):
    diff = _difference(pred, target)
    return _reduced(diff, reduction, pred.dtype), diff           # residual: ŷ − y


def _reduced_bwd(reduction, diff, g):
    c = _reduction.loss_cotangent(g, jnp.ones((), diff.dtype), reduction, False, diff.size)
    d_pred = (2.0 * diff * c).astype(g.dtype)                                # 2 c (ŷ − y)
    return d_pred, -d_pred


_reduced_rule = manual_rule("mse", _reduced_forward, _reduced_fwd, _reduced_bwd, num_args=3)


@layer(_mse_rule, _reduced_rule)
def mse(rule, reduced_rule, pred: jax.Array, target: jax.Array, *,
        reduction: str = "mean") -> jax.Array:
    """Mean squared error ``mean((ŷ − y)²)`` over every element; shapes must match.
    ``reduction="sum"`` sums, ``"none"`` returns ``(ŷ − y)²`` elementwise (PyTorch's).

    Backward ``δ = 2(ŷ − y)/size``, ``∂L/∂y = −δ``.
    Residuals: ``ŷ − y`` (``size · itemsize`` bytes; float32 for half-precision inputs).
    """
    _reduction.check_pair("pred", pred, "target", target)
    _reduction.check_reduction(reduction)
    # The target is cast outside the rule: JAX casts its cotangent back to its dtype.
    if reduction == "mean":
        return rule(pred, target.astype(pred.dtype))
    return reduced_rule(pred, target.astype(pred.dtype), reduction)

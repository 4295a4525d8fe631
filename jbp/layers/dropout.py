"""Inverted dropout and stochastic depth with hand-written backwards.

Forward (training): ``y = x ⊙ m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` per element.
Backward: ``∂L/∂x = δ ⊙ m / (1 − p)`` — the same mask, the same scale. In evaluation mode, or with
``p = 0``, dropout is the identity. The mask is drawn from ``key`` outside the rule, so
``jbp.layers.dropout`` and ``jbp.autodiff.dropout`` drop the same elements for the same key.

Stochastic depth (Huang et al., 2016; torchvision's ``StochasticDepth``) is the same equation
with one mask entry per example (``mode="row"``: ``m`` of shape ``(N, 1, …, 1)``) or one for the
whole batch (``mode="batch"``), broadcast over the other axes: a residual branch is dropped for
whole examples and the survivors are scaled by ``1/(1 − p)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jbp import _checks
from jbp._registry import layer
from jbp._rule import manual_rule


def _forward(x, mask, scale):
    return jnp.where(mask, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


def _fwd(x, mask, scale):
    # residual: the bool mask m, x.size bytes (stochastic depth: N bytes, or 1)
    return _forward(x, mask, scale), mask


def _bwd(scale, mask, g):
    # ∂L/∂x = δ ⊙ m / (1 − p), m broadcast to δ's shape; the mask is not differentiable
    # (None = no cotangent).
    return jnp.where(mask, g * jnp.asarray(scale, g.dtype), jnp.zeros((), g.dtype)), None


_dropout_rule = manual_rule("dropout", _forward, _fwd, _bwd, num_args=3)
_stochastic_depth_rule = manual_rule("stochastic_depth", _forward, _fwd, _bwd, num_args=3)


def _check_rate(rate):
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"rate: expected a Python float in [0, 1), got {rate!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected a float in [0, 1), got {rate!r}")




@layer(_dropout_rule)
def dropout(rule, x: jax.Array, rate: float, key: jax.Array, *, train: bool) -> jax.Array:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.

    Args:
      x: any shape, floating point.
      rate: drop probability ``p`` in ``[0, 1)`` (a Python float).
      key: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      train: ``False`` returns ``x`` unchanged.

    Returns:
      an array shaped like ``x``.

    Backward ``δ ⊙ m / (1 − p)``. Residuals: the boolean keep-mask (``x.size`` bytes).
    """
    _checks.require_float("x", x)
    _check_rate(rate)
    _checks.require_static_bool("train", train)
    if not train or rate == 0.0:
        return x
    _checks.require_key("key", key)
    mask = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return rule(x, mask, 1.0 / (1.0 - rate))


#: ``stochastic_depth(mode=...)``: one mask entry per example, or one for the batch.
STOCHASTIC_DEPTH_MODES = ("row", "batch")


@layer(_stochastic_depth_rule)
def stochastic_depth(rule, x: jax.Array, rate: float, key: jax.Array, *, train: bool,
                     mode: str = "row") -> jax.Array:
    """Stochastic depth (torchvision's ``stochastic_depth``): drop a residual branch.

    Args:
      x: the branch's output, shape ``(N, ...)``, floating point.
      rate: drop probability ``p`` in ``[0, 1)`` (a Python float).
      key: a JAX PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).
      train: ``False`` returns ``x`` unchanged.
      mode: ``"row"``: each example's branch is kept with probability ``1 − p``
        (``m`` of shape ``(N, 1, …, 1)``); ``"batch"``: one draw for the whole batch.

    Returns:
      ``y = x ⊙ m / (1 − p)``, shaped like ``x``.

    Backward ``δ ⊙ m / (1 − p)``. Residuals: the boolean keep-mask (``N`` bytes, or 1).
    """
    _checks.require_float("x", x)
    if x.ndim < 1:
        raise ValueError("x: expected at least a batch axis, got a scalar")
    _check_rate(rate)
    if mode not in STOCHASTIC_DEPTH_MODES:
        raise ValueError(f"mode: expected one of {STOCHASTIC_DEPTH_MODES}, got {mode!r}")
    _checks.require_static_bool("train", train)
    if not train or rate == 0.0:
        return x
    _checks.require_key("key", key)
    shape = ((x.shape[0] if mode == "row" else 1),) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(key, 1.0 - rate, shape)
    return rule(x, mask, 1.0 / (1.0 - rate))

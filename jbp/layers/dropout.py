"""Inverted dropout with a hand-written backward.

Forward (training): ``y = x ⊙ m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` per element.
Backward: ``∂L/∂x = δ ⊙ m / (1 − p)`` — the same mask, the same scale. In evaluation mode, or with
``p = 0``, dropout is the identity. The mask is drawn from ``key`` outside the rule, so
``jbp.layers.dropout`` and ``jbp.autodiff.dropout`` drop the same elements for the same key.
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
    return _forward(x, mask, scale), mask     # residual: the bool mask m, x.size bytes


def _bwd(scale, mask, g):
    # ∂L/∂x = δ ⊙ m / (1 − p); the mask is not differentiable (None = no cotangent).
    return jnp.where(mask, g * jnp.asarray(scale, g.dtype), jnp.zeros((), g.dtype)), None


_dropout_rule = manual_rule("dropout", _forward, _fwd, _bwd, num_args=3)


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
    if not isinstance(rate, (int, float)) or isinstance(rate, bool):
        raise TypeError(f"rate: expected a Python float in [0, 1), got {rate!r}")
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate: expected a float in [0, 1), got {rate!r}")
    _checks.require_static_bool("train", train)
    if not train or rate == 0.0:
        return x
    _checks.require_array("key", key)
    is_typed_key = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    if not is_typed_key and (key.dtype != jnp.uint32 or key.shape[-1:] != (2,)):
        raise TypeError(f"key: expected a PRNG key from jax.random.key(seed), got an array "
                        f"of dtype {key.dtype} and shape {tuple(key.shape)}")
    mask = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return rule(x, mask, 1.0 / (1.0 - rate))

"""Elementwise activations and softmax, with hand-written backwards.

Equations (EQUATIONS.md, "Activations"), ``δ = ∂L/∂a`` arriving from above::

    ReLU:          ∂L/∂z = δ ⊙ 1[z > 0]                  (0 at z = 0)
    Leaky ReLU(α): ∂L/∂z = δ ⊙ (1[z > 0] + α 1[z ≤ 0])
    Sigmoid:       ∂L/∂z = δ ⊙ σ(z)(1 − σ(z))            (from the saved output)
    Tanh:          ∂L/∂z = δ ⊙ (1 − tanh(z)²)            (from the saved output)
    Softmax:       ∂L/∂z = ŷ ⊙ (δ − Σ_k δ_k ŷ_k)
    Log-softmax:   ∂L/∂z = δ − softmax(z) Σ_k δ_k         (softmax = exp of the saved output)

The forwards avoid ``jax.nn`` where it carries its own custom derivative, so that ``jbp.autodiff``
really is JAX differentiating plain ``jnp``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jbp import _checks, _residuals
from jbp._registry import layer
from jbp._rule import manual_rule


def _check(x):
    _checks.require_float("x", x)


def _axis(x, axis) -> int:
    """``axis`` in [0, ndim); a 0-d ``x`` takes axis 0 or -1 (PyTorch's dim=0 / -1)."""
    ndim = max(x.ndim, 1)
    if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise ValueError(f"axis: expected an int in [-{ndim}, {ndim}) for x of shape "
                         f"{tuple(x.shape)}, got {axis!r}")
    return axis % ndim


# --- ReLU ------------------------------------------------------------------------------------

def _relu_forward(x, residuals="exact"):
    # "x <= 0 -> 0, else x": NaN compares false, so NaN propagates (as in PyTorch) instead of
    # being silently zeroed; JAX's derivative of this is 0 at x = 0, as EQUATIONS.md states.
    del residuals                                 # what the backward keeps; the value is exact
    return jnp.where(x <= 0, jnp.zeros((), x.dtype), x)


def _relu_fwd(x, residuals):
    # Residual, "exact": the *output* a = max(z, 0), since 1[a > 0] = 1[z > 0] (NaN: both
    # false). In a network the next layer keeps a alive anyway (it saves its input), so this
    # costs no memory. Under a compressed policy ("bf16", "int8") the next layer keeps only a
    # compressed copy of a, and keeping a itself here would hold the float buffer alive after
    # all: the residual is then the mask 1[a > 0] (1 byte a value), and the gradient stays exact.
    y = _relu_forward(x)
    return y, (y if residuals == "exact" else y > 0)


def _relu_bwd(residuals, kept, g):
    mask = kept > 0 if residuals == "exact" else kept
    return (jnp.where(mask, g, jnp.zeros((), g.dtype)),)      # δ ⊙ 1[z > 0] = δ ⊙ 1[a > 0]


_relu_rule = manual_rule("relu", _relu_forward, _relu_fwd, _relu_bwd, num_args=2)


@layer(_relu_rule, options=("residuals",))
def relu(rule, x: jax.Array, residuals: str = "exact") -> jax.Array:
    """ReLU ``max(z, 0)``, any shape. Backward ``δ ⊙ 1[z > 0]`` (gradient 0 at ``z = 0``).

    Residuals: ``"exact"`` keeps the output ``a`` itself (no extra memory where the next
    layer keeps it); the compressed policies of the model (``"bf16"``, ``"int8"``, where the
    next convolution keeps only a compressed copy of ``a``) keep the boolean mask
    ``1[a > 0]`` instead (``x.size`` bytes). The gradient is exact under every policy.
    """
    _check(x)
    return rule(x, _residuals.check(residuals))


# --- Leaky ReLU ------------------------------------------------------------------------------

def _leaky_forward(x, slope):
    return jnp.where(x > 0, x, x * jnp.asarray(slope, x.dtype))


def _leaky_fwd(x, slope):
    mask = x > 0                                  # residual: bool mask, x.size bytes
    return jnp.where(mask, x, x * jnp.asarray(slope, x.dtype)), mask


def _leaky_bwd(slope, mask, g):
    return (jnp.where(mask, g, g * jnp.asarray(slope, g.dtype)),)   # δ ⊙ (1[z>0] + α 1[z≤0])


_leaky_rule = manual_rule("leaky_relu", _leaky_forward, _leaky_fwd, _leaky_bwd, num_args=2)


@layer(_leaky_rule)
def leaky_relu(rule, x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """Leaky ReLU: ``z`` for ``z > 0``, else ``α z`` with ``α = negative_slope``. Any shape.

    Backward ``δ ⊙ (1[z > 0] + α 1[z ≤ 0])`` (slope ``α`` at ``z = 0``).
    Residuals: a boolean mask ``z > 0`` (``x.size`` bytes).
    """
    _check(x)
    if not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool):
        raise TypeError(f"negative_slope: expected a Python float, got {negative_slope!r}")
    return rule(x, float(negative_slope))


# --- Sigmoid and tanh --------------------------------------------------------------------------

def _sigmoid_forward(x):
    return lax.logistic(x)      # 1 / (1 + e^{-z}), overflow-free for large |z|


def _sigmoid_fwd(x):
    y = lax.logistic(x)
    return y, y                                   # residual: σ(z), x.size · itemsize bytes


def _sigmoid_bwd(y, g):
    return (g * y * (1 - y),)                     # δ ⊙ σ(z)(1 − σ(z))


_sigmoid_rule = manual_rule("sigmoid", _sigmoid_forward, _sigmoid_fwd, _sigmoid_bwd,
                            num_args=1, num_static=0)


def _tanh_fwd(x):
    y = jnp.tanh(x)
    return y, y                                   # residual: tanh(z), x.size · itemsize bytes


def _tanh_bwd(y, g):
    return (g * (1 - y * y),)                     # δ ⊙ (1 − tanh(z)²)


_tanh_rule = manual_rule("tanh", jnp.tanh, _tanh_fwd, _tanh_bwd, num_args=1, num_static=0)


@layer(_sigmoid_rule)
def sigmoid(rule, x: jax.Array) -> jax.Array:
    """Logistic sigmoid ``σ(z) = 1 / (1 + e^{−z})``, any shape.

    Backward ``δ ⊙ σ(z)(1 − σ(z))`` from the saved output (not recomputed).
    Residuals: ``σ(z)`` (``x.size · itemsize`` bytes).
    """
    _check(x)
    return rule(x)


@layer(_tanh_rule)
def tanh(rule, x: jax.Array) -> jax.Array:
    """Hyperbolic tangent, any shape. Backward ``δ ⊙ (1 − tanh(z)²)`` from the saved output.

    Residuals: ``tanh(z)`` (``x.size · itemsize`` bytes).
    """
    _check(x)
    return rule(x)


# --- Softmax and log-softmax ------------------------------------------------------------------

def _shifted(x, axis):
    # Softmax is shift-invariant, so the max carries no gradient; subtracting it keeps exp finite.
    return x - lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))


def _softmax_forward(x, axis):
    e = jnp.exp(_shifted(x, axis))
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _softmax_fwd(x, axis):
    y = _softmax_forward(x, axis)
    return y, y                                   # residual: ŷ, x.size · itemsize bytes


def _softmax_bwd(axis, y, g):
    return (y * (g - jnp.sum(g * y, axis=axis, keepdims=True)),)   # ŷ ⊙ (δ − Σ_k δ_k ŷ_k)


_softmax_rule = manual_rule("softmax", _softmax_forward, _softmax_fwd, _softmax_bwd, num_args=2)


def _log_softmax_forward(x, axis):
    s = _shifted(x, axis)
    return s - jnp.log(jnp.sum(jnp.exp(s), axis=axis, keepdims=True))


def _log_softmax_fwd(x, axis):
    y = _log_softmax_forward(x, axis)
    return y, y                                   # residual: log ŷ, x.size · itemsize bytes


def _log_softmax_bwd(axis, y, g):
    return (g - jnp.exp(y) * jnp.sum(g, axis=axis, keepdims=True),)  # δ − ŷ Σ_k δ_k


_log_softmax_rule = manual_rule("log_softmax", _log_softmax_forward, _log_softmax_fwd,
                                _log_softmax_bwd, num_args=2)


def _along_axis(rule, x, axis):
    """The rule along ``axis``; a 0-d ``x`` as one entry along its own axis (softmax 1, log 0),
    and an empty axis or array returned as it is (nothing to normalise), as PyTorch does."""
    if x.ndim == 0:
        return rule(x[None], 0)[0]
    if x.size == 0:
        return x
    return rule(x, axis)


@layer(_softmax_rule)
def softmax(rule, x: jax.Array, axis: int = -1) -> jax.Array:
    """Softmax ``ŷ_k = e^{z_k} / Σ_j e^{z_j}`` along ``axis``, any shape.

    Backward ``ŷ ⊙ (δ − Σ_k δ_k ŷ_k)``. Residuals: ``ŷ`` (``x.size · itemsize`` bytes).
    For a loss, prefer :func:`jbp.softmax_cross_entropy` on the logits (fused and stable).
    """
    _check(x)
    return _along_axis(rule, x, _axis(x, axis))


@layer(_log_softmax_rule)
def log_softmax(rule, x: jax.Array, axis: int = -1) -> jax.Array:
    """``log ŷ = z − logsumexp(z)`` along ``axis``, any shape; stable for large logits.

    Backward ``δ − ŷ Σ_k δ_k`` with ``ŷ = exp(output)``.
    Residuals: the output (``x.size · itemsize`` bytes).
    """
    _check(x)
    return _along_axis(rule, x, _axis(x, axis))

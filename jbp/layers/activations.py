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


# --- SiLU, ReLU6, hard sigmoid, hard swish (MobileNet / EfficientNet) ---------------------------

def _silu_forward(x):
    return x * lax.logistic(x)                    # z σ(z)


def _silu_fwd(x):
    return _silu_forward(x), x                    # residual: z, x.size · itemsize bytes


def _silu_bwd(x, g):
    s = lax.logistic(x)
    return (g * (s * (1 + x * (1 - s))),)         # δ ⊙ σ(z)(1 + z(1 − σ(z)))


_silu_rule = manual_rule("silu", _silu_forward, _silu_fwd, _silu_bwd, num_args=1, num_static=0)


@layer(_silu_rule)
def silu(rule, x: jax.Array) -> jax.Array:
    """SiLU (swish) ``z σ(z)``, any shape: EfficientNet's activation (``torch.nn.SiLU``).

    Backward ``δ ⊙ σ(z)(1 + z(1 − σ(z)))``, ``σ`` recomputed from the saved input.
    Residuals: ``z`` (``x.size · itemsize`` bytes).
    """
    _check(x)
    return rule(x)


def _relu6_forward(x):
    # NaN compares false both times and propagates, as in relu.
    zero, six = jnp.zeros((), x.dtype), jnp.asarray(6, x.dtype)
    return jnp.where(x <= 0, zero, jnp.where(x >= 6, six, x))


def _relu6_fwd(x):
    y = _relu6_forward(x)
    return y, (y > 0) & (y < 6)                   # residual: bool mask 1[0 < z < 6], x.size bytes


def _relu6_bwd(inside, g):
    return (jnp.where(inside, g, jnp.zeros((), g.dtype)),)    # δ ⊙ 1[0 < z < 6]


_relu6_rule = manual_rule("relu6", _relu6_forward, _relu6_fwd, _relu6_bwd,
                          num_args=1, num_static=0)


@layer(_relu6_rule)
def relu6(rule, x: jax.Array) -> jax.Array:
    """ReLU6 ``min(max(z, 0), 6)``, any shape: MobileNetV2's activation (``torch.nn.ReLU6``).

    Backward ``δ ⊙ 1[0 < z < 6]`` (0 at both kinks, as PyTorch's ``hardtanh`` backward).
    Residuals: a boolean mask (``x.size`` bytes).
    """
    _check(x)
    return rule(x)


def _hard_sigmoid_forward(x):
    return _relu6_forward(x + jnp.asarray(3, x.dtype)) / jnp.asarray(6, x.dtype)   # relu6(z+3)/6


def _hard_sigmoid_fwd(x):
    return _hard_sigmoid_forward(x), (x > -3) & (x < 3)    # residual: bool mask, x.size bytes


def _hard_sigmoid_bwd(inside, g):
    return (jnp.where(inside, g / jnp.asarray(6, g.dtype), jnp.zeros((), g.dtype)),)  # δ/6 ⊙ 1[|z|<3]


_hard_sigmoid_rule = manual_rule("hard_sigmoid", _hard_sigmoid_forward, _hard_sigmoid_fwd,
                                 _hard_sigmoid_bwd, num_args=1, num_static=0)


@layer(_hard_sigmoid_rule)
def hard_sigmoid(rule, x: jax.Array) -> jax.Array:
    """Hard sigmoid ``relu6(z + 3) / 6``, any shape (``torch.nn.Hardsigmoid``, MobileNetV3).

    Backward ``δ/6 ⊙ 1[−3 < z < 3]`` (0 at ``z = ±3``, as PyTorch).
    Residuals: a boolean mask (``x.size`` bytes).
    """
    _check(x)
    return rule(x)


def _hard_swish_forward(x):
    return x * _hard_sigmoid_forward(x)           # z · relu6(z + 3) / 6


def _hard_swish_fwd(x):
    return _hard_swish_forward(x), x              # residual: z, x.size · itemsize bytes


def _hard_swish_bwd(x, g):
    # δ ⊙ (0 for z < −3; (2z + 3)/6 for −3 ≤ z ≤ 3; 1 for z > 3): PyTorch's values at the kinks
    slope = jnp.where(x < -3, jnp.zeros((), x.dtype),
                      jnp.where(x <= 3, (2 * x + 3) / jnp.asarray(6, x.dtype),
                                jnp.ones((), x.dtype)))
    return (g * slope,)


_hard_swish_rule = manual_rule("hard_swish", _hard_swish_forward, _hard_swish_fwd,
                               _hard_swish_bwd, num_args=1, num_static=0)


@layer(_hard_swish_rule)
def hard_swish(rule, x: jax.Array) -> jax.Array:
    """Hard swish ``z · relu6(z + 3) / 6``, any shape (``torch.nn.Hardswish``, MobileNetV3).

    Backward ``δ ⊙ (0 if z < −3; (2z + 3)/6 if −3 ≤ z ≤ 3; 1 if z > 3)`` (PyTorch's values at
    the kinks). Residuals: ``z`` (``x.size · itemsize`` bytes).
    """
    _check(x)
    return rule(x)

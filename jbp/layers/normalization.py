"""Batch normalisation with a hand-written backward.

Equations (EQUATIONS.md, "Batch normalisation"); statistics per channel (the last axis) over all
other axes, ``M`` = number of values per channel (``N·H·W`` for images)::

    μ = mean(x),  σ² = mean((x − μ)²)  (biased),  x̂ = (x − μ)/√(σ² + ε),  y = γ x̂ + β
    ∂L/∂γ = Σ δ ⊙ x̂,   ∂L/∂β = Σ δ
    ∂L/∂x = (γ / (M √(σ² + ε))) · (M δ − Σ δ − x̂ ⊙ Σ(δ ⊙ x̂))
    evaluation (running statistics, affine in x):  ∂L/∂x = δ γ / √(σ²_run + ε)

Per-example quantities (``jbp._probes``; EQUATIONS.md, "Per-example quantities") exist in
evaluation mode only, where example n's output depends on example n alone:
``∂ℓ_n/∂γ = Σ_{h,w} δ_n ⊙ x̂_n``, ``∂ℓ_n/∂β = Σ_{h,w} δ_n``. In training mode the batch
statistics couple every example to every other, so "the gradient of example n" is not defined
by the backward; asking for it is an error (as in BackPACK).

Conventions: running statistics are state, not parameters. They are updated as
``m·old + (1 − m)·batch`` with the *unbiased* batch variance (``σ² · M/(M − 1)``, like PyTorch;
``m = momentum = 0.9`` matches PyTorch's ``momentum=0.1``), and they receive no gradient in either
mode (``stop_gradient``), in ``jbp`` and ``jbp.autodiff`` alike. Half-precision inputs are
normalised in float32 and cast back.

Synchronised batch norm (``axis_name``, inside ``jax.shard_map``): the batch is the union of the
devices' shards along that mesh axis, ``M = Σ_d M_d``. Every sum above runs over the global
batch: the forward's ``Σ x`` and ``Σ (x − μ)²`` and the backward's ``Σ δ`` and ``Σ δ ⊙ x`` are
per-device partial sums followed by one ``psum`` each, written here by hand like the rest (the
autodiff twin ``psum``s the same forward sums and lets JAX transpose them). The result is the
global-batch equation, not an average of per-device statistics.
"""

from __future__ import annotations

from typing import Hashable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jbp import _checks, _probes, _residuals
from jbp._registry import layer
from jbp._rule import call_probed, cast_like, compute_dtype, manual_rule


def _stat_axes(x):
    return tuple(range(x.ndim - 1))


def _global_sum(v, axes, axis_name):
    """``Σ`` over ``axes`` of this device's values, then over the devices along ``axis_name``."""
    s = jnp.sum(v, axis=axes)
    return s if axis_name is None else lax.psum(s, axis_name)


def _count(x, axis_name) -> int:
    """``M``: values per channel in the (global, with ``axis_name``) batch."""
    m = x.size // x.shape[-1]
    return m if axis_name is None else m * lax.axis_size(axis_name)


# --- training mode: batch statistics ----------------------------------------------------------

def _normalize_batch(x, gamma, beta, eps, axis_name):
    xc = x.astype(compute_dtype(x.dtype))
    axes, m = _stat_axes(x), _count(x, axis_name)
    mean = _global_sum(xc, axes, axis_name) / m
    var = _global_sum(jnp.square(xc - mean), axes, axis_name) / m
    inv_std = lax.rsqrt(var + eps)
    x_hat = (xc - mean) * inv_std
    return (gamma * x_hat + beta).astype(x.dtype), mean, var, x_hat, inv_std


def _train_forward(x, gamma, beta, eps, axis_name=None, residuals="exact"):
    """Returns ``(y, μ, σ²)``; the statistics feed the running-average update."""
    y, mean, var, _, _ = _normalize_batch(x, gamma, beta, eps, axis_name)
    return y, mean, var


def _train_fwd(x, gamma, beta, eps, axis_name, residuals):
    y, mean, var, _, inv_std = _normalize_batch(x, gamma, beta, eps, axis_name)
    # Residuals: the input x (M·C values; already in memory, so saving it writes nothing new),
    # μ and 1/σ (C values each), γ and β (C values each; β only for its dtype). The backward
    # recomputes x̂ = (x − μ)/σ inside its own fused passes instead of this forward writing a
    # second M·C tensor (docs/performance.md). ``residuals`` "bf16"/"int8" keep x compressed
    # (jbp._residuals; then a new M·C tensor of 2 or 1 bytes per value); μ, σ stay exact.
    return (y, mean, var), (_residuals.compress(x, residuals), mean, inv_std, gamma, beta)


def _train_bwd(eps, axis_name, residuals, res, cotangents):
    # The cotangents of μ and σ² are zero: the public function stops their gradient.
    g, _, _ = cotangents
    kept, mean, inv_std, gamma, beta = res
    x = _residuals.decompress(kept, residuals, mean.dtype)
    axes = _stat_axes(x)
    m = _count(x, axis_name)
    g = g.astype(mean.dtype)
    d_beta = _global_sum(g, axes, axis_name)                # ∂L/∂β = Σ δ
    # ∂L/∂γ = Σ δ ⊙ x̂ = (Σ δ ⊙ x − μ Σ δ) / σ. The reduction reads δ and x as they are: with x̂
    # inside it, XLA:CPU wrote x̂ out as a separate M·C tensor (held from the forward to here)
    # because its reduction kernels take no per-channel broadcasts (docs/performance.md).
    d_gamma = inv_std * (_global_sum(g * x, axes, axis_name) - mean * d_beta)
    x_hat = (x - mean) * inv_std
    # ∂L/∂x = (γ / (M √(σ² + ε))) · (M δ − Σ δ − x̂ ⊙ Σ(δ ⊙ x̂))
    dx = (gamma * inv_std / m) * (m * g - d_beta - x_hat * d_gamma)
    return (dx.astype(cotangents[0].dtype), cast_like(d_gamma, gamma), cast_like(d_beta, beta))


_train_rule = manual_rule("batch_norm", _train_forward, _train_fwd, _train_bwd, num_args=6,
                          num_static=3)


# --- evaluation mode: running statistics --------------------------------------------------------

def _normalize_running(x, gamma, beta, running_mean, running_var, eps):
    xc = x.astype(compute_dtype(x.dtype))
    inv_std = lax.rsqrt(running_var + eps)
    x_hat = (xc - running_mean) * inv_std
    return (gamma * x_hat + beta).astype(x.dtype), x_hat, inv_std


def _eval_forward(x, gamma, beta, running_mean, running_var, eps):
    return _normalize_running(x, gamma, beta, running_mean, running_var, eps)[0]


def _eval_fwd(x, gamma, beta, running_mean, running_var, eps):
    y, x_hat, inv_std = _normalize_running(x, gamma, beta, running_mean, running_var, eps)
    # Residuals: x̂ (M·C values in the compute dtype), 1/σ_run, γ and β (C values each).
    return y, (x_hat, inv_std, gamma, beta)


def _eval_bwd(eps, res, g):
    x_hat, inv_std, gamma, beta = res
    axes = _stat_axes(x_hat)
    gc = g.astype(x_hat.dtype)
    dx = gc * gamma * inv_std                               # δ γ / √(σ²_run + ε)
    d_gamma = jnp.sum(gc * x_hat, axis=axes)
    d_beta = jnp.sum(gc, axis=axes)
    # Running statistics get no gradient (they are state): None is a zero cotangent.
    return dx.astype(g.dtype), cast_like(d_gamma, gamma), cast_like(d_beta, beta), None, None


def _eval_quantities(_eps, res, g, names):
    """Per-example quantities of γ and β: from ∂ℓ_n/∂γ = Σ δ_n ⊙ x̂_n, ∂ℓ_n/∂β = Σ δ_n (sums
    over every axis but the batch and the channels)."""
    x_hat, _, gamma, beta = res
    gc = g.astype(x_hat.dtype)
    inner = tuple(range(1, x_hat.ndim - 1))
    _, names_gamma, names_beta, _, _ = names
    q_gamma = q_beta = None
    if names_gamma:
        _probes.check_kfac(names_gamma, "batch norm's gamma")
        q_gamma = _probes.from_per_example(jnp.sum(gc * x_hat, axis=inner), names_gamma,
                                           gamma.dtype)
    if names_beta:
        _probes.check_kfac(names_beta, "batch norm's beta")
        q_beta = _probes.from_per_example(jnp.sum(gc, axis=inner), names_beta, beta.dtype)
    return None, q_gamma, q_beta, None, None


_eval_rule = manual_rule("batch_norm", _eval_forward, _eval_fwd, _eval_bwd, num_args=6,
                         quantities=_eval_quantities)


def _check(x, gamma, beta, running_mean, running_var, train, momentum, eps):
    _checks.require_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (N, ..., C) with channels last, got {tuple(x.shape)}")
    _checks.require_float("x", x)
    c = x.shape[-1]
    for name, v in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean),
                    ("running_var", running_var)):
        _checks.require_array(name, v)
        if tuple(v.shape) != (c,):
            raise ValueError(f"{name}: expected shape ({c},) (channels, the last axis of x), "
                             f"got {tuple(v.shape)}." + _checks.warn_if_nchw("x", x, v.shape[0]
                                                                            if v.ndim else None))
    _checks.require_static_bool("train", train)
    if not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
    if not isinstance(eps, (int, float)) or eps <= 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    m = x.size // c if c else 0
    if train and m < 2:
        raise ValueError(f"x: training-mode batch norm needs more than one value per channel to "
                         f"estimate a variance, got shape {tuple(x.shape)} ({m} per channel)")


def _check_axis(axis_name):
    if axis_name is None:
        return
    try:
        lax.axis_size(axis_name)
    except NameError as err:
        raise ValueError(f"batch_norm: axis_name={axis_name!r} is not a mesh axis of an "
                         f"enclosing jax.shard_map (synchronised batch norm sums over the "
                         f"devices along that axis); call it inside jax.shard_map over a mesh "
                         f"with that axis, or pass axis_name=None") from err


@layer(_train_rule, _eval_rule, options=("residuals", "axis_name"))
def batch_norm(train_rule, eval_rule, x: jax.Array, gamma: jax.Array, beta: jax.Array,
               running_mean: jax.Array, running_var: jax.Array, *, train: bool,
               momentum: float = 0.9,
               eps: float = 1e-5, axis_name: Optional[Hashable] = None,
               residuals: str = "exact",
               ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    """Batch normalisation over every axis but the last (channels).

    Args:
      x: shape ``(N, ..., C)``, e.g. ``(N, H, W, C)`` or ``(N, C)``.
      gamma, beta: scale ``γ`` and shift ``β``, shape ``(C,)``.
      running_mean, running_var: running statistics, shape ``(C,)``; state, no gradient.
      train: ``True`` normalises with batch statistics and updates the running ones;
        ``False`` normalises with the running statistics and returns them unchanged.
      momentum: ``new = momentum·old + (1 − momentum)·batch`` (unbiased batch variance).
      eps: added to the variance.
      axis_name: a ``jax.shard_map`` mesh axis (or tuple of axes) the batch is split over:
        statistics and the backward's sums cover the global batch (synchronised batch
        norm). ``None``: this device's batch alone. A model receives it through its
        ``jbp.LayerPolicy(axis_name=...)`` (the data-parallel train step sets ``"data"``).
      residuals: what the training-mode rule keeps of ``x`` for the backward: ``"exact"``,
        ``"bf16"`` or ``"int8"`` (``jbp._residuals``); ``x̂`` is recomputed from it.

    Returns:
      ``(y, (new_running_mean, new_running_var))``, ``y`` shaped like ``x``.

    Backward: train ``∂L/∂x = (γ / (M √(σ² + ε))) · (M δ − Σ δ − x̂ ⊙ Σ(δ ⊙ x̂))``,
    ``∂L/∂γ = Σ δ ⊙ x̂``, ``∂L/∂β = Σ δ``; eval ``∂L/∂x = δ γ / √(σ²_run + ε)``.
    Residuals (train): ``x``, ``μ``, ``1/σ``, ``γ`` and ``β`` (``M·C`` values of ``x``'s
    dtype plus ``4C``; ``x̂`` is recomputed in the backward).
    Eval: ``x̂``, ``1/σ``, ``γ``, ``β``.
    ``gamma``/``beta`` wrapped by ``jbp.quantities`` (``jbp._probes.Probed``): in evaluation
    mode the backward also gives their per-example quantities; in training mode it is an error.
    """
    gamma, probes_gamma = _probes.unwrap(gamma)
    beta, probes_beta = _probes.unwrap(beta)
    probed = probes_gamma is not None or probes_beta is not None
    if probed and train is True:
        raise ValueError("quantities: per-example quantities are not defined through batch_norm "
                         "in training mode (train=True): its batch statistics couple the "
                         "examples. Run the model with train=False (running statistics), or "
                         "use a model without batch norm")
    _check(x, gamma, beta, running_mean, running_var, train, momentum, eps)
    _residuals.check(residuals)
    running_mean = lax.stop_gradient(running_mean)
    running_var = lax.stop_gradient(running_var)
    if not train:
        y = call_probed(eval_rule, (None, probes_gamma, probes_beta, None, None),
                        x, gamma, beta, running_mean, running_var, float(eps))
        return y, (running_mean, running_var)
    _check_axis(axis_name)
    y, mean, var = train_rule(x, gamma, beta, float(eps), axis_name, residuals)
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    m = _count(x, axis_name)
    unbiased_var = var * (m / (m - 1))
    new_mean = momentum * running_mean + (1 - momentum) * mean.astype(running_mean.dtype)
    new_var = momentum * running_var + (1 - momentum) * unbiased_var.astype(running_var.dtype)
    return y, (new_mean.astype(running_mean.dtype), new_var.astype(running_var.dtype))

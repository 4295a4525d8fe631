"""Fully connected layer and flatten, with hand-written backwards.

Equations (EQUATIONS.md, "Fully connected"), ``z = a W + b`` with ``a: (N, in)``,
``W: (in, out)``, ``δ = ∂L/∂z``::

    ∂L/∂W = aᵀ δ          (a sum over the batch of outer products a_n ⊗ δ_n)
    ∂L/∂b = Σ_n δ_n
    ∂L/∂a = δ Wᵀ

Per-example quantities (``jbp._probes``; EQUATIONS.md, "Per-example quantities"), from the
kept ``a_n`` and the received ``δ_n`` of example ``n``::

    batch_grad        ∂ℓ_n/∂W = a_n ⊗ δ_n,           ∂ℓ_n/∂b = δ_n
    batch_l2          ‖a_n ⊗ δ_n‖² = ‖a_n‖² ‖δ_n‖²,  ‖δ_n‖²       (no (N, in, out) tensor)
    sum_grad_squared  Σ_n (a_n ⊗ δ_n)² = (a²)ᵀ (δ²),  Σ_n δ_n²
    kfac              A = Σ_n a_n a_nᵀ (in, in),  G = Σ_n δ_n δ_nᵀ (out, out)
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks, _probes
from jbp._registry import layer
from jbp._rule import call_probed, cast_like, manual_rule


def _dense_forward(x, w, b, _cfg=None):
    z = x @ w
    return z if b is None else z + b


def _dense_fwd(x, w, b, cfg):
    # Residuals: a and W, (N·in + in·out) · itemsize bytes (b only for None-ness/dtype).
    return _dense_forward(x, w, b), (x, w, b)


def _dense_bwd(_cfg, res, g):
    x, w, b = res
    dx = g @ w.T                     # ∂L/∂a = δ Wᵀ
    dw = x.T @ g                     # ∂L/∂W = aᵀ δ
    db = None if b is None else jnp.sum(g, axis=0)   # ∂L/∂b = Σ_n δ_n
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


def _dense_quantities(_cfg, res, g, names):
    """The per-example quantities of W and b (module docstring) from a (N, in), δ (N, out)."""
    x, w, b = res
    _, names_w, names_b = names
    qw, qb = {}, {}
    for name in names_w or ():
        if name == "batch_grad":
            qw[name] = jnp.einsum("ni,no->nio", x, g)                 # a_n ⊗ δ_n
        elif name == "batch_l2":
            qw[name] = jnp.sum(x * x, axis=1) * jnp.sum(g * g, axis=1)   # ‖a_n‖² ‖δ_n‖²
        elif name == "sum_grad_squared":
            qw[name] = jnp.square(x).T @ jnp.square(g)                # (a²)ᵀ (δ²)
        elif name == "kfac":
            qw[name] = (cast_like(x.T @ x, w), cast_like(g.T @ g, w))  # Σ a aᵀ, Σ δ δᵀ
    qw = {k: v if k == "kfac" else cast_like(v, w) for k, v in qw.items()}
    if names_b:
        _probes.check_kfac(names_b, "a bias")
        qb = _probes.from_per_example(g, names_b, b.dtype)          # ∂ℓ_n/∂b = δ_n
    return None, qw or None, qb or None


_dense_rule = manual_rule("dense", _dense_forward, _dense_fwd, _dense_bwd, num_args=4,
                          quantities=_dense_quantities)


def _check_dense(x, w, b):
    _checks.require_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected shape (..., in) with at least one axis, got a scalar")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 2, "(in, out)")
    if w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w: expected shape ({x.shape[-1]}, out) to match x features in={x.shape[-1]} "
            f"(x.shape={tuple(x.shape)}), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    if b is not None:
        _checks.require_array("b", b)
        if tuple(b.shape) != (w.shape[1],):
            raise ValueError(f"b: expected shape ({w.shape[1]},) (out), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"b: dtype {b.dtype} differs from x dtype {x.dtype}")


@layer(_dense_rule)
def dense(rule, x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None) -> jax.Array:
    """Fully connected layer ``z = a W + b``.

    Args:
      x: ``a``, shape ``(..., in)``: any leading axes (PyTorch's ``F.linear``), which the
        rule sees flattened into one batch axis N; images: flatten them with
        :func:`jbp.flatten` first.
      w: ``W``, shape ``(in, out)`` (PyTorch's weight transposed).
      b: optional bias, shape ``(out,)``.

    Returns:
      ``z``, shape ``(..., out)``.

    Backward (``jbp.layers.linear``): ``∂L/∂W = aᵀ δ``, ``∂L/∂b = Σ_n δ_n``, ``∂L/∂a = δ Wᵀ``.
    Residuals: ``a``, ``W`` and ``b`` (``(N·in + in·out + out) · itemsize`` bytes).
    ``w``/``b`` wrapped by ``jbp.quantities`` (``jbp._probes.Probed``): the backward also gives
    their per-example quantities (module docstring); ``x`` must then be ``(N, in)``.
    """
    w, probes_w = _probes.unwrap(w)
    b, probes_b = _probes.unwrap(b)
    _check_dense(x, w, b)
    if probes_w is not None or probes_b is not None:
        if x.ndim != 2:
            raise ValueError(f"x: per-example quantities of dense need x of shape (N, in), one "
                             f"row per example, got {tuple(x.shape)}")
        return call_probed(rule, (None, probes_w, probes_b), x, w, b, None)
    if x.ndim == 2:
        return rule(x, w, b, None)
    z = rule(x.reshape(-1, x.shape[-1]), w, b, None)     # N = the product of leading axes
    return z.reshape(*x.shape[:-1], w.shape[1])


# --- flatten ---------------------------------------------------------------------------------

def _flatten_forward(x, _shape=None):
    return x.reshape(x.shape[0], int(np.prod(x.shape[1:])))     # not -1: N may be 0


def _flatten_fwd(x, shape):
    return _flatten_forward(x), None          # no residuals: the shape is static config


def _flatten_bwd(shape, _res, g):
    return (g.reshape(shape),)                # ∂L/∂a = δ reshaped back to a's shape


_flatten_rule = manual_rule("flatten", _flatten_forward, _flatten_fwd, _flatten_bwd, num_args=2)


@layer(_flatten_rule)
def flatten(rule, x: jax.Array) -> jax.Array:
    """Flatten every axis but the first: ``(N, d1, d2, ...) -> (N, d1·d2·...)``.

    NHWC order is kept (row-major), so an NHWC image flattens H, then W, then C.
    Backward: ``δ`` reshaped to the input shape. Residuals: none (0 bytes).
    """
    _checks.require_array("x", x)
    if x.ndim < 1:
        raise ValueError(f"x: expected at least a batch axis, got a scalar")
    return rule(x, tuple(x.shape))

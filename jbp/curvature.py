"""Curvature of a train loss through jbp's hand-written rules: Hessian-vector products, the top
Hessian eigenvalue ("sharpness") and Hutchinson's trace estimate (after PyHessian, Yao et al.).

Everything is reverse-over-reverse: ``H v = ∇_θ ⟨∇_θ L(θ), v⟩``, i.e. ``jax.grad`` of the dot
product of the hand-written gradient with a fixed ``v``. That differentiates jbp's backward
rules themselves (they are plain ``jnp``/``lax``), so no forward mode is needed and the custom
VJPs stay in use. ``params`` and ``v`` are pytrees of the same structure.

    loss = curvature.train_loss(model.apply, state, x, y)      # θ -> L(θ) on one batch
    lam, v = curvature.top_eigenvalue(loss, params, key=jax.random.key(0))
    tr, stderr = curvature.hutchinson_trace(loss, params, key=jax.random.key(1), samples=100)
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp

from jbp.policy import LayerPolicy, resolve


def train_loss(apply: Callable, model_state, x, y, *, grad: Optional[str] = None,
               layers: Optional[LayerPolicy] = None,
               loss: str = "softmax_cross_entropy") -> Callable:
    """``θ -> L(θ)``: the model's train-mode loss (batch statistics) on the batch ``(x, y)``;
    ``grad``: ``"manual"`` (default) or ``"autodiff"``, or ``layers``: a
    :class:`jbp.LayerPolicy`."""
    layers = resolve(grad, layers)
    loss_fn = getattr(layers, loss)

    def objective(params):
        logits, _ = apply(params, model_state, x, train=True, layers=layers)
        return loss_fn(logits, y)

    return objective


def _vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _normalize(v):
    n = jnp.sqrt(_vdot(v, v))
    return jax.tree.map(lambda t: t / n, v), n


def make_hvp(loss: Callable) -> Callable:
    """A jit-compiled ``hvp(params, v) = H(params) v = ∇_θ ⟨∇_θ L(θ), v⟩``."""
    def hvp(params, v):
        return jax.grad(lambda p: _vdot(jax.grad(loss)(p), v))(params)
    return jax.jit(hvp)


def hvp(loss: Callable, params, v):
    """``H v`` at ``params`` (one call; use :func:`make_hvp` in loops)."""
    return make_hvp(loss)(params, v)


def _random_like(key, params, rademacher=False):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    if rademacher:
        out = [jax.random.rademacher(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
    else:
        out = [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
    return jax.tree.unflatten(tree, out)


def _power(hv, params, v, iters, tol, shift):
    """Power iteration on ``H − shift·I``: its dominant eigenvalue (Rayleigh quotient) and vector.
    Stops when the Rayleigh quotient changes by at most ``tol`` relative."""
    v, _ = _normalize(v)
    lam = None
    for _ in range(iters):
        w = jax.tree.map(lambda a, b: a - shift * b, hv(params, v), v)
        new = float(_vdot(v, w))                       # Rayleigh quotient ⟨v, (H − sI) v⟩
        v, _ = _normalize(w)
        if lam is not None and abs(new - lam) <= tol * abs(new):
            return new, v
        lam = new
    return lam, v


def top_eigenvalue(loss: Callable, params, *, key, iters: int = 200,
                   tol: float = 1e-10) -> Tuple[float, object]:
    """The largest (algebraic) eigenvalue ``λ_max`` of the Hessian and its unit eigenvector.

    Power iteration ``v ← H v / ‖H v‖`` converges to the eigenvalue of largest magnitude ``μ``
    (at rate ``(|λ₂|/|μ|)²`` for the Rayleigh quotient). If ``μ < 0`` the iteration is repeated
    on ``H − μ I``, whose spectrum is ``λ − μ ≥ 0`` with ``λ_max − μ`` on top: ``λ_max = ν + μ``.
    """
    hv = make_hvp(loss)
    mu, v = _power(hv, params, _random_like(key, params), iters, tol, 0.0)
    if mu >= 0:
        return mu, v
    nu, v = _power(hv, params, _random_like(key, params), iters, tol, mu)
    return nu + mu, v


def hutchinson_trace(loss: Callable, params, *, key, samples: int = 100) -> Tuple[float, float]:
    """Hutchinson's estimate ``tr H ≈ (1/S) Σ_s v_sᵀ H v_s`` with Rademacher ``v_s`` (each entry
    ±1: ``E[v vᵀ] = I``, so ``E[vᵀ H v] = tr H``). Returns the mean and its standard error."""
    hv = make_hvp(loss)
    vals = []
    for k in jax.random.split(key, samples):
        v = _random_like(k, params, rademacher=True)
        vals.append(float(_vdot(v, hv(params, v))))
    vals = jnp.asarray(vals)
    stderr = float(jnp.std(vals, ddof=1) / jnp.sqrt(samples)) if samples > 1 else float("nan")
    return float(jnp.mean(vals)), stderr

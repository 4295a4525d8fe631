"""Checking hand-written gradients against independent references.

Three references, each returning a :class:`GradCheck` (one row per differentiable argument, a
readable ``str`` table and an ``ok`` flag):

- :func:`versus_autodiff`: the manual rule vs ``jax.vjp`` of the ``jbp.autodiff`` twin (same
  forward, JAX-derived backward), under one shared random cotangent.
- :func:`versus_finite_differences`: central differences in float64. ``mode="full"`` builds the
  whole numerical Jacobian (two evaluations per input element, like PyTorch gradcheck's slow mode)
  and compares it entry by entry with the Jacobian assembled from the rule (``jax.jacrev``, i.e.
  one VJP per output element); ``mode="directions"`` compares ``uᵀ J v`` for a few random
  directions ``v`` per argument and a random cotangent ``u``, for inputs too large for the full
  Jacobian.
- :func:`compare` for gradients computed elsewhere (e.g. PyTorch autograd).

Error measures per argument, for a computed gradient ``a`` and a reference ``r``:
``max_abs = max |a − r|``; ``max_rel = max |a − r| / max |r|`` (relative to the reference's
largest entry, so entries near zero do not blow it up); ``cosine = ⟨a, r⟩ / (‖a‖ ‖r‖)``.
An argument passes when ``max_abs <= atol`` or ``max_rel <= rtol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_TOLERANCES = {
    # (rtol, atol) per comparison and dtype
    ("autodiff", "bfloat16"): (3e-2, 1e-3),
    ("autodiff", "float16"): (1e-2, 1e-4),
    ("autodiff", "float32"): (1e-5, 1e-6),
    ("autodiff", "float64"): (1e-10, 1e-12),
    ("finite differences", "float64"): (1e-6, 1e-8),
    ("pytorch", "float64"): (1e-10, 1e-12),
}


@dataclass(frozen=True)
class ArgError:
    """How one argument's gradient differs from its reference."""

    name: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool


@dataclass(frozen=True)
class GradCheck:
    """The outcome of comparing one function's gradients against one reference."""

    label: str
    reference: str
    args: Tuple[ArgError, ...]
    rtol: float
    atol: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.args)

    @property
    def max_abs(self) -> float:
        return max((a.max_abs for a in self.args), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((a.max_rel for a in self.args), default=0.0)

    def __str__(self) -> str:
        title = f"{self.label} vs {self.reference}"
        if self.detail:
            title += f" ({self.detail})"
        lines = [title, f"  {'arg':<8} {'max abs':>10} {'max rel':>10} {'cosine':>12}  result",
                 f"  {'-' * 8} {'-' * 10} {'-' * 10} {'-' * 12}  ------"]
        for a in self.args:
            lines.append(f"  {a.name:<8} {a.max_abs:>10.2e} {a.max_rel:>10.2e} "
                         f"{a.cosine:>12.9f}  {'ok' if a.ok else 'FAIL'}")
        lines.append(f"  tolerance: max abs <= {self.atol:g} or max rel <= {self.rtol:g}: "
                     f"{'ok' if self.ok else 'FAIL'}")
        return "\n".join(lines)


def arg_error(name: str, got, want, *, rtol: float, atol: float) -> ArgError:
    """Error measures of ``got`` against the reference ``want`` (computed in float64 numpy)."""
    a = np.asarray(got, dtype=np.float64).ravel()
    r = np.asarray(want, dtype=np.float64).ravel()
    if a.shape != r.shape:
        raise ValueError(f"{name}: gradient has {a.size} entries, reference has {r.size}")
    if a.size == 0:
        return ArgError(name, 0.0, 0.0, 1.0, True)
    max_abs = float(np.max(np.abs(a - r)))
    scale = float(np.max(np.abs(r)))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    norms = float(np.linalg.norm(a) * np.linalg.norm(r))
    if norms > 0:
        cosine = float(np.dot(a, r) / norms)
    else:
        cosine = 1.0 if max_abs == 0 else 0.0
    finite = bool(np.all(np.isfinite(a)))
    return ArgError(name, max_abs, max_rel, cosine, finite and (max_abs <= atol or max_rel <= rtol))


def compare(label: str, reference: str, got: Sequence, want: Sequence, names: Sequence[str], *,
            rtol: float, atol: float, detail: str = "") -> GradCheck:
    """Compare gradients ``got[i]`` with reference gradients ``want[i]``, one row per name."""
    rows = tuple(arg_error(n, g, w, rtol=rtol, atol=atol) for n, g, w in zip(names, got, want))
    return GradCheck(label, reference, rows, rtol, atol, detail)


def _dtype_name(args) -> str:
    return str(jnp.result_type(*args))


def random_cotangent(out, seed: int = 0):
    """A random normal cotangent shaped like ``out`` (a pytree of arrays).

    Drawn from its own stream (not ``default_rng(seed)``, which test inputs use): a cotangent equal
    to the input makes some gradients cancel exactly (batch norm's ``∂L/∂x`` vanishes for
    ``δ = x``), and the check would compare zeros.
    """
    leaves, tree = jax.tree.flatten(out)
    rng = np.random.default_rng((seed, 0xC07A))
    return jax.tree.unflatten(tree, [jnp.asarray(rng.standard_normal(np.shape(x)), x.dtype)
                                     for x in leaves])


def versus_autodiff(manual_fn: Callable, autodiff_fn: Callable, args: Sequence, *,
                    names: Optional[Sequence[str]] = None, label: str = "manual",
                    rtol: Optional[float] = None, atol: Optional[float] = None,
                    seed: int = 0) -> GradCheck:
    """VJPs of ``manual_fn`` and ``autodiff_fn`` at ``args`` under one random cotangent.

    Every positional argument is differentiated (close over the rest). Outputs may be pytrees.
    """
    names = list(names or [f"arg{i}" for i in range(len(args))])
    out, manual_vjp = jax.vjp(manual_fn, *args)
    ref_out, autodiff_vjp = jax.vjp(autodiff_fn, *args)
    u = random_cotangent(out, seed)
    key = ("autodiff", _dtype_name(args))
    if key not in DEFAULT_TOLERANCES and (rtol is None or atol is None):
        raise TypeError(f"versus_autodiff: no default tolerance for dtype {key[1]}; pass rtol "
                        f"and atol")
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(key, (rtol, atol))
    return compare(label, "autodiff", manual_vjp(u), autodiff_vjp(u), names,
                   rtol=default_rtol if rtol is None else rtol,
                   atol=default_atol if atol is None else atol, detail=_dtype_name(args))


def _require_float64(args):
    for i, a in enumerate(args):
        if jnp.result_type(a) != jnp.float64:
            raise TypeError(
                f"finite differences need float64 inputs (argument {i} is "
                f"{jnp.result_type(a)}); enable jax.config.update('jax_enable_x64', True) and "
                f"pass float64 arrays")


def _flat_fn(fn, args):
    """fn as a map from one flat float64 vector to one flat output vector."""
    sizes = [int(np.size(a)) for a in args]
    shapes = [np.shape(a) for a in args]
    offsets = np.cumsum([0] + sizes)

    def unflatten(theta):
        return [theta[offsets[i]:offsets[i + 1]].reshape(shapes[i]) for i in range(len(args))]

    def flat(theta):
        out = fn(*unflatten(theta))
        return jnp.concatenate([jnp.ravel(o) for o in jax.tree.leaves(out)])

    theta0 = jnp.concatenate([jnp.ravel(jnp.asarray(a)) for a in args])
    return flat, theta0, offsets


def numerical_jacobian(fn: Callable, args: Sequence, *, step: float = 1e-6):
    """Central-difference Jacobian of ``fn`` at ``args`` (float64): one block per argument.

    Returns a list with, for argument i, an array of shape ``(out_size, args[i].size)``; column j
    is ``(F(θ + h e_j) − F(θ − h e_j)) / 2h`` over the flattened output. Two evaluations per
    input element, batched with ``vmap``.
    """
    _require_float64(args)
    flat, theta0, offsets = _flat_fn(fn, args)
    basis = jnp.eye(int(theta0.size), dtype=theta0.dtype) * step
    batched = jax.jit(jax.vmap(flat))
    numeric = ((batched(theta0 + basis) - batched(theta0 - basis)) / (2 * step)).T
    return [numeric[:, offsets[i]:offsets[i + 1]] for i in range(len(args))]


def versus_finite_differences(fn: Callable, args: Sequence, *, mode: str = "auto",
                              names: Optional[Sequence[str]] = None, label: str = "manual",
                              step: float = 1e-6, num_directions: int = 6,
                              max_full_size: int = 400_000, rtol: Optional[float] = None,
                              atol: Optional[float] = None, seed: int = 0) -> GradCheck:
    """The gradients of ``fn`` (its custom rules) against central differences, in float64.

    ``mode``: ``"full"`` (whole Jacobian), ``"directions"`` (random projections), or ``"auto"``
    (full when inputs × outputs ≤ ``max_full_size`` entries).
    """
    _require_float64(args)
    names = list(names or [f"arg{i}" for i in range(len(args))])
    default_rtol, default_atol = DEFAULT_TOLERANCES[("finite differences", "float64")]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    flat, theta0, offsets = _flat_fn(fn, args)
    n_in = int(theta0.size)
    n_out = int(flat(theta0).size)
    if mode == "auto":
        mode = "full" if n_in * n_out <= max_full_size else "directions"
    if mode == "full":
        want = numerical_jacobian(fn, args, step=step)
        analytic = jax.jit(jax.jacrev(flat))(theta0)              # one VJP per output row
        got = [analytic[:, offsets[i]:offsets[i + 1]] for i in range(len(args))]
        detail = f"full Jacobian {n_out}x{n_in}"
    elif mode == "directions":
        rng = np.random.default_rng((seed, 0xD1F))
        u = jnp.asarray(rng.standard_normal(n_out), theta0.dtype)
        grad = jax.grad(lambda t: jnp.dot(u, flat(t)))(theta0)      # Jᵀu through the rule
        got, want = [], []
        for i in range(len(args)):
            lo, hi = offsets[i], offsets[i + 1]
            v = np.zeros((num_directions, n_in))
            v[:, lo:hi] = rng.standard_normal((num_directions, hi - lo))
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
            v = jnp.asarray(v, theta0.dtype)
            proj = jax.vmap(lambda d: jnp.dot(u, flat(theta0 + step * d) - flat(theta0 - step * d))
                            / (2 * step))(v)
            got.append(v @ grad)
            want.append(proj)
        detail = f"{num_directions} random directions per argument"
    else:
        raise ValueError(f"mode: expected 'auto', 'full' or 'directions', got {mode!r}")
    return compare(label, "finite differences", got, want, names, rtol=rtol, atol=atol,
                   detail=detail)

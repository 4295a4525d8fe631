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
- :func:`compare` for gradients computed elsewhere (e.g. PyTorch autograd), with
  :func:`vjp_at` for the rule's side (output and VJP in one compiled program).

Arguments are pytrees: ``args`` is the tuple (or list) of positional arguments, each an array or
any pytree of arrays (a params dict), or one pytree taken as the single argument. Every leaf gets
its own row, named by its tree path: ``params['conv1']['w']`` with ``names=["params"]``,
``['w1']`` for a dict passed as ``args``, ``arg0`` for a flat list without names.

Error measures per argument, for a computed gradient ``a`` and a reference ``r``:
``max_abs = max |a − r|``; ``max_rel = max |a − r| / max |r|`` (relative to the reference's
largest entry, so entries near zero do not blow it up); ``cosine = ⟨a, r⟩ / (‖a‖ ‖r‖)``.
An argument passes when ``max_abs <= atol`` or ``max_rel <= rtol``, except in
:func:`versus_autodiff`'s float32 check, which judges both gradients against float64
(:mod:`jbp.accuracy`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jbp.accuracy import Float32Check

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
    #: float32 checks of :func:`versus_autodiff`: both VJPs against float64 (the verdict).
    float64: Optional["Float32Check"] = None

    @property
    def ok(self) -> bool:
        return all(a.ok for a in self.args)

    @property
    def names(self) -> list:
        return [a.name for a in self.args]

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
        w = max([8] + [len(a.name) for a in self.args])
        lines = [title, f"  {'arg':<{w}} {'max abs':>10} {'max rel':>10} {'cosine':>12}  result",
                 f"  {'-' * w} {'-' * 10} {'-' * 10} {'-' * 12}  ------"]
        for a in self.args:
            lines.append(f"  {a.name:<{w}} {a.max_abs:>10.2e} {a.max_rel:>10.2e} "
                         f"{a.cosine:>12.9f}  {'ok' if a.ok else 'FAIL'}")
        if self.float64 is not None:
            return "\n".join(lines + [str(self.float64)])
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


def _positional(args) -> Tuple[tuple, bool]:
    """``args`` as a tuple of positional arguments, and whether it was one pytree (not a list or
    tuple of arguments; a NamedTuple is one pytree)."""
    if isinstance(args, (list, tuple)) and not hasattr(args, "_fields"):
        return tuple(args), False
    return (args,), True


def _leaves(args, names: Optional[Sequence[str]], what: str = "args"):
    """The arrays of the pytree arguments ``args``: ``(leaves, leaf names, rebuild)``, where
    ``rebuild(leaves)`` is the positional tuple again. A leaf is named by its argument's name
    (``names[i]``, else ``arg{i}``; none for a single pytree) followed by its path below it."""
    positional, single = _positional(args)
    if names is not None and len(names) != len(positional):
        raise ValueError(f"names: {len(names)} name(s) for {len(positional)} argument(s) "
                         f"{list(names)}")
    with_paths, tree = jax.tree_util.tree_flatten_with_path(positional)
    if not with_paths:
        raise ValueError(f"{what}: no arrays to differentiate (got {args!r})")
    leaves, leaf_names = [], []
    for path, leaf in with_paths:
        i, rest = path[0].idx, jax.tree_util.keystr(tuple(path[1:]))
        base = names[i] if names is not None else ("" if single else f"arg{i}")
        name = (base + rest) or "arg0"
        if not hasattr(leaf, "dtype") and not isinstance(leaf, (int, float, complex)):
            raise TypeError(f"{what}: {name} is a {type(leaf).__name__}, not an array; close "
                            f"over what is not differentiated")
        leaves.append(leaf)
        leaf_names.append(name)
    return leaves, leaf_names, lambda flat: jax.tree.unflatten(tree, list(flat))


def _on_leaves(fn: Callable, args, names):
    """``fn`` as a function of the leaves of ``args``: ``(leaf_fn, leaves, leaf names)``."""
    leaves, leaf_names, rebuild = _leaves(args, names)
    return (lambda *flat: fn(*rebuild(flat))), leaves, leaf_names


def compare(label: str, reference: str, got, want, names: Optional[Sequence[str]] = None, *,
            rtol: float, atol: float, detail: str = "") -> GradCheck:
    """Compare gradients ``got`` with reference gradients ``want``, one row per leaf.

    ``got`` and ``want`` are laid out like a function's arguments (a list of arrays, one per
    argument, or pytrees of them) with the same tree paths; ``names`` names the arguments.
    """
    got_leaves, got_names, _ = _leaves(got, names, "got")
    want_leaves, want_names, _ = _leaves(want, names, "want")
    if got_names != want_names:
        raise ValueError(f"got and want differ in structure: {got_names} vs {want_names}")
    rows = tuple(arg_error(n, g, w, rtol=rtol, atol=atol)
                 for n, g, w in zip(got_names, got_leaves, want_leaves))
    return GradCheck(label, reference, rows, rtol, atol, detail)


def _dtype_name(leaves) -> str:
    return str(jnp.result_type(*leaves))


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


def vjp_at(fn: Callable, args, u=None, *, seed: int = 0, jit: bool = True):
    """``(out, grads, u)``: ``fn``'s output at the positional arrays ``args`` and its VJP under
    the cotangent ``u`` (:func:`random_cotangent` with ``seed`` when None), one gradient per
    argument.

    ``jit=True`` computes the forward and the backward as one compiled program, as a train step
    runs them; ``jit=False`` dispatches op by op, as eager code runs, which compiles every op as
    a program of its own (a few times slower for one check).
    """
    args = tuple(args)
    if not jit:
        out, vjp = jax.vjp(fn, *args)
        u = random_cotangent(out, seed) if u is None else u
        return out, vjp(u), u
    if u is None:
        u = random_cotangent(jax.eval_shape(fn, *args), seed)

    @jax.jit
    def program(args, u):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(u)

    out, grads = program(args, u)
    return out, grads, u


def versus_autodiff(manual_fn: Callable, autodiff_fn: Callable, args, *,
                    names: Optional[Sequence[str]] = None, label: str = "manual",
                    rtol: Optional[float] = None, atol: Optional[float] = None,
                    seed: int = 0, jit: bool = True) -> GradCheck:
    """VJPs of ``manual_fn`` and ``autodiff_fn`` at ``args`` under one random cotangent.

    Every array of ``args`` (positional arguments, each a pytree of arrays, or one pytree) is
    differentiated (close over the rest). Outputs may be pytrees.

    float32 without ``rtol``/``atol``: each VJP is measured against the float64 VJP of
    ``autodiff_fn`` at the same (exactly widened) inputs and cotangent, and a leaf passes when
    the manual error is within ``jbp.accuracy.FACTOR`` times autodiff's own plus
    ``jbp.accuracy.ULPS`` (:func:`jbp.accuracy.judge`; ``GradCheck.float64`` holds that table).
    The rows still show manual against autodiff. Other dtypes, or explicit tolerances: manual
    against autodiff within ``rtol``/``atol``.

    ``jit``: each VJP as one compiled program (the default) or op by op (:func:`vjp_at`).
    """
    manual_leaf_fn, leaves, names = _on_leaves(manual_fn, args, names)
    autodiff_leaf_fn, _, _ = _on_leaves(autodiff_fn, args, None)
    _, got, u = vjp_at(manual_leaf_fn, leaves, seed=seed, jit=jit)
    _, want, _ = vjp_at(autodiff_leaf_fn, leaves, u, jit=jit)
    dtype = _dtype_name(leaves)
    key = ("autodiff", dtype)
    if key not in DEFAULT_TOLERANCES and (rtol is None or atol is None):
        raise TypeError(f"versus_autodiff: no default tolerance for dtype {key[1]}; pass rtol "
                        f"and atol")
    default_rtol, default_atol = DEFAULT_TOLERANCES.get(key, (rtol, atol))
    check = compare(label, "autodiff", got, want, names,
                    rtol=default_rtol if rtol is None else rtol,
                    atol=default_atol if atol is None else atol, detail=dtype)
    if dtype != "float32" or rtol is not None or atol is not None:
        return check
    from jbp import accuracy  # noqa: PLC0415 (accuracy imports the models lazily)
    with jax.enable_x64(True):
        _, reference, _ = vjp_at(autodiff_leaf_fn, accuracy.widen(leaves), accuracy.widen(u),
                                 jit=jit)
    verdict = accuracy.judge(jax.tree.leaves(got), jax.tree.leaves(want),
                             jax.tree.leaves(reference), check.names, label=label,
                             detail="float32")
    rows = tuple(replace(a, ok=v.ok) for a, v in zip(check.args, verdict.rows))
    return GradCheck(label, "autodiff", rows, check.rtol, check.atol,
                     f"float32, judged against float64", float64=verdict)


def _require_float64(leaves, names):
    for name, a in zip(names, leaves):
        if jnp.result_type(a) != jnp.float64:
            raise TypeError(
                f"finite differences need float64 inputs ({name} is "
                f"{jnp.result_type(a)}); enable jax.config.update('jax_enable_x64', True) and "
                f"pass float64 arrays")


def _flat_fn(fn, leaves):
    """fn (of the arrays ``leaves``) as a map from one flat float64 vector to one flat output."""
    sizes = [int(np.size(a)) for a in leaves]
    shapes = [np.shape(a) for a in leaves]
    offsets = np.cumsum([0] + sizes)

    def unflatten(theta):
        return [theta[offsets[i]:offsets[i + 1]].reshape(shapes[i]) for i in range(len(leaves))]

    def flat(theta):
        out = fn(*unflatten(theta))
        return jnp.concatenate([jnp.ravel(o) for o in jax.tree.leaves(out)])

    theta0 = jnp.concatenate([jnp.ravel(jnp.asarray(a)) for a in leaves])
    return flat, theta0, offsets


# Float64 entries one batched evaluation may hold (32 MiB): a chunk of c unit vectors of length
# n and their images of length m holds c·(n + m), never the n×n identity.
JACOBIAN_CHUNK_ENTRIES = 1 << 22


def _chunk_size(n: int, m: int, chunk_entries: int) -> int:
    """Unit vectors per chunk, at least one: c·(n + m) <= chunk_entries."""
    return max(1, min(n, chunk_entries // (n + m)))


def _rows(g, theta, n: int, chunk: int):
    """``[g(theta, e_0); …; g(theta, e_{n-1})]`` for the unit vectors e_j of length n, evaluated
    ``chunk`` at a time under one compiled ``vmap`` (the last chunk padded, then trimmed)."""
    batched = jax.jit(jax.vmap(lambda t, j: g(t, jax.nn.one_hot(j, n, dtype=t.dtype)),
                               in_axes=(None, 0)))
    parts = [batched(theta, jnp.arange(start, start + chunk)) for start in range(0, n, chunk)]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)[:n]


def _block(matrix, tree, offsets):
    """The columns of ``matrix`` per leaf, laid out like the arguments ``tree``."""
    blocks = [matrix[:, offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
    return jax.tree.unflatten(jax.tree.structure(tree), blocks)


def numerical_jacobian(fn: Callable, args, *, step: float = 1e-6,
                       chunk_entries: int = JACOBIAN_CHUNK_ENTRIES):
    """Central-difference Jacobian of ``fn`` at ``args`` (float64): one block per array.

    Returns ``args``' structure (a list for a list of arrays, a dict for a params dict) with, for
    each array ``a``, a block of shape ``(out_size, a.size)``; column j is
    ``(F(θ + h e_j) − F(θ − h e_j)) / 2h`` over the flattened output. Two evaluations per input
    element, batched with ``vmap`` over chunks of ``c = chunk_entries // (n_in + n_out)`` unit
    vectors (at least one), so one evaluation holds ``c·(n_in + n_out)`` floats; the result
    itself holds ``n_out·n_in``.
    """
    leaf_fn, leaves, names = _on_leaves(fn, args, None)
    _require_float64(leaves, names)
    flat, theta0, offsets = _flat_fn(leaf_fn, leaves)
    n_in, n_out = int(theta0.size), int(jax.eval_shape(flat, theta0).shape[0])

    def column(theta, e):
        return (flat(theta + step * e) - flat(theta - step * e)) / (2 * step)

    numeric = _rows(column, theta0, n_in, _chunk_size(n_in, n_out, chunk_entries)).T
    positional, single = _positional(args)
    return _block(numeric, positional[0] if single else args, offsets)


def _full_mode_fits(n_in: int, n_out: int, max_full_size: int) -> bool:
    """``mode="auto"``'s choice: the Jacobian has at most ``max_full_size`` entries, and building
    it both ways (2·n_in perturbed inputs, n_out cotangents, each moving n_in + n_out floats)
    moves at most 16× that: a scalar loss of 400k parameters is checked by directions."""
    return (n_in * n_out <= max_full_size
            and (2 * n_in + n_out) * (n_in + n_out) <= 16 * max_full_size)


def versus_finite_differences(fn: Callable, args, *, mode: str = "auto",
                              names: Optional[Sequence[str]] = None, label: str = "manual",
                              step: float = 1e-6, num_directions: int = 6,
                              max_full_size: int = 400_000,
                              chunk_entries: int = JACOBIAN_CHUNK_ENTRIES,
                              rtol: Optional[float] = None,
                              atol: Optional[float] = None, seed: int = 0) -> GradCheck:
    """The gradients of ``fn`` (its custom rules) against central differences, in float64.

    ``mode``: ``"full"`` (whole Jacobian, both sides built in chunks of ``chunk_entries``
    floats, see :func:`numerical_jacobian`), ``"directions"`` (random projections, one set per
    array), or ``"auto"`` (full when inputs × outputs ≤ ``max_full_size`` entries and the work
    to build it is bounded too, see :func:`_full_mode_fits`).
    """
    leaf_fn, leaves, names = _on_leaves(fn, args, names)
    _require_float64(leaves, names)
    default_rtol, default_atol = DEFAULT_TOLERANCES[("finite differences", "float64")]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    flat, theta0, offsets = _flat_fn(leaf_fn, leaves)
    n_in = int(theta0.size)
    n_out = int(jax.eval_shape(flat, theta0).shape[0])
    if mode == "auto":
        mode = "full" if _full_mode_fits(n_in, n_out, max_full_size) else "directions"
    if mode == "full":
        want = numerical_jacobian(leaf_fn, leaves, step=step, chunk_entries=chunk_entries)
        analytic = _rows(lambda t, e: jax.vjp(flat, t)[1](e)[0], theta0, n_out,  # Jᵀe per row
                         _chunk_size(n_out, n_in, chunk_entries))
        got = _block(analytic, leaves, offsets)
        detail = f"full Jacobian {n_out}x{n_in}"
    elif mode == "directions":
        rng = np.random.default_rng((seed, 0xD1F))
        u = jnp.asarray(rng.standard_normal(n_out), theta0.dtype)
        # Each one compiled program (arrays as arguments, not constants folded into it).
        grad = jax.jit(jax.grad(lambda t, u: jnp.dot(u, flat(t))))(theta0, u)  # Jᵀu, the rule
        projections = jax.jit(jax.vmap(
            lambda d, t, u: jnp.dot(u, flat(t + step * d) - flat(t - step * d)) / (2 * step),
            in_axes=(0, None, None)))
        got, want = [], []
        for i in range(len(leaves)):
            lo, hi = offsets[i], offsets[i + 1]
            v = np.zeros((num_directions, n_in))
            v[:, lo:hi] = rng.standard_normal((num_directions, hi - lo))
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
            v = jnp.asarray(v, theta0.dtype)
            got.append(v @ grad)
            want.append(projections(v, theta0, u))
        detail = f"{num_directions} random directions per argument"
    else:
        raise ValueError(f"mode: expected 'auto', 'full' or 'directions', got {mode!r}")
    return compare(label, "finite differences", got, want, names, rtol=rtol, atol=atol,
                   detail=detail)

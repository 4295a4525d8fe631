"""The one piece of plumbing every layer shares: a hand-written reverse-mode rule.

A jbp layer is three plain functions written side by side in its module:

- ``forward(*args, cfg)``: the maths of the layer in ``jax.numpy``/``lax``. This same function is
  what ``jbp.autodiff`` differentiates with JAX, so the two versions cannot drift apart.
- ``fwd(*args, cfg) -> (out, residuals)``: the forward plus the residuals the backward needs.
- ``bwd(cfg, residuals, g) -> grads``: the document's backward equation.

:func:`manual_rule` ties them together with ``jax.custom_vjp`` (static config as the trailing
``nondiff_argnums``) and returns a callable that also carries the undecorated ``forward`` for the
autodiff twin.

One exception, stated where it is made: a rule may compute the same maths by another
formulation in its own forward (``primal``, which ``fwd`` then uses too) when JAX differentiates
that formulation worse than ``forward``: conv2d's ``rule_only`` forms on CPU (the split
forward for small wide layers, ``jbp._conv_kernels``). The two then agree to rounding, not bit
for bit, and the grid (``tests/test_grid.py``) checks both.

Under ``jax.checkpoint`` the forward still runs once: every ``fwd`` here is plain ``jnp``/``lax``,
so when checkpointing discards the residuals of the primal pass, JAX's partial evaluation and XLA
dead-code elimination drop their computation (``tests/test_transforms.py`` counts the compiled
ops). We deliberately do *not* pass ``optimize_remat=True``: in jax 0.10 it wraps ``fwd`` in a
primitive without higher-order AD rules, so ``jax.grad(jax.grad(f))`` fails with "Linearization
failed to produce known values" (fixed upstream in JAX PR #38452, "fix higher-order AD of
custom_remat"). Second order matters more to jbp than a rewrite DCE already performs;
:data:`OPTIMIZE_REMAT` is the switch, and a canary test reports when JAX has the fix.

A rule may also declare ``quantities`` (``manual_rule(..., quantities=fn)``): per-example
quantities its backward computes from its residuals and ``δ`` (per-example gradients and norms,
K-FAC factors), which leave the backward as cotangents of zero probes passed beside the
arguments (:meth:`ManualRule.with_probes`, ``jbp._probes``, ``jbp.quantities``).

Under ``jax.shard_map`` (``check_vma=True``, the default) every value has a type that says over
which manual mesh axes it *varies* (JAX's "vma"). A replicated parameter ``w`` used with a
batch sharded over ``"data"`` is implicitly broadcast (``pvary``) to a varying value, and the
transpose of that broadcast is a ``psum``: ``∂L/∂w = Σ_devices ∂L_d/∂w``. A custom rule sits
outside that bookkeeping, so :class:`ManualRule` does it once for every layer: the forward
records each differentiable argument's varying axes (static, in the residuals' tree structure)
and the backward ``psum``s each cotangent over (its varying axes − its primal's), or broadcasts
it when it varies over fewer. Outside ``shard_map`` both sets are empty and nothing is added.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

#: Passed to ``custom_vjp.defvjp``; see the module docstring for why it is off.
OPTIMIZE_REMAT = False

_FORWARD_MODE_HINT = (
    "jbp.{name} has a hand-written reverse-mode rule (jax.custom_vjp), and JAX cannot apply "
    "forward-mode differentiation (jax.jvp, jax.jacfwd) to such a rule directly. "
    "Use reverse mode instead: jax.grad, jax.vjp, jax.jacrev; for second order, "
    "reverse-over-reverse (Hessian-vector products as jax.grad of a gradient dot product) or "
    "forward-over-reverse (jax.hessian = jacfwd(jacrev)) both work. If you need "
    "forward mode, use jbp.autodiff.{name}, which has the same signature and forward computation "
    "and is differentiated by JAX."
)


class ManualRule:
    """A forward function paired with a hand-written backward via ``jax.custom_vjp``.

    Calling it runs the custom-VJP version. ``rule.forward`` is the plain forward (what
    ``jbp.autodiff`` differentiates). The trailing ``num_static`` arguments are static
    configuration (hashable) and receive no gradient.
    """

    def __init__(self, name: str, forward: Callable, fwd: Callable, bwd: Callable,
                 num_args: int, num_static: int = 1, primal: Callable = None,
                 quantities: Callable = None):
        self.name = name
        self.quantities = quantities
        self.forward = forward
        static = tuple(range(num_args - num_static, num_args))
        num_diff = num_args - num_static
        self._vjp = jax.custom_vjp(primal or forward, nondiff_argnums=static)

        def fwd_with_axes(*args):
            with jax.named_scope(f"jbp.{name}.fwd"):
                out, res = fwd(*args)
            return out, (res, _ArgAxes(tuple(_varying_axes(a) for a in args[:num_diff])))

        def bwd_with_axes(*args):
            *static_args, (res, arg_axes), g = args
            with jax.named_scope(f"jbp.{name}.bwd"):
                cts = bwd(*static_args, res, g)
            return tuple(_match_axes(ct, axes) for ct, axes in zip(cts, arg_axes.axes))

        self._vjp.defvjp(fwd_with_axes, bwd_with_axes, optimize_remat=OPTIMIZE_REMAT)
        self._probed = None if quantities is None else _probed_vjp(
            name, primal or forward, fwd, bwd, quantities, num_diff, num_static)

    def with_probes(self, probes: tuple, *args: Any):
        """The rule with probes (``jbp._probes``), with the same axis matching under
        ``shard_map`` as the plain rule (a probe's cotangent is ``psum``-ed unless the probe
        varies over the axis, as per-example probes do):
        ``probes`` has one entry per differentiable argument (``None``, or a dict quantity name
        -> zeros); the backward also returns, as their cotangents, the quantities the rule's
        ``quantities`` function computes."""
        if self._probed is None:
            raise ValueError(f"quantities: jbp.{self.name} declares no per-example quantities")
        return self._probed(*args[:len(probes)], probes, *args[len(probes):])

    # Note: inside jax.jit the rule is staged out first, so jax.jvp(jax.jit(f)) fails later, in
    # JAX itself, with JAX's own message ("can't apply forward-mode autodiff (jvp) to a
    # custom_vjp function"); only eager and traced-under-jvp calls get the hint below.
    def __call__(self, *args: Any):
        try:
            return self._vjp(*args)
        except TypeError as err:
            if "forward-mode" in str(err):
                raise TypeError(_FORWARD_MODE_HINT.format(name=self.name)) from err
            raise

    def __repr__(self) -> str:
        return f"ManualRule({self.name})"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _ArgAxes:
    """Each differentiable argument's varying manual axes (``None``: not an array), carried
    as static structure from the forward to the backward of a rule."""

    axes: Tuple[Optional[frozenset], ...]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _ProbeNames:
    """Which quantities each differentiable argument's probes ask for (static structure)."""

    names: Tuple[Optional[tuple], ...]


def _varying_axes(x) -> Optional[frozenset]:
    """The manual mesh axes ``x`` varies over (empty outside ``shard_map``); ``None`` when ``x``
    is not an array."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return None
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _match_axes(ct, primal_axes: Optional[frozenset]):
    """Give a cotangent its primal's varying axes: ``psum`` over the axes only the cotangent
    varies over (the transpose of JAX's implicit broadcast of the primal), broadcast
    (``pcast(..., to="varying")``) over those only the primal varies over."""
    if ct is None or primal_axes is None or not hasattr(ct, "dtype"):
        return ct
    if ct.dtype == jax.dtypes.float0:
        return ct
    ct_axes = _varying_axes(ct)
    extra = ct_axes - primal_axes
    if extra:
        ct = lax.psum(ct, tuple(sorted(extra, key=str)))
    return make_varying(ct, primal_axes)


def make_varying(x, axes: frozenset):
    """``x``, broadcast (``pcast(..., to="varying")``) over those of the manual mesh ``axes``
    it does not vary over yet; ``x`` itself when there are none (always, outside shard_map)."""
    missing = axes - _varying_axes(x)
    if missing:
        x = lax.pcast(x, tuple(sorted(missing, key=str)), to="varying")
    return x


def _probed_vjp(name: str, primal: Callable, fwd: Callable, bwd: Callable,
                quantities: Callable, num_diff: int, num_static: int):
    """``primal(*diff, probes, *static)`` as a ``custom_vjp`` whose backward is the rule's plus
    ``quantities(*static, residuals, g, names)`` for the probes (``jbp._probes``). The probes'
    names travel as static structure; the probes themselves (zeros) are not kept."""
    from jbp._probes import names_of  # noqa: PLC0415  (a leaf module; kept local for clarity)

    def probed_primal(*args):
        return primal(*args[:num_diff], *args[num_diff + 1:])

    static = tuple(range(num_diff + 1, num_diff + 1 + num_static))
    vjp = jax.custom_vjp(probed_primal, nondiff_argnums=static)

    def probed_fwd(*args):
        with jax.named_scope(f"jbp.{name}.fwd"):
            out, res = fwd(*args[:num_diff], *args[num_diff + 1:])
        probes = args[num_diff]
        # varying mesh axes of the arguments and of every probe leaf (as __init__'s rule does)
        axes = _ArgAxes(tuple(_varying_axes(a) for a in args[:num_diff]))
        probe_axes = _ArgAxes(tuple(_varying_axes(p) for p in jax.tree.leaves(probes)))
        return out, (res, _ProbeNames(tuple(names_of(p) for p in probes)), axes, probe_axes)

    def probed_bwd(*args):
        *static_args, (res, names, axes, probe_axes), g = args
        with jax.named_scope(f"jbp.{name}.bwd"):
            cts = bwd(*static_args, res, g)
        cts = tuple(_match_axes(ct, a) for ct, a in zip(cts, axes.axes))
        # Under shard_map a probe that varies over the data axis (per-example: batch_l2,
        # batch_grad) keeps this device's rows; one that does not (sums over the examples:
        # sum_grad_squared, kfac) is psum-ed over the devices, like a parameter's gradient.
        with jax.named_scope(f"jbp.{name}.quantities"):
            qs = tuple(quantities(*static_args, res, g, names.names))
        leaves, tree = jax.tree.flatten(qs)
        qs = jax.tree.unflatten(tree, [_match_axes(q, a)
                                       for q, a in zip(leaves, probe_axes.axes)])
        return (*cts, qs)

    vjp.defvjp(probed_fwd, probed_bwd, optimize_remat=OPTIMIZE_REMAT)
    return vjp


def manual_rule(name: str, forward: Callable, fwd: Callable, bwd: Callable, *,
                num_args: int, num_static: int = 1, primal: Callable = None,
                quantities: Callable = None) -> ManualRule:
    """Build a :class:`ManualRule`; ``num_args`` counts every positional argument. ``primal``
    (default ``forward``) is what the rule computes when not differentiated (module docstring).
    ``quantities(*static, residuals, g, names) -> tuple``: the per-example quantities the
    backward can also give (``jbp._probes``), one dict (or ``None``) per differentiable
    argument, ``names`` saying which."""
    return ManualRule(name, forward, fwd, bwd, num_args, num_static, primal, quantities)


def call_probed(rule, probes: tuple, *args: Any):
    """``rule(*args)``, with ``probes`` (``jbp._probes``) when any argument has some: the
    hand-written rule's probed form. The autodiff twin (a plain forward) has no backward to
    fill probes with, which is an error."""
    if all(p is None for p in probes):
        return rule(*args)
    if not isinstance(rule, ManualRule):
        raise ValueError("quantities: per-example quantities come from jbp's hand-written "
                         "rules; run the model with LayerPolicy('manual'), not 'autodiff'")
    return rule.with_probes(probes, *args)


def cast_like(grad, primal):
    """Cast a cotangent to its primal's dtype (``None`` stays ``None``).

    ``custom_vjp`` silently accepts a float32 cotangent for a bfloat16 primal. Backwards whose
    arithmetic may change dtype (mixed-dtype parameters, float32 accumulation) cast through here;
    the others compute from the cotangent alone, which already has the output's (= input's)
    dtype. The tests check dtype in == dtype out for every layer.
    """
    if grad is None or primal is None:
        return None
    return jnp.asarray(grad).astype(jnp.result_type(primal))


def compute_dtype(dtype) -> jnp.dtype:
    """The dtype to accumulate in: float32 for half precision inputs, else the input dtype."""
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return jnp.dtype(jnp.float32)
    return dtype

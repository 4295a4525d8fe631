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
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

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
                 num_args: int, num_static: int = 1, primal: Callable = None):
        self.name = name
        self.forward = forward
        static = tuple(range(num_args - num_static, num_args))
        self._vjp = jax.custom_vjp(primal or forward, nondiff_argnums=static)
        self._vjp.defvjp(fwd, bwd, optimize_remat=OPTIMIZE_REMAT)

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


def manual_rule(name: str, forward: Callable, fwd: Callable, bwd: Callable, *,
                num_args: int, num_static: int = 1, primal: Callable = None) -> ManualRule:
    """Build a :class:`ManualRule`; ``num_args`` counts every positional argument. ``primal``
    (default ``forward``) is what the rule computes when not differentiated (module docstring)."""
    return ManualRule(name, forward, fwd, bwd, num_args, num_static, primal)


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

"""Probes: how a quantity computed inside a backward rule leaves the backward pass.

A ``jax.custom_vjp`` backward returns exactly one cotangent per primal input and nothing else.
So a rule that is asked for, say, the per-example squared gradient norms of its weight receives
an extra input, a *probe*: a zero array shaped like the quantity (``(N,)`` for ``batch_l2``).
The layer's output does not depend on the probe; its backward *defines* the probe's cotangent to
be the quantity, computed from what the rule holds at that moment: the input ``a_n`` it kept
as a residual and the output gradient ``δ_n`` it received. ``jax.grad`` with respect to the
probes then returns the quantities, under ``jit`` and ``vmap`` like any other cotangent
(``jbp.quantities`` vmaps the backward over the columns of a loss-Hessian factor).

A probe travels with its parameter: :class:`Probed` is a pytree node ``(value, probes)`` that
``jbp.quantities`` puts in place of a parameter array; the layer that receives it
(:func:`unwrap`) passes ``probes`` to its rule (``ManualRule.with_probes``), and the rule's
``quantities`` function (declared beside the rule in the layer's file, ``manual_rule(...,
quantities=...)``) fills them. ``probes`` is a dict from quantity name to zeros:

=====================  ==========================================================  ============
name                   cotangent the rule writes (``g_n`` = this example's            shape
                       gradient of the parameter, from ``a_n`` and ``δ_n``)
=====================  ==========================================================  ============
``batch_grad``         ``g_n`` for every example                                   ``(N, *p)``
``batch_l2``           ``‖g_n‖²``                                                  ``(N,)``
``sum_grad_squared``   ``Σ_n g_n²``                                                ``p``
``kfac``               ``(A, G)``: ``Σ_{n,t} a a^T``, ``(1/T) Σ_{n,t} δ δ^T`` (T       ``(in, in),
                       output positions; weights of dense and conv only)             (out, out)``
=====================  ==========================================================  ============

``δ`` is whatever cotangent reaches the layer: with ``jax.grad`` of a mean loss it carries the
``1/N``, so ``g_n = ∇ℓ_n / N``; seeded with a column of a loss-Hessian factor it is that column
backpropagated (``jbp.quantities`` scales).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: What a rule's ``quantities`` function can write (module docstring).
RULE_QUANTITIES = ("batch_grad", "batch_l2", "sum_grad_squared", "kfac")


@jax.tree_util.register_pytree_node_class
class Probed:
    """A parameter array ``value`` with its ``probes`` (a dict: quantity name -> zeros)."""

    def __init__(self, value, probes):
        self.value = value
        self.probes = probes

    def tree_flatten(self):
        return (self.value, self.probes), None

    @classmethod
    def tree_unflatten(cls, _aux, children):
        return cls(*children)

    def __repr__(self) -> str:
        shape = getattr(self.value, "shape", None)
        return f"Probed(shape={shape}, quantities={sorted(self.probes or ())})"


def unwrap(param):
    """``(value, probes)`` of a :class:`Probed` parameter; ``(param, None)`` otherwise."""
    if isinstance(param, Probed):
        return param.value, param.probes
    return param, None


def names_of(probes) -> tuple:
    """The static names of one argument's probes (``None``: no probes for that argument)."""
    return None if probes is None else tuple(sorted(probes))


def from_per_example(grad_n, names, dtype) -> dict:
    """The quantities ``names`` from materialised per-example gradients ``grad_n`` of shape
    ``(N, *p)``: the generic route, for rules without a cheaper one."""
    out = {}
    for name in names:
        if name == "batch_grad":
            out[name] = grad_n
        elif name == "batch_l2":
            out[name] = jnp.sum(jnp.square(grad_n), axis=tuple(range(1, grad_n.ndim)))
        elif name == "sum_grad_squared":
            out[name] = jnp.sum(jnp.square(grad_n), axis=0)
        else:
            raise ValueError(f"quantities: {name!r} is not defined for this parameter")
    return {k: v.astype(dtype) for k, v in out.items()}


def check_kfac(names, what: str):
    if names and "kfac" in names:
        raise ValueError(f"quantities: 'kfac' factors are defined for the weights of dense and "
                         f"conv2d layers, not for {what}")

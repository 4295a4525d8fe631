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
                       output positions; weights of dense and conv only; grouped     (out, out)``;
                       convolutions: one pair per group, stacked,                    grouped
                       :func:`kfac_shapes`)                                          ``(G, ...)``
=====================  ==========================================================  ============

``δ`` is whatever cotangent reaches the layer: with ``jax.grad`` of a mean loss it carries the
``1/N``, so ``g_n = ∇ℓ_n / N``; seeded with a column of a loss-Hessian factor it is that column
backpropagated (``jbp.quantities`` scales).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

#: What a rule's ``quantities`` function can write (module docstring).
RULE_QUANTITIES = ("batch_grad", "batch_l2", "sum_grad_squared", "kfac")


@jax.tree_util.register_pytree_node_class
class Probed:
    """A parameter array ``value`` with its ``probes`` (a dict: quantity name -> zeros) and its
    ``path`` in the parameter tree (static; names the parameter in :func:`kfac_shapes`)."""

    def __init__(self, value, probes, path=None):
        self.value = value
        self.probes = probes
        self.path = path

    def tree_flatten(self):
        return (self.value, self.probes), self.path

    @classmethod
    def tree_unflatten(cls, path, children):
        return cls(*children, path=path)

    # The parameter's shape, dtype and rank, for model code that reads them (a kernel size
    # from w.shape); anything else goes through a layer, which unwraps it.
    shape = property(lambda self: self.value.shape)
    dtype = property(lambda self: self.value.dtype)
    ndim = property(lambda self: self.value.ndim)

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


# --- K-FAC factor shapes: what the layer knows and the parameter does not ----------------------
#
# The shape of a ``kfac`` probe must be known when jbp.quantities wraps the parameters, but a
# grouped convolution's factors (one pair per group) depend on ``groups``, which only the layer
# sees: a kernel (3, 3, 1, 32) is a depthwise convolution over 32 channels or a plain one over 1.
# So jbp.quantities first traces the forward alone (``jax.eval_shape``) inside
# :func:`noting_kfac_shapes`; each layer that fills ``kfac`` probes states its factors' shapes
# through :func:`kfac_shapes`, and the real pass wraps the parameters with probes of those shapes.

_noted = None          # {path: (A shape, G shape)} while noting_kfac_shapes() is active


@contextlib.contextmanager
def noting_kfac_shapes():
    """Collect ``{path: (A shape, G shape)}`` from the layers run inside (module comment)."""
    global _noted
    outer, _noted = _noted, {}
    try:
        yield _noted
    finally:
        _noted = outer


def kfac_shapes(param, a_shape: tuple, g_shape: tuple) -> None:
    """Called by a layer with its weight ``param`` (possibly :class:`Probed`) and the shapes of
    the factors it writes. While noting, records them; otherwise checks that a ``kfac`` probe
    has those shapes (a probe built by hand for another layout is named, not a JAX error)."""
    if not isinstance(param, Probed) or "kfac" not in (param.probes or {}):
        return
    if _noted is not None:
        if param.path is not None:
            _noted[param.path] = (tuple(a_shape), tuple(g_shape))
        return
    got = tuple(tuple(p.shape) for p in param.probes["kfac"])
    if got != (tuple(a_shape), tuple(g_shape)):
        raise ValueError(f"quantities: the 'kfac' probe of {param.path or 'a weight'} has shapes "
                         f"{got}; this layer writes factors of shapes "
                         f"{(tuple(a_shape), tuple(g_shape))}")


def check_kfac(names, what: str):
    if names and "kfac" in names:
        raise ValueError(f"quantities: 'kfac' factors are defined for the weights of dense and "
                         f"conv2d layers, not for {what}")

"""The same layers differentiated by JAX: no custom rule anywhere.

``jbp.autodiff.X`` has the signature, argument checks and forward computation of ``jbp.X``: both
are made by ``jbp._registry.layer`` from the one body written in the layer's file, the manual
version with the hand-written rule, this one with the rule's plain ``forward``. Only the backward
differs: here JAX derives it. Use it as the reference for the hand-written rules, or where
forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is needed.
"""

from jbp import _registry

globals().update({name: entry.autodiff for name, entry in _registry.layers().items()})
__all__ = list(_registry.layers())

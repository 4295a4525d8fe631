"""The hand-written-VJP layers, under an explicit name: ``jbp.manual.X is jbp.X``.

Read from the one table of layers (``jbp._registry``)."""

from jbp import _registry

globals().update({name: entry.manual for name, entry in _registry.layers().items()})
__all__ = list(_registry.layers())

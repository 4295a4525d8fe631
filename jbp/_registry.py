"""The one table of layers: each public layer is declared once, beside its rule.

A layer's public function is written once, at the top level of its file, with the rules it
calls as its leading parameters::

    @layer(_dense_rule)
    def dense(rule, x, w, b=None):
        \"\"\"Fully connected layer ...\"\"\"
        _check_dense(x, w, b)
        return rule(x, w, b, None)

``layer`` makes two functions of it with the public signature ``dense(x, w, b=None)``:

- ``jbp.dense`` (= ``jbp.manual.dense``): the body with the hand-written rule;
- ``jbp.autodiff.dense``: the same body with each rule's plain ``forward``, which JAX
  differentiates; the argument checks and the forward computation are the same code.

An argument of ``layer`` is a :class:`jbp._rule.ManualRule` (its twin is ``rule.forward``) or
another declared layer (its twin is that layer's autodiff version: conv2d's padding modes call
``pad``). ``options`` names the keyword arguments a :class:`jbp.policy.LayerPolicy` binds into
every call of the layer (``residuals``, ``axis_name``).

:data:`REGISTRY` maps each name to its :class:`Layer`, in the order the files are imported
(``jbp/layers/`` then ``jbp/losses/``, each alphabetically, a file's dependencies first);
``jbp``, ``jbp.manual``, ``jbp.autodiff`` and ``jbp.LAYERS`` are read from it. A layer's file is
found by :func:`layers`, which imports every module of the ``jbp.layers`` and ``jbp.losses``
packages: adding a layer touches only its own file.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import pkgutil
from typing import Callable, Dict, FrozenSet

from jbp._rule import ManualRule

#: The packages whose modules declare layers.
PACKAGES = ("jbp.layers", "jbp.losses")
#: The keyword options a layer may let a ``jbp.LayerPolicy`` bind (the policy's fields).
OPTIONS = ("residuals", "axis_name")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One public layer: its hand-written version, its autodiff twin, and the options a layer
    policy may bind into it."""

    name: str
    manual: Callable
    autodiff: Callable
    options: FrozenSet[str] = frozenset()


REGISTRY: Dict[str, Layer] = {}
_TWIN: Dict[Callable, Callable] = {}     # a declared layer's manual function -> its twin


def _twin(rule) -> Callable:
    if isinstance(rule, ManualRule):
        return rule.forward
    if rule in _TWIN:
        return _TWIN[rule]
    raise TypeError(f"layer: expected a ManualRule or a declared layer, got {rule!r}")


def _bind(body: Callable, rules: tuple, signature: inspect.Signature) -> Callable:
    def layer_fn(*args, **kwargs):
        return body(*rules, *args, **kwargs)

    functools.update_wrapper(layer_fn, body)
    del layer_fn.__wrapped__                 # the public signature is the one below
    layer_fn.__signature__ = signature
    return layer_fn


def layer(*rules, options=()):
    """Declare the decorated function as a public layer (module docstring); returns its
    hand-written version."""
    for name in options:
        if name not in OPTIONS:
            raise ValueError(f"layer: unknown option {name!r}; options: {OPTIONS}")

    def declare(body: Callable) -> Callable:
        signature = inspect.signature(body)
        params = list(signature.parameters.values())
        public = signature.replace(parameters=params[len(rules):])
        missing = [o for o in options if o not in public.parameters]
        if missing:
            raise TypeError(f"layer {body.__name__}: options {missing} are not parameters")
        if body.__name__ in REGISTRY:
            raise ValueError(f"layer {body.__name__!r} is declared twice "
                             f"({REGISTRY[body.__name__].manual.__module__} and "
                             f"{body.__module__})")
        manual = _bind(body, rules, public)
        autodiff = _bind(body, tuple(_twin(r) for r in rules), public)
        REGISTRY[body.__name__] = Layer(body.__name__, manual, autodiff, frozenset(options))
        _TWIN[manual] = autodiff
        return manual

    return declare


@functools.lru_cache(maxsize=None)
def _import_all() -> None:
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{package_name}.{info.name}")


def layers() -> Dict[str, Layer]:
    """Every declared layer, by name (the files of :data:`PACKAGES` imported first)."""
    _import_all()
    return REGISTRY

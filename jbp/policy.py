"""What a model's layers are: one explicit object every model receives.

A model is written once against a namespace of layers (``layers.conv2d(...)``,
``layers.batch_norm(...)``); :class:`LayerPolicy` is that namespace, and it says everything
about the layers that is not the model's own business:

- ``grad``: ``"manual"`` runs jbp's hand-written rules, ``"autodiff"`` the same forwards
  differentiated by JAX (``jbp.autodiff``);
- ``residuals``: what the conv2d, batch-norm and ReLU rules keep for the backward (``"exact"``,
  ``"bf16"``, ``"int8"``; ``jbp._residuals``), hand-written rules only;
- ``axis_name``: the ``jax.shard_map`` mesh axis batch norm synchronises its statistics over
  (``None``: each device's batch alone).

The options reach exactly the layers that declare them (``jbp._registry.layer(options=...)``),
as keyword arguments. The X-ray (``jbp.xray``) and the float32 verdict (``jbp.accuracy``) wrap a
policy to record each call, and pass the wrapper where a model takes ``layers``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Hashable, Optional

from jbp import _registry, _residuals

GRAD_MODES = ("manual", "autodiff")


@dataclasses.dataclass(frozen=True)
class LayerPolicy:
    """The layers a model calls: ``policy.conv2d`` is ``jbp.conv2d`` or ``jbp.autodiff.conv2d``
    with the policy's options bound. Frozen and hashable (a static argument under jit)."""

    grad: str = "manual"
    residuals: str = "exact"
    axis_name: Optional[Hashable] = None

    def __post_init__(self):
        if self.grad not in GRAD_MODES:
            raise ValueError(f"grad: expected one of {GRAD_MODES}, got {self.grad!r}")
        _residuals.check(self.residuals)
        if self.residuals != "exact" and self.grad != "manual":
            raise ValueError(f"residuals={self.residuals!r} is a policy of jbp's rules; with "
                             f"grad={self.grad!r} JAX keeps its own residuals")

    def __getattr__(self, name: str) -> Callable:
        return _bound(self, name)


@functools.lru_cache(maxsize=None)
def _bound(policy: LayerPolicy, name: str) -> Callable:
    layer = _registry.layers().get(name)
    if layer is None:
        raise AttributeError(f"LayerPolicy has no layer {name!r}; the layers are "
                             f"{', '.join(_registry.layers())}")
    fn = layer.manual if policy.grad == "manual" else layer.autodiff
    bound = {option: getattr(policy, option) for option in sorted(layer.options)
             if getattr(policy, option) != _DEFAULTS[option]}
    return functools.partial(fn, **bound) if bound else fn


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LayerPolicy)}


def resolve(grad: Optional[str] = None, layers: Optional[LayerPolicy] = None) -> LayerPolicy:
    """The policy of a function that takes ``grad="manual"`` / ``"autodiff"`` (the shorthand for
    ``LayerPolicy(grad)``) or ``layers=LayerPolicy(...)`` (with its options), not both at odds;
    neither: ``LayerPolicy()``, the hand-written rules."""
    if layers is None:
        return LayerPolicy("manual" if grad is None else grad)
    if not isinstance(layers, LayerPolicy):
        raise TypeError(f"layers: expected a jbp.LayerPolicy, got {layers!r}")
    if grad is not None and grad != layers.grad:
        raise ValueError(f"grad={grad!r} and layers={layers!r} disagree; pass one of them")
    return layers

"""One configuration of one layer to check: :class:`Case`, the grid's unit
(:mod:`jbp.testing.grid`, :mod:`jbp.testing.option_grid`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Tuple

import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Case:
    """One layer configuration to check.

    ``call(ns)`` returns ``f(*args)`` built from namespace ``ns`` (``jbp`` or ``jbp.autodiff``);
    ``kwargs`` is the layer's keyword configuration that ``f`` passes on (conv2d's ``stride``,
    ``padding``, ``dilation``, ``groups``; a pool's ``window``...; ``{}`` where there is none);
    ``torch(*tensors)`` computes the same map with PyTorch on NHWC float64 tensors, or is None.
    """

    layer: str
    config: str
    shapes: Tuple[Tuple[int, ...], ...]
    names: Tuple[str, ...]
    call: Callable
    torch: Optional[Callable] = None
    make: Optional[Callable] = None          # (rng, shapes) -> list of numpy arrays
    tags: Tuple[str, ...] = field(default=())
    kwargs: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        return f"{self.layer}[{self.config}]"

    def args(self, dtype=jnp.float32, seed: int = 0):
        rng = np.random.default_rng(seed)
        arrays = self.make(rng, self.shapes) if self.make else [
            rng.standard_normal(s) for s in self.shapes]
        return tuple(jnp.asarray(a, dtype) for a in arrays)

    def fn(self, ns):
        return self.call(ns)

"""EfficientNet-B0's family at a tiny size, for tests about what the blocks do rather than about
B0's depth and widths (those are tests/test_torch_weights.py's and tests/test_models.py's).

``TINY_EFFICIENTNET`` is built by jbp.models.mobilenet's own code from a four-block spec that
holds every kind of block B0 has: an MBConv without expansion (t = 1, 3×3), an expanding one with
a 5×5 stride-2 depthwise convolution, one with a shortcut (and so stochastic depth), and a 3×3
stride-2 one; squeeze-and-excitation and SiLU in all of them, batch norm after every convolution,
dropout before the classifier. Its float64 programs compile in a few seconds where B0's take a
minute on two cores (docs/testing.md).
"""

from __future__ import annotations

from typing import Optional

import jax

from jbp.models import Model, mobilenet
from jbp.policy import LayerPolicy

SPEC = mobilenet.Spec("tiny_efficientnet", "silu",
                      ((1, 3, 1, 4, 1), (6, 5, 2, 8, 2), (6, 3, 2, 12, 1)), se=True,
                      stem_width=8, head_width=32)


def _init(key, input_shape=(32, 32, 3), num_classes=10):
    return mobilenet._init(SPEC, key, input_shape, num_classes)


def _apply(params, state, x, *, train, layers=LayerPolicy(), key: Optional[jax.Array] = None,
           dropout: float = 0.2, stochastic_depth: float = 0.2, remat: str = "none"):
    mobilenet._check_rates(dropout, stochastic_depth)
    return mobilenet._apply(SPEC, params, state, x, train, layers, key, dropout,
                            stochastic_depth, remat)


TINY_EFFICIENTNET = Model("tiny_efficientnet", _init, _apply)

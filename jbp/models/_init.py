"""Parameter initialisers of the models: the public :mod:`jbp.init`, under the models' names."""

from __future__ import annotations

import jax.numpy as jnp

from jbp import init as _init
from jbp.init import batch_norm, conv  # noqa: F401  (He-normal HWIO kernel, zero bias)
from jbp.init import scaled_normal, scaled_uniform  # noqa: F401  (one compiled draw per shape)

_BY_GAIN = {2.0: "he_normal", 1.0: "lecun_normal"}


def dense(key, fan_in, fan_out, *, gain=2.0, dtype=jnp.float32):
    """Normal (in, out) weights with std √(gain / fan_in): gain 2 is He (ReLU layers), gain 1
    LeCun (the classifier); zero bias."""
    if gain not in _BY_GAIN:
        raise ValueError(f"gain: expected one of {tuple(_BY_GAIN)}, got {gain!r}")
    return _init.dense(key, fan_in, fan_out, scheme=_BY_GAIN[gain], dtype=dtype)


def check_layers(layers):
    """The namespace a model takes its layers from: a ``jbp.LayerPolicy`` (or a wrapper of one,
    such as the X-ray's recorder); a string is a mistake worth naming."""
    if isinstance(layers, str) or not hasattr(layers, "conv2d"):
        raise TypeError(f"layers: expected a jbp.LayerPolicy, e.g. LayerPolicy('manual') or "
                        f"LayerPolicy('autodiff'), got {layers!r}")
    return layers


def check_input(x, input_shape_hint: str):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x: expected a batch of NHWC images (N, H, W, C) {input_shape_hint}, "
                         f"got shape {getattr(x, 'shape', type(x).__name__)}")

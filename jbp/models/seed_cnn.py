"""The source document's example network: one 2×2 convolution, ReLU, one fully connected layer.

    conv 2×2 (1 filter, VALID, bias) -> ReLU -> flatten -> dense(num_classes)

On the document's 2×2 input the convolution yields one activation (see scripts/seed_example.py);
on MNIST's 28×28 it yields 27×27 features, a small but trainable classifier.
"""

from __future__ import annotations

import jax

from jbp.models import _init
from jbp.policy import LayerPolicy


def init(key, input_shape=(2, 2, 1), num_classes=3):
    h, w, c = input_shape
    k_conv, k_fc = jax.random.split(key)
    params = {"conv": _init.conv(k_conv, 2, 2, c, 1),
              "fc": _init.dense(k_fc, (h - 1) * (w - 1), num_classes, gain=1.0)}
    return params, {}


def apply(params, state, x, *, train, layers=LayerPolicy()):
    """x (N, H, W, C) -> logits (N, num_classes); no state (no batch norm)."""
    del train                                  # no dropout or batch norm
    nn = _init.check_layers(layers)
    _init.check_input(x, "for seed_cnn")
    z1 = nn.conv2d(x, params["conv"]["w"], params["conv"]["b"], padding="VALID")
    a1 = nn.relu(z1)
    return nn.dense(nn.flatten(a1), params["fc"]["w"], params["fc"]["b"]), state


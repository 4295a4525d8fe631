"""LeNet-5 (LeCun et al., 1998), with ReLU and max pooling:

    conv 5×5 (6, SAME) -> ReLU -> max-pool 2 -> conv 5×5 (16, VALID) -> ReLU -> max-pool 2
    -> flatten -> fc 120 -> ReLU -> fc 84 -> ReLU -> fc num_classes

On 28×28×1 (MNIST): 28 -> 14 -> 10 -> 5, so 5·5·16 = 400 features (the classic layout, with the
first convolution padded as LeCun's 32×32 inputs were). On 32×32×3: 32 -> 16 -> 12 -> 6.
"""

from __future__ import annotations

import jax

from jbp.models import _init
from jbp.policy import LayerPolicy


def _features(h, w):
    h, w = h // 2, w // 2                       # SAME conv keeps H×W; pool halves it
    h, w = (h - 4) // 2, (w - 4) // 2           # VALID 5×5 conv, then pool
    return h * w * 16


def init(key, input_shape=(28, 28, 1), num_classes=10):
    h, w, c = input_shape
    if min(h, w) < 12:
        raise ValueError(f"input_shape: lenet5 needs images of at least 12×12, got {input_shape}")
    k = jax.random.split(key, 5)
    params = {
        "conv1": _init.conv(k[0], 5, 5, c, 6),
        "conv2": _init.conv(k[1], 5, 5, 6, 16),
        "fc1": _init.dense(k[2], _features(h, w), 120),
        "fc2": _init.dense(k[3], 120, 84),
        "fc3": _init.dense(k[4], 84, num_classes, gain=1.0),
    }
    return params, {}


def apply(params, state, x, *, train, layers=LayerPolicy()):
    """x (N, H, W, C) -> logits (N, num_classes); no state (no batch norm)."""
    del train
    nn = _init.check_layers(layers)
    _init.check_input(x, "for lenet5")
    p = params
    h = nn.max_pool(nn.relu(nn.conv2d(x, p["conv1"]["w"], p["conv1"]["b"], padding="SAME")), 2)
    h = nn.max_pool(nn.relu(nn.conv2d(h, p["conv2"]["w"], p["conv2"]["b"], padding="VALID")), 2)
    h = nn.flatten(h)
    h = nn.relu(nn.dense(h, p["fc1"]["w"], p["fc1"]["b"]))
    h = nn.relu(nn.dense(h, p["fc2"]["w"], p["fc2"]["b"]))
    return nn.dense(h, p["fc3"]["w"], p["fc3"]["b"]), state


"""Residual networks (He et al., 2016) from jbp layers: ResNet-20 and ResNet-18.

Both stack *basic blocks*::

    x ─ conv3×3(stride s) ─ BN ─ ReLU ─ conv3×3 ─ BN ─(+)─ ReLU
    └──────────── shortcut: identity, or conv1×1(stride s) ─ BN ─┘   (projection)

- ResNet-20 (CIFAR style): conv3×3(16) ─ BN ─ ReLU, three stages of 3 blocks with 16/32/64
  channels (stride 2 entering stages 2 and 3), global average pool, fc. 28×28×1 -> 28, 14, 7;
  32×32×3 -> 32, 16, 8.
- ResNet-18 (ImageNet style, the document's "real-world example"): conv7×7(64, stride 2) ─ BN ─
  ReLU ─ max-pool 3×3 stride 2, four stages of 2 blocks with 64/128/256/512 channels, global
  average pool, fc to 1000 classes by default.

Convolutions before batch norm carry no bias (BN's β replaces it). Projection shortcuts are used
wherever the shape changes.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax

from jbp.models import _init as _init_lib
from jbp.models import layers


def _bn(nn, p, s, x, train):
    y, (mean, var) = nn.batch_norm(x, p["gamma"], p["beta"], s["mean"], s["var"], train=train)
    return y, {"mean": mean, "var": var}


def _init_block(key, cin, cout, stride):
    k1, k2, k3 = jax.random.split(key, 3)
    params, state = {}, {}
    params["conv1"] = _init_lib.conv(k1, 3, 3, cin, cout, bias=False)
    params["bn1"], state["bn1"] = _init_lib.batch_norm(cout)
    params["conv2"] = _init_lib.conv(k2, 3, 3, cout, cout, bias=False)
    params["bn2"], state["bn2"] = _init_lib.batch_norm(cout)
    if stride != 1 or cin != cout:
        params["proj"] = _init_lib.conv(k3, 1, 1, cin, cout, bias=False)
        params["proj_bn"], state["proj_bn"] = _init_lib.batch_norm(cout)
    return params, state


def _block(nn, p, s, x, stride, train):
    new = {}
    h = nn.conv2d(x, p["conv1"]["w"], stride=stride, padding=1)
    h, new["bn1"] = _bn(nn, p["bn1"], s["bn1"], h, train)
    h = nn.relu(h)
    h = nn.conv2d(h, p["conv2"]["w"], padding=1)
    h, new["bn2"] = _bn(nn, p["bn2"], s["bn2"], h, train)
    if "proj" in p:
        shortcut = nn.conv2d(x, p["proj"]["w"], stride=stride, padding="VALID")
        shortcut, new["proj_bn"] = _bn(nn, p["proj_bn"], s["proj_bn"], shortcut, train)
    else:
        shortcut = x
    return nn.relu(h + shortcut), new


def _init_stages(key, cin, spec: Spec):
    params, state = [], []
    widths, blocks, strides = spec.widths, spec.blocks, spec.block_strides
    keys = jax.random.split(key, len(widths) * blocks)
    for i, cout in enumerate(widths):
        for j in range(blocks):
            stride = strides[i * blocks + j]
            p, s = _init_block(keys[i * blocks + j], cin, cout, stride)
            params.append(p)
            state.append(s)
            cin = cout
    return params, state


def _apply_stages(nn, params, state, h, strides, train):
    new_state = []
    for p, s, stride in zip(params, state, strides):
        h, ns = _block(nn, p, s, h, stride, train)
        new_state.append(ns)
    return h, new_state


# --- the two networks -------------------------------------------------------------------------

class Spec(NamedTuple):
    """What differs between ResNet-20 and ResNet-18."""

    name: str
    stem_kernel: int        # stem convolution: kernel, stride, padding
    stem_stride: int
    stem_padding: int
    stem_pool: bool         # 3×3 stride-2 max pool after the stem
    widths: Tuple[int, ...]
    blocks: int             # basic blocks per stage
    min_size: int           # smallest input height/width accepted

    @property
    def block_strides(self) -> Tuple[int, ...]:
        """Stride of each basic block, in order: 2 entering every stage but the first, else 1."""
        return tuple(2 if (j == 0 and i > 0) else 1
                     for i in range(len(self.widths)) for j in range(self.blocks))


RESNET20 = Spec("resnet20", 3, 1, 1, False, (16, 32, 64), 3, 4)
RESNET18 = Spec("resnet18", 7, 2, 3, True, (64, 128, 256, 512), 2, 32)


def _init(spec: Spec, key, input_shape, num_classes):
    h, w, c = input_shape
    if min(h, w) < spec.min_size:
        raise ValueError(f"input_shape: {spec.name} needs images of at least "
                         f"{spec.min_size}×{spec.min_size}, got {input_shape}")
    k_stem, k_stages, k_fc = jax.random.split(key, 3)
    width = spec.widths[0]
    params, state = {}, {}
    k = spec.stem_kernel
    params["stem"] = _init_lib.conv(k_stem, k, k, c, width, bias=False)
    params["stem_bn"], state["stem_bn"] = _init_lib.batch_norm(width)
    params["blocks"], state["blocks"] = _init_stages(k_stages, width, spec)
    params["fc"] = _init_lib.dense(k_fc, spec.widths[-1], num_classes, gain=1.0)
    return params, state


def _apply(spec: Spec, params, state, x, train, grad):
    nn = layers(grad)
    _init_lib.check_input(x, f"for {spec.name}")
    new = {}
    h = nn.conv2d(x, params["stem"]["w"], stride=spec.stem_stride, padding=spec.stem_padding)
    h, new["stem_bn"] = _bn(nn, params["stem_bn"], state["stem_bn"], h, train)
    h = nn.relu(h)
    if spec.stem_pool:
        h = nn.max_pool(h, 3, stride=2, padding=1)
    h, new["blocks"] = _apply_stages(nn, params["blocks"], state["blocks"], h,
                                     spec.block_strides, train)
    h = nn.global_avg_pool(h)
    return nn.dense(h, params["fc"]["w"], params["fc"]["b"]), new


def init_resnet20(key, input_shape=(32, 32, 3), num_classes=10):
    """ResNet-20 parameters and batch-norm state for NHWC images of ``input_shape``."""
    return _init(RESNET20, key, input_shape, num_classes)


def apply_resnet20(params, state, x, *, train, grad="manual"):
    """x (N, H, W, C) -> logits (N, num_classes), new batch-norm state."""
    return _apply(RESNET20, params, state, x, train, grad)


def init_resnet18(key, input_shape=(224, 224, 3), num_classes=1000):
    """ResNet-18 parameters and batch-norm state for NHWC images of ``input_shape``."""
    return _init(RESNET18, key, input_shape, num_classes)


def apply_resnet18(params, state, x, *, train, grad="manual"):
    """x (N, H, W, C) -> logits (N, num_classes), new batch-norm state."""
    return _apply(RESNET18, params, state, x, train, grad)

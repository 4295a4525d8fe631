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

Options (``jbp.models.from_config``): ``shortcuts=False`` drops every shortcut (identity and
projection), the *plain* network of He et al.'s Fig. 1; ``batch_norm=False`` drops every batch
norm (the convolutions then carry a bias); ``remat="blocks"`` wraps each basic block in
``jax.checkpoint``: its activations are recomputed in the backward instead of kept.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax

from jbp.models import _init as _init_lib
from jbp.policy import LayerPolicy


def _bn(nn, p, s, x, train):
    if p is None:                                   # batch_norm=False: nothing to normalise
        return x, {}
    y, (mean, var) = nn.batch_norm(x, p["gamma"], p["beta"], s["mean"], s["var"], train=train)
    return y, {"mean": mean, "var": var}


def _conv(nn, p, x, **kw):
    return nn.conv2d(x, p["w"], p.get("b"), **kw)


def _init_conv_bn(params, state, key, name, bn_name, kh, cin, cout, bn):
    params[name] = _init_lib.conv(key, kh, kh, cin, cout, bias=not bn)
    if bn:
        params[bn_name], state[bn_name] = _init_lib.batch_norm(cout)


def _init_block(key, cin, cout, stride, shortcuts=True, bn=True):
    k1, k2, k3 = jax.random.split(key, 3)
    params, state = {}, {}
    _init_conv_bn(params, state, k1, "conv1", "bn1", 3, cin, cout, bn)
    _init_conv_bn(params, state, k2, "conv2", "bn2", 3, cout, cout, bn)
    if shortcuts and (stride != 1 or cin != cout):
        _init_conv_bn(params, state, k3, "proj", "proj_bn", 1, cin, cout, bn)
    return params, state


def _block(nn, p, s, x, stride, train, shortcuts=True):
    new = {}
    h = _conv(nn, p["conv1"], x, stride=stride, padding=1)
    h, new["bn1"] = _bn(nn, p.get("bn1"), s.get("bn1"), h, train)
    h = nn.relu(h)
    h = _conv(nn, p["conv2"], h, padding=1)
    h, new["bn2"] = _bn(nn, p.get("bn2"), s.get("bn2"), h, train)
    if not shortcuts:
        return nn.relu(h), {k: v for k, v in new.items() if v}
    if "proj" in p:
        shortcut = _conv(nn, p["proj"], x, stride=stride, padding="VALID")
        shortcut, new["proj_bn"] = _bn(nn, p.get("proj_bn"), s.get("proj_bn"), shortcut, train)
    else:
        shortcut = x
    return nn.relu(h + shortcut), {k: v for k, v in new.items() if v}


def _init_stages(key, cin, spec: "Spec", shortcuts=True, bn=True):
    params, state = [], []
    widths, blocks, strides = spec.widths, spec.blocks, spec.block_strides
    keys = jax.random.split(key, len(widths) * blocks)
    for i, cout in enumerate(widths):
        for j in range(blocks):
            stride = strides[i * blocks + j]
            p, s = _init_block(keys[i * blocks + j], cin, cout, stride, shortcuts, bn)
            params.append(p)
            state.append(s)
            cin = cout
    return params, state


def _apply_stages(nn, params, state, h, strides, train, shortcuts=True, remat="none"):
    new_state = []
    for p, s, stride in zip(params, state, strides):
        def block(p, s, h, stride=stride):
            return _block(nn, p, s, h, stride, train, shortcuts)
        if remat == "blocks":
            block = jax.checkpoint(block)
        h, ns = block(p, s, h)
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


def _init(spec: Spec, key, input_shape, num_classes, shortcuts=True, batch_norm=True):
    h, w, c = input_shape
    if min(h, w) < spec.min_size:
        raise ValueError(f"input_shape: {spec.name} needs images of at least "
                         f"{spec.min_size}×{spec.min_size}, got {input_shape}")
    k_stem, k_stages, k_fc = jax.random.split(key, 3)
    width = spec.widths[0]
    params, state = {}, {}
    k = spec.stem_kernel
    _init_conv_bn(params, state, k_stem, "stem", "stem_bn", k, c, width, batch_norm)
    params["blocks"], state["blocks"] = _init_stages(k_stages, width, spec, shortcuts,
                                                     batch_norm)
    params["fc"] = _init_lib.dense(k_fc, spec.widths[-1], num_classes, gain=1.0)
    return params, state


def _apply(spec: Spec, params, state, x, train, layers, shortcuts=True, remat="none"):
    nn = _init_lib.check_layers(layers)
    _init_lib.check_input(x, f"for {spec.name}")
    new = {}
    h = _conv(nn, params["stem"], x, stride=spec.stem_stride, padding=spec.stem_padding)
    h, stem_bn = _bn(nn, params.get("stem_bn"), state.get("stem_bn"), h, train)
    if stem_bn:
        new["stem_bn"] = stem_bn
    h = nn.relu(h)
    if spec.stem_pool:
        h = nn.max_pool(h, 3, stride=2, padding=1)
    h, new["blocks"] = _apply_stages(nn, params["blocks"], state["blocks"], h,
                                     spec.block_strides, train, shortcuts, remat)
    h = nn.global_avg_pool(h)
    return nn.dense(h, params["fc"]["w"], params["fc"]["b"]), new


def init_resnet20(key, input_shape=(32, 32, 3), num_classes=10, *, shortcuts=True,
                  batch_norm=True):
    """ResNet-20 parameters and batch-norm state for NHWC images of ``input_shape``."""
    return _init(RESNET20, key, input_shape, num_classes, shortcuts, batch_norm)


def apply_resnet20(params, state, x, *, train, layers=LayerPolicy(), shortcuts=True,
                   remat="none"):
    """x (N, H, W, C) -> logits (N, num_classes), new batch-norm state."""
    return _apply(RESNET20, params, state, x, train, layers, shortcuts, remat)


def init_resnet18(key, input_shape=(224, 224, 3), num_classes=1000, *, shortcuts=True,
                  batch_norm=True):
    """ResNet-18 parameters and batch-norm state for NHWC images of ``input_shape``."""
    return _init(RESNET18, key, input_shape, num_classes, shortcuts, batch_norm)


def apply_resnet18(params, state, x, *, train, layers=LayerPolicy(), shortcuts=True,
                   remat="none"):
    """x (N, H, W, C) -> logits (N, num_classes), new batch-norm state."""
    return _apply(RESNET18, params, state, x, train, layers, shortcuts, remat)


#: The options of ``jbp.config.ModelConfig`` both networks have (``jbp.models.from_config``).
OPTIONS = frozenset({"shortcuts", "batch_norm", "remat"})

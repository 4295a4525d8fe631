"""Inverted-residual networks from jbp layers: MobileNetV2 and EfficientNet-B0, as torchvision
builds them (``torchvision.models.mobilenet_v2``, ``efficientnet_b0``; 3,504,872 and 5,288,548
parameters at 1000 classes).

Both stack *inverted residual* blocks (Sandler et al., 2018), EfficientNet's with
squeeze-and-excitation (Hu et al., 2018) and stochastic depth (Huang et al., 2016) — its MBConv::

    x ─ conv1×1 (expand ×t) ─ BN ─ act ─ depthwise k×k (stride s) ─ BN ─ act ─ [SE] ─ conv1×1
        (project) ─ BN ─ [stochastic depth] ─(+ x, only where s = 1 and C_in = C_out)

    SE:  s = σ(fc2(act(fc1(global_avg_pool(h)))));  h ⊙ s       (fc1: C -> max(1, C_in // 4))

- MobileNetV2: conv3×3(32, stride 2) ─ BN ─ ReLU6, 17 blocks (t, c, n, s) = (1,16,1,1),
  (6,24,2,2), (6,32,3,2), (6,64,4,2), (6,96,3,1), (6,160,3,2), (6,320,1,1), all 3×3, ReLU6, no SE,
  no stochastic depth; conv1×1(1280) ─ BN ─ ReLU6, global average pool, dropout 0.2, fc.
- EfficientNet-B0: conv3×3(32, stride 2) ─ BN ─ SiLU, 16 MBConv blocks (t, k, s, c, n) =
  (1,3,1,16,1), (6,3,2,24,2), (6,5,2,40,2), (6,3,2,80,3), (6,5,1,112,3), (6,5,2,192,4),
  (6,3,1,320,1), SiLU, SE; block ``i`` of 16 drops its branch with probability ``0.2 · i / 16``
  (torchvision's linear schedule; blocks without a shortcut have none to drop);
  conv1×1(1280) ─ BN ─ SiLU, global average pool, dropout 0.2, fc.

Every convolution is padded ``(k − 1) // 2`` on each side, as torchvision's (XLA's "SAME" would
pad stride-2 layers asymmetrically), and carries no bias; batch norm uses PyTorch's defaults in
both (``eps = 1e-5``, PyTorch ``momentum = 0.1``, i.e. jbp's ``momentum = 0.9``: torchvision's
``efficientnet_b0`` builds plain ``nn.BatchNorm2d``; only its B5–B7 pass ``eps = 1e-3,
momentum = 0.01`` and its V2 models ``eps = 1e-3``). The float64 comparison with torchvision
checks the updated running statistics, and with them this choice. The
depthwise kernels are HWIO ``(k, k, 1, C)`` with ``groups = C``; SE's two 1×1 convolutions on a
1×1 map are ``dense`` layers ``(C, C_se)`` and ``(C_se, C)``.

``apply(..., key=None)``: the PRNG key of dropout and stochastic depth in training mode (the train
step passes one per step and device). Without a key (``None``) both are off, also in training
mode: what the gradient checks, the X-ray and the float32 verdict compare. ``dropout`` and
``stochastic_depth`` set the rates (torchvision's 0.2). ``remat="blocks"`` wraps each block in
``jax.checkpoint``. Inputs of any size from 32×32 (the five stride-2 layers take 32 to 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jbp import _checks
from jbp.models import _init as _init_lib
from jbp.policy import LayerPolicy


class Block(NamedTuple):
    """One inverted-residual block."""

    cin: int
    cout: int
    expand: int             # t: the hidden width is cin · t (no expansion conv when t = 1)
    kernel: int
    stride: int
    se: bool                # squeeze-and-excitation, C_se = max(1, cin // 4)
    drop_rate: float        # stochastic depth's share of the model's rate (0 without shortcut)

    @property
    def hidden(self) -> int:
        return self.cin * self.expand

    @property
    def shortcut(self) -> bool:
        return self.stride == 1 and self.cin == self.cout


class Spec(NamedTuple):
    name: str
    activation: str         # "relu6" | "silu"
    stages: Tuple[Tuple[int, int, int, int, int], ...]   # (t, k, s, c, n)
    se: bool
    stem_width: int = 32
    head_width: int = 1280
    bn_eps: float = 1e-5
    bn_momentum: float = 0.9  # jbp's: new = m·old + (1 − m)·batch (PyTorch momentum 0.1)
    min_size: int = 32

    def blocks(self, stochastic_depth: float = 0.0) -> Tuple[Block, ...]:
        """The blocks in order; block ``i`` of ``B`` gets the stochastic-depth rate
        ``stochastic_depth · i / B`` where it has a shortcut (torchvision's schedule)."""
        total = sum(n for *_, n in self.stages)
        out, cin = [], self.stem_width
        for t, k, s, c, n in self.stages:
            for j in range(n):
                stride = s if j == 0 else 1
                rate = stochastic_depth * len(out) / total
                block = Block(cin, c, t, k, stride, self.se, 0.0)
                out.append(block._replace(drop_rate=rate if block.shortcut else 0.0))
                cin = c
        return tuple(out)


MOBILENET_V2 = Spec("mobilenet_v2", "relu6", (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 3, 2, 32, 3), (6, 3, 2, 64, 4), (6, 3, 1, 96, 3),
    (6, 3, 2, 160, 3), (6, 3, 1, 320, 1)), se=False)
EFFICIENTNET_B0 = Spec("efficientnet_b0", "silu", (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)), se=True)


# --- init (torchvision's: Kaiming normal, fan-out mode; BN γ = 1, β = 0) ------------------------

def _conv_init(key, k, cin_per_group, cout):
    # torchvision: kaiming_normal_(mode="fan_out"): std √(2 / (C_out·k·k)) (depthwise included)
    std = math.sqrt(2.0 / (cout * k * k))
    return {"w": _init_lib.scaled_normal(key, (k, k, cin_per_group, cout), jnp.float32, std)}


def _se_init(key, c, c_se):
    k1, k2 = jax.random.split(key)
    f32 = jnp.float32            # explicit: float32 parameters also under jax_enable_x64
    return {"fc1": {"w": _init_lib.scaled_normal(k1, (c, c_se), f32, math.sqrt(2.0 / c_se)),
                    "b": jnp.zeros((c_se,), f32)},
            "fc2": {"w": _init_lib.scaled_normal(k2, (c_se, c), f32, math.sqrt(2.0 / c)),
                    "b": jnp.zeros((c,), f32)}}


def _add_conv_bn(params, state, key, name, k, cin_per_group, cout):
    params[name] = _conv_init(key, k, cin_per_group, cout)
    params[name + "_bn"], state[name + "_bn"] = _init_lib.batch_norm(cout)


def _init_block(key, b: Block):
    keys = jax.random.split(key, 4)
    params, state = {}, {}
    if b.expand != 1:
        _add_conv_bn(params, state, keys[0], "expand", 1, b.cin, b.hidden)
    _add_conv_bn(params, state, keys[1], "depthwise", b.kernel, 1, b.hidden)
    if b.se:
        params["se"] = _se_init(keys[2], b.hidden, max(1, b.cin // 4))
    _add_conv_bn(params, state, keys[3], "project", 1, b.hidden, b.cout)
    return params, state


#: ``head_init`` values: the classifier's initial weights. "torchvision": torchvision's (MobileNetV2
#: N(0, 0.01²); EfficientNet U(±1/√num_classes), sized for 1000 classes: at 10 it starts the logits
#: at about ±4, a loss of 4.7 and a gradient norm ~13× MobileNetV2's, and training from scratch
#: spikes); "zeros": W = 0 (every class at 1/num_classes; the first step moves W alone).
HEAD_INITS = ("torchvision", "zeros")


def _init(spec: Spec, key, input_shape, num_classes, head_init="torchvision"):
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init: expected one of {HEAD_INITS}, got {head_init!r}")
    h, w, c = input_shape
    if min(h, w) < spec.min_size:
        raise ValueError(f"input_shape: {spec.name} needs images of at least "
                         f"{spec.min_size}×{spec.min_size}, got {input_shape}")
    blocks = spec.blocks()
    k_stem, k_blocks, k_head, k_fc = jax.random.split(key, 4)
    params, state = {}, {}
    _add_conv_bn(params, state, k_stem, "stem", 3, c, spec.stem_width)
    inits = [_init_block(k, b) for k, b in zip(jax.random.split(k_blocks, len(blocks)), blocks)]
    params["blocks"], state["blocks"] = [p for p, _ in inits], [s for _, s in inits]
    _add_conv_bn(params, state, k_head, "head", 1, blocks[-1].cout, spec.head_width)
    fc_shape = (spec.head_width, num_classes)
    if head_init == "zeros":
        fc_w = jnp.zeros(fc_shape, jnp.float32)
    elif spec.name == "mobilenet_v2":    # torchvision: N(0, 0.01²); EfficientNet: U(±1/√out)
        fc_w = _init_lib.scaled_normal(k_fc, fc_shape, jnp.float32, 0.01)
    else:
        r = 1.0 / math.sqrt(num_classes)
        fc_w = _init_lib.scaled_uniform(k_fc, fc_shape, jnp.float32, -r, r)
    params["fc"] = {"w": fc_w, "b": jnp.zeros((num_classes,), jnp.float32)}
    return params, state


# --- apply ------------------------------------------------------------------------------------

def _conv_bn(nn, spec, params, state, new, name, x, train, *, stride=1, groups=1, act=True):
    k = params[name]["w"].shape[0]
    h = nn.conv2d(x, params[name]["w"], stride=stride, padding=(k - 1) // 2, groups=groups)
    h, (mean, var) = nn.batch_norm(h, params[name + "_bn"]["gamma"], params[name + "_bn"]["beta"],
                                   state[name + "_bn"]["mean"], state[name + "_bn"]["var"],
                                   train=train, momentum=spec.bn_momentum, eps=spec.bn_eps)
    new[name + "_bn"] = {"mean": mean, "var": var}
    return getattr(nn, spec.activation)(h) if act else h


def _squeeze_excite(nn, p, h):
    """``h ⊙ σ(fc2(SiLU(fc1(pool(h)))))``: every step a jbp rule (EQUATIONS.md)."""
    s = nn.global_avg_pool(h)                                    # (N, C)
    s = nn.silu(nn.dense(s, p["fc1"]["w"], p["fc1"]["b"]))
    s = nn.sigmoid(nn.dense(s, p["fc2"]["w"], p["fc2"]["b"]))
    return nn.channel_scale(h, s)


def _block(nn, spec, b: Block, p, s, x, train, key):
    new = {}
    h = x
    if b.expand != 1:
        h = _conv_bn(nn, spec, p, s, new, "expand", h, train)
    h = _conv_bn(nn, spec, p, s, new, "depthwise", h, train, stride=b.stride, groups=b.hidden)
    if b.se:
        h = _squeeze_excite(nn, p["se"], h)
    h = _conv_bn(nn, spec, p, s, new, "project", h, train, act=False)
    if not b.shortcut:
        return h, new
    if key is not None and b.drop_rate > 0:
        h = nn.stochastic_depth(h, b.drop_rate, key, train=train, mode="row")
    return h + x, new


def _apply(spec: Spec, params, state, x, train, layers, key, dropout, stochastic_depth, remat):
    nn = _init_lib.check_layers(layers)
    _init_lib.check_input(x, f"for {spec.name}")
    if min(x.shape[1:3]) < spec.min_size:
        raise ValueError(f"x: {spec.name} needs images of at least {spec.min_size}×"
                         f"{spec.min_size}, got shape {tuple(x.shape)}")
    if key is not None:
        _checks.require_key("key", key)
    blocks = spec.blocks(stochastic_depth)
    new = {}
    h = _conv_bn(nn, spec, params, state, new, "stem", x, train, stride=2)
    new["blocks"] = []
    for i, (b, p, s) in enumerate(zip(blocks, params["blocks"], state["blocks"])):
        block_key = None if key is None else jax.random.fold_in(key, i + 1)

        def run(p, s, h, block_key, b=b):
            return _block(nn, spec, b, p, s, h, train, block_key)
        if remat == "blocks":
            run = jax.checkpoint(run)
        h, ns = run(p, s, h, block_key)
        new["blocks"].append(ns)
    h = _conv_bn(nn, spec, params, state, new, "head", h, train)
    h = nn.global_avg_pool(h)
    if key is not None:
        h = nn.dropout(h, dropout, jax.random.fold_in(key, 0), train=train)
    return nn.dense(h, params["fc"]["w"], params["fc"]["b"]), new


def _check_rates(dropout, stochastic_depth):
    for name, rate in (("dropout", dropout), ("stochastic_depth", stochastic_depth)):
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ValueError(f"{name}: expected a rate in [0, 1), got {rate!r}")


def init_mobilenet_v2(key, input_shape=(224, 224, 3), num_classes=1000, *,
                      head_init: str = "torchvision"):
    """MobileNetV2 parameters and batch-norm state for NHWC images of ``input_shape``;
    ``head_init`` one of :data:`HEAD_INITS`."""
    return _init(MOBILENET_V2, key, input_shape, num_classes, head_init)


def apply_mobilenet_v2(params, state, x, *, train, layers=LayerPolicy(),
                       key: Optional[jax.Array] = None, dropout: float = 0.2,
                       remat: str = "none"):
    """x (N, H, W, C), H, W ≥ 32 -> logits (N, num_classes), new batch-norm state.
    ``key``: dropout's PRNG key in training mode (``None``: no dropout)."""
    _check_rates(dropout, 0.0)
    return _apply(MOBILENET_V2, params, state, x, train, layers, key, dropout, 0.0, remat)


def init_efficientnet_b0(key, input_shape=(224, 224, 3), num_classes=1000, *,
                         head_init: str = "torchvision"):
    """EfficientNet-B0 parameters and batch-norm state for NHWC images of ``input_shape``;
    ``head_init`` one of :data:`HEAD_INITS`."""
    return _init(EFFICIENTNET_B0, key, input_shape, num_classes, head_init)


def apply_efficientnet_b0(params, state, x, *, train, layers=LayerPolicy(),
                          key: Optional[jax.Array] = None, dropout: float = 0.2,
                          stochastic_depth: float = 0.2, remat: str = "none"):
    """x (N, H, W, C), H, W ≥ 32 -> logits (N, num_classes), new batch-norm state.
    ``key``: the PRNG key of dropout and stochastic depth in training mode (``None``: neither)."""
    _check_rates(dropout, stochastic_depth)
    return _apply(EFFICIENTNET_B0, params, state, x, train, layers, key, dropout,
                  stochastic_depth, remat)


#: The options of ``jbp.config.ModelConfig`` both networks have (``jbp.models.from_config``).
OPTIONS = frozenset({"remat", "head_init"})

"""Whole models written without jbp's layers, on jbp's own parameter pytrees: the benchmark's
two outside references.

- ``lax_apply(name)``: the same network written as a JAX user without jbp would write it
  (``lax.conv_general_dilated``, ``lax.reduce_window`` max pooling, batch norm from ``jnp.mean``,
  ``jax.nn.relu``, ``optax``'s cross-entropy), differentiated by ``jax.grad``. This is what a
  Flax/Haiku model lowers to.
- ``torch_model(name, params, state)``: the same network in PyTorch, channels-last, with the
  weights copied from ``params``, so all four variants start from identical numbers.

scripts/bench.py checks that every variant computes the same step-0 loss before it times them;
tests/test_bench.py checks the models against jbp's forward and gradients. Block strides come
from the model's public spec (``resnet.RESNET20.block_strides``), not from its internals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jbp.models import mobilenet, resnet

_NHWC = ("NHWC", "HWIO", "NHWC")


# --- plain-lax reference ----------------------------------------------------------------------

def _conv(x, w, b=None, stride=1, padding=0):
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else padding
    z = lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=_NHWC)
    return z if b is None else z + b


def _bn(x, p, s, momentum=0.9, eps=1e-5):
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    y = (x - mean) * lax.rsqrt(var + eps) * p["gamma"] + p["beta"]
    m = x.size // x.shape[-1]
    mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
    new = {"mean": momentum * s["mean"] + (1 - momentum) * mean,
           "var": momentum * s["var"] + (1 - momentum) * var * (m / (m - 1))}
    return y, new


def _max_pool(x, window, stride, padding=0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1),
                             (1, stride, stride, 1), pad)


def _lenet5(params, state, x):
    p = params
    h = _max_pool(jax.nn.relu(_conv(x, p["conv1"]["w"], p["conv1"]["b"], padding=2)), 2, 2)
    h = _max_pool(jax.nn.relu(_conv(h, p["conv2"]["w"], p["conv2"]["b"])), 2, 2)
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ p["fc1"]["w"] + p["fc1"]["b"])
    h = jax.nn.relu(h @ p["fc2"]["w"] + p["fc2"]["b"])
    return h @ p["fc3"]["w"] + p["fc3"]["b"], state


def _resnet(spec):
    def apply(params, state, x):
        new = {}
        h = _conv(x, params["stem"]["w"], stride=spec.stem_stride, padding=spec.stem_padding)
        h, new["stem_bn"] = _bn(h, params["stem_bn"], state["stem_bn"])
        h = jax.nn.relu(h)
        if spec.stem_pool:
            h = _max_pool(h, 3, 2, 1)
        blocks = []
        for p, s, stride in zip(params["blocks"], state["blocks"], spec.block_strides):
            nb = {}
            y = _conv(h, p["conv1"]["w"], stride=stride, padding=1)
            y, nb["bn1"] = _bn(y, p["bn1"], s["bn1"])
            y = _conv(jax.nn.relu(y), p["conv2"]["w"], padding=1)
            y, nb["bn2"] = _bn(y, p["bn2"], s["bn2"])
            if "proj" in p:
                sc = _conv(h, p["proj"]["w"], stride=stride)
                sc, nb["proj_bn"] = _bn(sc, p["proj_bn"], s["proj_bn"])
            else:
                sc = h
            h = jax.nn.relu(y + sc)
            blocks.append(nb)
        new["blocks"] = blocks
        h = jnp.mean(h, axis=(1, 2))
        return h @ params["fc"]["w"] + params["fc"]["b"], new
    return apply


def _unet(params, state, x):
    """jbp.models.unet with the transposed-convolution decoder, input sizes divisible by 8:
    ``lax.conv_transpose`` with the kernel given as the forward convolution's
    (``transpose_kernel=True``), ``jnp.concatenate`` for the skips."""
    def block(p, s, h):
        new = {}
        for name in ("conv1", "conv2"):
            h, new[name + "_bn"] = _bn(_conv(h, p[name]["w"], padding=1), p[name + "_bn"],
                                       s[name + "_bn"])
            h = jax.nn.relu(h)
        return h, new
    new = {"down": [], "dec": []}
    skips, h = [], x
    for level, (p, s) in enumerate(zip(params["down"], state["down"])):
        if level:
            h = _max_pool(h, 2, 2)
        h, ns = block(p, s, h)
        new["down"].append(ns)
        skips.append(h)
    for p_up, p, s, skip in zip(params["up"], params["dec"], state["dec"], reversed(skips[:-1])):
        h = lax.conv_transpose(h, p_up["w"].transpose(0, 1, 3, 2), (2, 2), "VALID",
                               dimension_numbers=_NHWC, transpose_kernel=True) + p_up["b"]
        h, ns = block(p, s, jnp.concatenate([skip, h], axis=-1))
        new["dec"].append(ns)
    return _conv(h, params["head"]["w"], params["head"]["b"]), new


LAX_MODELS = {"lenet5": _lenet5, "resnet20": _resnet(resnet.RESNET20),
              "resnet18": _resnet(resnet.RESNET18), "unet": _unet}


def lax_apply(name):
    """``apply(params, state, x, *, train, layers) -> (logits, new_state)``, jbp's model
    signature (``train`` and ``layers`` are ignored: always train mode, always ``jax.grad``)."""
    fn = LAX_MODELS[name]

    def apply(params, state, x, *, train=True, layers=None):
        del train, layers
        return fn(params, state, x)

    return apply


def lax_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _inverted_residual_flops(spec, x_shape, num_classes) -> int:
    """The same count for MobileNetV2 / EfficientNet-B0 (no plain-lax twin), from the
    architecture: every convolution (depthwise ones at k·k per output), SE's two dense layers,
    the classifier."""
    n, h, w, c = x_shape

    def out(size, k, s):
        return (size + 2 * ((k - 1) // 2) - k) // s + 1

    h, w = out(h, 3, 2), out(w, 3, 2)
    total = 2 * n * h * w * 9 * c * spec.stem_width
    blocks = spec.blocks()
    for b in blocks:
        if b.expand != 1:
            total += 2 * n * h * w * b.cin * b.hidden
        h, w = out(h, b.kernel, b.stride), out(w, b.kernel, b.stride)
        total += 2 * n * h * w * b.kernel * b.kernel * b.hidden
        if b.se:
            total += 2 * n * 2 * b.hidden * max(1, b.cin // 4)
        total += 2 * n * h * w * b.hidden * b.cout
    total += 2 * n * h * w * blocks[-1].cout * spec.head_width
    return total + 2 * n * spec.head_width * num_classes


def forward_flops(name, params, state, x) -> int:
    """Multiply-add FLOPs (2 per MAC) of the forward's convolutions and matmuls, read from the
    reference model's jaxpr. A train step is counted as 3× this (forward, input and weight
    gradients), the usual convention for MFU."""
    if name in ("mobilenet_v2", "efficientnet_b0"):
        spec = mobilenet.MOBILENET_V2 if name == "mobilenet_v2" else mobilenet.EFFICIENTNET_B0
        return _inverted_residual_flops(spec, x.shape, params["fc"]["w"].shape[1])
    jaxpr = jax.make_jaxpr(lambda p, s, x: LAX_MODELS[name](p, s, x))(params, state, x)
    total = 0
    for eqn in jaxpr.jaxpr.eqns:
        out = eqn.outvars[0].aval
        if eqn.primitive.name == "conv_general_dilated":
            kh, kw, cin, _ = eqn.invars[1].aval.shape          # HWIO
            total += 2 * int(np.prod(out.shape)) * kh * kw * cin
        elif eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * int(np.prod(out.shape)) * int(np.prod([lhs[d] for d in contract]))
    return total


# --- PyTorch ----------------------------------------------------------------------------------

def torch_model(name, params, state):
    """An ``nn.Module`` equal to jbp's ``name`` at ``params``/``state`` (NCHW module, to be fed
    channels-last tensors). Raises ImportError without torch."""
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    if name in ("mobilenet_v2", "efficientnet_b0"):      # torchvision's own, jbp's weights
        from jbp import torch_weights  # noqa: PLC0415
        from jbp.testing.torchvision_loader import torchvision  # noqa: PLC0415
        rates = {"dropout": 0.0}                          # as jbp's key-less step
        if name == "efficientnet_b0":
            rates["stochastic_depth_prob"] = 0.0
        module = getattr(torchvision().models, name)(
            num_classes=params["fc"]["w"].shape[1], **rates)
        module.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32) if
                                                    v.dtype.kind == "f" else v)
                                for k, v in torch_weights.to_torch(name, params, state).items()})
        return module

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def conv(p, stride=1, padding=0):
        w = p["w"]
        kh, kw, cin, cout = w.shape
        m = nn.Conv2d(cin, cout, (kh, kw), stride, padding, bias="b" in p)
        with torch.no_grad():
            m.weight.copy_(t(w).permute(3, 2, 0, 1))
            if "b" in p:
                m.bias.copy_(t(p["b"]))
        return m

    def bn(p, s):
        m = nn.BatchNorm2d(p["gamma"].shape[0], eps=1e-5, momentum=0.1)
        with torch.no_grad():
            m.weight.copy_(t(p["gamma"]))
            m.bias.copy_(t(p["beta"]))
            m.running_mean.copy_(t(s["mean"]))
            m.running_var.copy_(t(s["var"]))
        return m

    def linear(p):
        w = p["w"]
        m = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            m.weight.copy_(t(w).T)
            m.bias.copy_(t(p["b"]))
        return m

    class Flatten(nn.Module):       # jbp flattens NHWC, i.e. in (H, W, C) order
        def forward(self, x):
            return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)

    if name == "lenet5":
        p = params
        return nn.Sequential(conv(p["conv1"], padding=2), nn.ReLU(), nn.MaxPool2d(2),
                             conv(p["conv2"]), nn.ReLU(), nn.MaxPool2d(2), Flatten(),
                             linear(p["fc1"]), nn.ReLU(), linear(p["fc2"]), nn.ReLU(),
                             linear(p["fc3"]))

    if name == "unet":
        return _torch_unet(torch, nn, conv, bn, t, params, state)

    spec = {"resnet20": resnet.RESNET20, "resnet18": resnet.RESNET18}[name]

    class Block(nn.Module):
        def __init__(self, p, s, stride):
            super().__init__()
            self.conv1, self.bn1 = conv(p["conv1"], stride, 1), bn(p["bn1"], s["bn1"])
            self.conv2, self.bn2 = conv(p["conv2"], 1, 1), bn(p["bn2"], s["bn2"])
            self.proj = (nn.Sequential(conv(p["proj"], stride), bn(p["proj_bn"], s["proj_bn"]))
                         if "proj" in p else nn.Identity())

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.proj(x))

    layers = [conv(params["stem"], spec.stem_stride, spec.stem_padding),
              bn(params["stem_bn"], state["stem_bn"]), nn.ReLU()]
    if spec.stem_pool:
        layers.append(nn.MaxPool2d(3, 2, 1))
    for p, s, stride in zip(params["blocks"], state["blocks"], spec.block_strides):
        layers.append(Block(p, s, stride))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear(params["fc"])]
    return nn.Sequential(*layers)


def _torch_unet(torch, nn, conv, bn, t, params, state):
    """jbp.models.unet (transposed-convolution decoder) in PyTorch: ``ConvTranspose2d`` with
    jbp's (KH, KW, C_in, C_out) kernel as PyTorch's (C_in, C_out, KH, KW), ``torch.cat``."""
    def block(p, s):
        return nn.Sequential(conv(p["conv1"], 1, 1), bn(p["conv1_bn"], s["conv1_bn"]), nn.ReLU(),
                             conv(p["conv2"], 1, 1), bn(p["conv2_bn"], s["conv2_bn"]), nn.ReLU())

    def up(p):
        kh, kw, cin, cout = p["w"].shape
        m = nn.ConvTranspose2d(cin, cout, (kh, kw), stride=2)
        with torch.no_grad():
            m.weight.copy_(t(p["w"]).permute(2, 3, 0, 1))
            m.bias.copy_(t(p["b"]))
        return m

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.ModuleList(block(p, s) for p, s in zip(params["down"],
                                                                   state["down"]))
            self.up = nn.ModuleList(up(p) for p in params["up"])
            self.dec = nn.ModuleList(block(p, s) for p, s in zip(params["dec"], state["dec"]))
            self.head = conv(params["head"])

        def forward(self, x):
            skips = []
            for level, down in enumerate(self.down):
                x = down(torch.nn.functional.max_pool2d(x, 2) if level else x)
                skips.append(x)
            for up_conv, dec, skip in zip(self.up, self.dec, reversed(skips[:-1])):
                x = dec(torch.cat([skip, up_conv(x)], dim=1))
            return self.head(x)

    return UNet()

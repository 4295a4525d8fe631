"""U-Net (Ronneberger et al., 2015) from jbp layers: an encoder–decoder with skips by
concatenation, for per-pixel classification.

    block(c)  = conv3×3(c) ─ BN ─ ReLU ─ conv3×3(c) ─ BN ─ ReLU          (padding 1: size kept)

    x ─ block(16) ─────────────────────────────────────── concat ─ block(16) ─ conv1×1(K) ─ logits
         └ maxpool2 ─ block(32) ─────────────── concat ─ block(32) ─ up(16) ┘
                        └ maxpool2 ─ block(64) ─ concat ─ block(64) ─ up(32) ┘
                                       └ maxpool2 ─ block(128) ─ up(64) ┘

``up(c)`` doubles the height and width and sets ``c`` channels: ``decoder="transpose"`` (the
default, the paper's "up-convolution") is a 2×2 stride-2 ``conv_transpose2d``;
``decoder="upsample"`` is bilinear ``upsample`` by 2 followed by a 3×3 convolution (no checkerboard
pattern, no learned upsampling). Where the input size is not divisible by 8 an upsampled map is one
cell short of its skip; it is padded with zeros (``pad(..., "constant")``; a longer one would be
cropped by the same call's negative padding) before the concatenation, as the paper crops.
On 64×64: 64, 32, 16, 8 and back; 482,619 parameters for 1 channel in and 11 classes out
(536,379 with ``decoder="upsample"``).

Options (``jbp.models.from_config``): ``decoder``; ``batch_norm=False`` drops every batch norm
(the convolutions then carry a bias); ``remat="blocks"`` wraps each block in ``jax.checkpoint``.
Logits are ``(N, H, W, num_classes)``: ``softmax_cross_entropy`` takes them per pixel.
"""

from __future__ import annotations

import jax

from jbp.models import _init as _init_lib
from jbp.policy import LayerPolicy

WIDTHS = (16, 32, 64, 128)          # the encoder's channels per level; the last is the bottleneck
DECODERS = ("transpose", "upsample")
OPTIONS = frozenset({"decoder", "batch_norm", "remat"})


def _check_decoder(decoder):
    if decoder not in DECODERS:
        raise ValueError(f"decoder: expected one of {DECODERS}, got {decoder!r}")


def _init_block(key, cin, cout, batch_norm):
    k1, k2 = jax.random.split(key)
    params, state = {}, {}
    for name, k, c in (("conv1", k1, cin), ("conv2", k2, cout)):
        params[name] = _init_lib.conv(k, 3, 3, c, cout, bias=not batch_norm)
        if batch_norm:
            params[name + "_bn"], state[name + "_bn"] = _init_lib.batch_norm(cout)
    return params, state


def _block(nn, p, s, x, train):
    new = {}
    h = x
    for name in ("conv1", "conv2"):
        h = nn.conv2d(h, p[name]["w"], p[name].get("b"), padding=1)
        if name + "_bn" in p:
            bn = p[name + "_bn"]
            h, (mean, var) = nn.batch_norm(h, bn["gamma"], bn["beta"], s[name + "_bn"]["mean"],
                                           s[name + "_bn"]["var"], train=train)
            new[name + "_bn"] = {"mean": mean, "var": var}
        h = nn.relu(h)
    return h, new


def init(key, input_shape=(64, 64, 1), num_classes=11, *, decoder="transpose",
         batch_norm=True):
    """U-Net parameters and batch-norm state for NHWC images of ``input_shape``."""
    _check_decoder(decoder)
    h, w, c = input_shape
    if min(h, w) < 8:
        raise ValueError(f"input_shape: unet pools three times and needs images of at least "
                         f"8×8, got {input_shape}")
    keys = iter(jax.random.split(key, 2 * len(WIDTHS) + 1))
    params = {"down": [], "up": [], "dec": []}
    state = {"down": [], "dec": []}
    cin = c
    for width in WIDTHS:
        p, s = _init_block(next(keys), cin, width, batch_norm)
        params["down"].append(p)
        state["down"].append(s)
        cin = width
    for width in reversed(WIDTHS[:-1]):
        k_up, k_dec = jax.random.split(next(keys))
        if decoder == "transpose":            # kernel (2, 2, C_in, C_out): init's HWIO shape
            params["up"].append(_init_lib.conv(k_up, 2, 2, cin, width))
        else:
            params["up"].append(_init_lib.conv(k_up, 3, 3, cin, width))
        p, s = _init_block(k_dec, 2 * width, width, batch_norm)
        params["dec"].append(p)
        state["dec"].append(s)
        cin = width
    params["head"] = _init_lib.conv(next(keys), 1, 1, cin, num_classes)
    return params, state


def _match(nn, h, skip):
    """``h`` padded (or cropped) with zeros to ``skip``'s height and width."""
    dh, dw = skip.shape[1] - h.shape[1], skip.shape[2] - h.shape[2]
    if dh == dw == 0:
        return h
    return nn.pad(h, ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2)), "constant")


def apply(params, state, x, *, train, layers=LayerPolicy(), decoder="transpose",
          remat="none"):
    """x (N, H, W, C) -> per-pixel logits (N, H, W, num_classes), new batch-norm state."""
    _check_decoder(decoder)
    nn = _init_lib.check_layers(layers)
    _init_lib.check_input(x, "for unet")

    def block(p, s, h):
        return _block(nn, p, s, h, train)
    if remat == "blocks":
        block = jax.checkpoint(block)
    new = {"down": [], "dec": []}
    skips = []
    h = x
    for level, (p, s) in enumerate(zip(params["down"], state["down"])):
        if level:
            h = nn.max_pool(h, 2)
        h, ns = block(p, s, h)
        new["down"].append(ns)
        skips.append(h)
    for p_up, p, s, skip in zip(params["up"], params["dec"], state["dec"], reversed(skips[:-1])):
        if decoder == "transpose":
            h = nn.conv_transpose2d(h, p_up["w"], p_up["b"], stride=2)
        else:
            h = nn.conv2d(nn.upsample(h, scale=2, mode="bilinear"), p_up["w"], p_up["b"],
                          padding=1)
        h = nn.concat([skip, _match(nn, h, skip)])
        h, ns = block(p, s, h)
        new["dec"].append(ns)
    return nn.conv2d(h, params["head"]["w"], params["head"]["b"], padding="VALID"), new

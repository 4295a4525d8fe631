"""The grid's cases for segmentation's layers (issue 26): transposed convolution, upsampling,
concatenation, constant padding and cropping, adaptive max pooling, per-pixel cross-entropy and
the soft Dice loss. Each PyTorch twin calls ``torch.nn.functional``'s own operation (or, for
Dice, which PyTorch lacks, the definition written in torch); :mod:`jbp.testing.grid` adds
:data:`SEGMENTATION_CASES` to ``CASES``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jbp.testing import torch_reference as _ref
from jbp.testing.case import Case


def _conv_transpose_case(hw, cin, cout, k, *, bias=True, **kw):
    groups = kw.get("groups", 1)
    kh, kw_ = (k, k) if isinstance(k, int) else k
    shapes = ((2, *hw, cin), (kh, kw_, cin, cout // groups)) + (((cout,),) if bias else ())
    names = ("x", "w", "b")[:len(shapes)]
    config = " ".join([f"{hw[0]}x{hw[1]}x{cin}->{cout}", f"k{kh}x{kw_}"]
                      + [f"{key}={val}" for key, val in kw.items()] + ([] if bias else ["no-bias"]))

    def call(ns):
        if bias:
            return lambda x, w, b: ns.conv_transpose2d(x, w, b, **kw)
        return lambda x, w: ns.conv_transpose2d(x, w, **kw)

    return Case("conv_transpose2d", config, shapes, names, call,
                functools.partial(_ref.conv_transpose2d, **kw), tags=("conv",), kwargs=dict(kw))


def _upsample_case(hw, *, size=None, scale=None, mode="nearest", align_corners=False):
    kw = dict(size=size, scale=scale, mode=mode, align_corners=align_corners)
    torch_kw = dict(size=size, scale_factor=scale, mode=mode)
    if mode == "bilinear":
        torch_kw["align_corners"] = align_corners
    config = f"{hw[0]}x{hw[1]} " + " ".join(f"{k}={v}" for k, v in kw.items()
                                            if v not in (None, False))
    return Case("upsample", config, ((2, *hw, 3),), ("x",),
                lambda ns: lambda x: ns.upsample(x, **kw),
                functools.partial(_ref.interpolate, **torch_kw), kwargs=kw)


def _pad_constant_case(hw, pads, value):
    return Case("pad", f"{hw[0]}x{hw[1]} {pads} constant value={value}", ((2, *hw, 3),), ("x",),
                lambda ns: lambda x: ns.pad(x, pads, "constant", value),
                functools.partial(_ref.pad_constant, padding=pads, value=value),
                kwargs=dict(padding=pads, mode="constant", value=value))


def _adaptive_max_case(hw, out):
    return Case("adaptive_max_pool", f"{hw[0]}x{hw[1]} output_size={out}", ((2, *hw, 3),),
                ("x",), lambda ns: lambda x: ns.adaptive_max_pool(x, out),
                functools.partial(_ref.native, "adaptive_max_pool2d", output_size=out),
                tags=("pool",), kwargs=dict(output_size=out))


# Per-pixel labels of a (2, 3, 4) image batch over 5 classes; two pixels are void (255).
_PIXEL_LABELS = np.random.default_rng(26).integers(0, 5, (2, 3, 4))
_VOID_LABELS = _PIXEL_LABELS.copy()
_VOID_LABELS[0, 0, :2] = 255
_CLASS_WEIGHT = np.array([0.5, 2.0, 1.0, 0.25, 3.0])


def _pixel_ce_case(config, labels, **kw):
    def call(ns):
        extra = {k: (jnp.asarray(v) if k == "weight" else v) for k, v in kw.items()}
        return lambda z: ns.softmax_cross_entropy(z, jnp.asarray(labels), **extra)

    return Case("softmax_cross_entropy", config, ((2, 3, 4, 5),), ("logits",), call,
                functools.partial(_ref.cross_entropy_pixels, labels=labels, **kw),
                kwargs=dict(kw))


def _dice_case(config, labels, **kw):
    return Case("dice_loss", config, ((2, 3, 4, 5),), ("logits",),
                lambda ns: lambda z: ns.dice_loss(z, jnp.asarray(labels), **kw),
                functools.partial(_ref.soft_dice, labels=labels, **kw), kwargs=dict(kw))


SEGMENTATION_CASES = [
    _conv_transpose_case((5, 6), 4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
    _conv_transpose_case((4, 5), 3, 2, (2, 3), stride=(2, 3), padding=(0, 1), dilation=(1, 2),
                         output_padding=(1, 0)),
    _conv_transpose_case((3, 4), 2, 3, 3, dilation=2, output_padding=1, bias=False),  # o >= s
    _conv_transpose_case((4, 4), 4, 2, 2, stride=2),                    # a U-Net's up-conv
    _upsample_case((4, 5), scale=2),
    _upsample_case((5, 6), size=(7, 13)),
    _upsample_case((5, 3), scale=(1.7, 2.5), mode="bilinear"),
    _upsample_case((4, 5), scale=2, mode="bilinear", align_corners=True),
    _upsample_case((6, 6), size=(4, 9), mode="bilinear"),               # down in H, up in W
    Case("concat", "2x3x4x(2+5)", ((2, 3, 4, 2), (2, 3, 4, 5)), ("a", "b"),
         lambda ns: lambda a, b: ns.concat([a, b]), _ref.concat),
    _pad_constant_case((5, 6), ((1, -2), (-1, 3)), 1.5),                # pad and crop
    _pad_constant_case((6, 5), ((-1, -2), (0, -1)), 0.0),               # crop only
    _adaptive_max_case((9, 10), (4, 7)),
    _adaptive_max_case((5, 4), (3, 6)),                                 # larger than the input
    _pixel_ce_case("2x3x4x5 per pixel", _PIXEL_LABELS),
    _pixel_ce_case("2x3x4x5 per pixel weight ignore_index=255", _VOID_LABELS,
                   weight=_CLASS_WEIGHT, ignore_index=255),
    _pixel_ce_case("2x3x4x5 per pixel ignore_index=255 reduction=none", _VOID_LABELS,
                   ignore_index=255, reduction="none"),
    _dice_case("2x3x4x5 smooth=1", _PIXEL_LABELS, smooth=1.0),
    _dice_case("2x3x4x5 smooth=0.5 ignore_index=255", _VOID_LABELS, smooth=0.5,
               ignore_index=255),
]

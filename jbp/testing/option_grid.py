"""The grid's cases for PyTorch's options: ceil mode, dilated max pooling, adaptive pooling,
unpooling, padding modes, dense over leading axes, 0-d softmax, and the losses' reductions,
class weights, ignored labels and positive weights. Each case's PyTorch twin calls PyTorch's own
option (:mod:`jbp.testing.torch_reference`), an oracle independent of jbp's resolution of it.
:mod:`jbp.testing.grid` adds these lists to ``CASES``.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from jbp.layers import pooling as _pooling
from jbp.testing import torch_reference as _ref
from jbp.testing.case import Case


def _targets01(rng, shapes):
    return [rng.standard_normal(shapes[0]) * 2, rng.uniform(0, 1, shapes[1])]


def _option_pool_case(layer, hw, torch_name, torch_kw, **kw):
    config = f"{hw[0]}x{hw[1]} " + " ".join(f"{k}={v}" for k, v in kw.items())
    return Case(layer, config, ((2, *hw, 3),), ("x",),
                lambda ns: lambda x: getattr(ns, layer)(x, **kw),
                functools.partial(_ref.native, torch_name, **torch_kw), tags=("pool",),
                kwargs=dict(kw))


def _padding_conv_case(mode, hw, k, padding, stride=1):
    shapes = ((2, *hw, 3), (k, k, 3, 4), (4,))
    kw = dict(stride=stride, padding=padding, padding_mode=mode)
    return Case("conv2d", f"{hw[0]}x{hw[1]} k{k} pad={padding} s={stride} {mode}", shapes,
                ("x", "w", "b"), lambda ns: lambda x, w, b: ns.conv2d(x, w, b, **kw),
                functools.partial(_ref.conv2d_padding_mode, **kw), tags=("conv",),
                kwargs=kw)


def _pad_case(mode, hw, pads):
    return Case("pad", f"{hw[0]}x{hw[1]} {pads} {mode}", ((2, *hw, 3),), ("x",),
                lambda ns: lambda x: ns.pad(x, pads, mode),
                functools.partial(_ref.pad, padding=pads, mode=mode),
                kwargs=dict(padding=pads, mode=mode))


def _unpool_case(hw, window, stride=None):
    """max_unpool of a fixed pooling: the indices come from a fixed input and are closed over."""
    src = np.random.default_rng(7).standard_normal((2, *hw, 3))
    _, idx = _pooling.max_pool(jnp.asarray(src), window, stride, return_indices=True)
    idx = np.asarray(idx)
    kw = dict(window=window, stride=stride, output_size=hw)
    return Case("max_unpool", f"{hw[0]}x{hw[1]} k={window} s={stride}",
                ((2, *idx.shape[1:3], 3),), ("x",),
                lambda ns: lambda x: ns.max_unpool(x, jnp.asarray(idx), **kw),
                functools.partial(_ref.max_unpool, indices=idx, **kw), tags=("pool",),
                kwargs=kw)


OPTION_CASES = [
    _option_pool_case("max_pool", (7, 8), "max_pool2d", dict(kernel_size=3, stride=2,
                      ceil_mode=True), window=3, stride=2, ceil_mode=True),
    _option_pool_case("max_pool", (9, 9), "max_pool2d", dict(kernel_size=3, stride=1,
                      dilation=2), window=3, stride=1, dilation=2),
    _option_pool_case("max_pool", (8, 7), "max_pool2d", dict(kernel_size=2, stride=2, padding=1,
                      dilation=(2, 1), ceil_mode=True), window=2, stride=2, padding=1,
                      dilation=(2, 1), ceil_mode=True),
    _option_pool_case("avg_pool", (7, 8), "avg_pool2d", dict(kernel_size=3, stride=2,
                      ceil_mode=True), window=3, stride=2, ceil_mode=True),
    _option_pool_case("avg_pool", (6, 7), "avg_pool2d", dict(kernel_size=3, stride=2, padding=1,
                      ceil_mode=True, count_include_pad=False), window=3, stride=2, padding=1,
                      ceil_mode=True, count_include_pad=False),
    _option_pool_case("adaptive_avg_pool", (9, 10), "adaptive_avg_pool2d",
                      dict(output_size=(7, 7)), output_size=(7, 7)),
    _option_pool_case("adaptive_avg_pool", (5, 4), "adaptive_avg_pool2d",
                      dict(output_size=(3, 6)), output_size=(3, 6)),
    _unpool_case((6, 6), 2),
    _unpool_case((7, 9), (2, 3)),                  # a remainder row: output_size (7, 9)
    _pad_case("reflect", (5, 6), ((2, 1), (3, 0))),
    _pad_case("replicate", (4, 5), ((3, 1), (0, 6))),
    _pad_case("circular", (5, 4), ((1, 5), (4, 2))),
    _padding_conv_case("reflect", (6, 7), 3, 1),
    _padding_conv_case("replicate", (7, 6), 5, 2, stride=2),
    _padding_conv_case("circular", (6, 6), 3, 1),
    Case("dense", "(2,3,5)->4", ((2, 3, 5), (5, 4), (4,)), ("x", "w", "b"),
         lambda ns: ns.dense, _ref.linear),
    Case("softmax", "0-d", ((),), ("x",), lambda ns: ns.softmax,
         lambda x: x.softmax(dim=0)),
]

# Losses with PyTorch's options: fixed labels (two of them ignored), class weights, reductions.
_OPTION_LABELS = np.array([2, -100, 0, 4, 1, -100])
_CLASS_WEIGHT = np.array([0.5, 2.0, 1.0, 0.25, 3.0])
_POS_WEIGHT, _ELEMENT_WEIGHT = np.array([0.5, 2.0, 4.0]), np.array([[1.0], [0.0], [2.5], [0.5]])


def _ce_option_case(config, **kw):
    def call(ns):
        extra = {k: (jnp.asarray(v) if k == "weight" else v) for k, v in kw.items()}
        return lambda z: ns.softmax_cross_entropy(z, jnp.asarray(_OPTION_LABELS), **extra)

    return Case("softmax_cross_entropy", config, ((6, 5),), ("logits",), call,
                functools.partial(_ref.cross_entropy_options, labels=_OPTION_LABELS,
                                  **{"ignore_index": -100, **kw}), kwargs=dict(kw))


def _bce_option_case(reduction):
    kw = dict(weight=_ELEMENT_WEIGHT, pos_weight=_POS_WEIGHT, reduction=reduction)
    return Case("sigmoid_binary_cross_entropy", f"4x3 weights reduction={reduction}",
                ((4, 3), (4, 3)), ("logits", "targets"),
                lambda ns: lambda z, y: ns.sigmoid_binary_cross_entropy(
                    z, y, weight=jnp.asarray(_ELEMENT_WEIGHT),
                    pos_weight=jnp.asarray(_POS_WEIGHT), reduction=reduction),
                functools.partial(_ref.bce_options, **kw), make=_targets01,
                kwargs=dict(weight=jnp.asarray(_ELEMENT_WEIGHT),
                            pos_weight=jnp.asarray(_POS_WEIGHT), reduction=reduction))


LOSS_OPTION_CASES = [
    _ce_option_case("6x5 weight ignore_index", weight=_CLASS_WEIGHT, ignore_index=-100),
    _ce_option_case("6x5 ignore_index reduction=sum", ignore_index=-100, reduction="sum"),
    _ce_option_case("6x5 weight ignore_index reduction=none", weight=_CLASS_WEIGHT,
                    ignore_index=-100, reduction="none"),
    _bce_option_case("mean"),
    _bce_option_case("none"),
    Case("mse", "3x4 reduction=sum", ((3, 4), (3, 4)), ("pred", "target"),
         lambda ns: lambda a, b: ns.mse(a, b, reduction="sum"),
         functools.partial(_ref.mse_options, reduction="sum"), kwargs={"reduction": "sum"}),
    Case("mse", "3x4 reduction=none", ((3, 4), (3, 4)), ("pred", "target"),
         lambda ns: lambda a, b: ns.mse(a, b, reduction="none"),
         functools.partial(_ref.mse_options, reduction="none"), kwargs={"reduction": "none"}),
]

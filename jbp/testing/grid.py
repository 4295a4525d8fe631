"""The gradient-check grid: every layer over a spread of configurations.

One list, :data:`CASES`, drives ``scripts/gradcheck.py`` and the parametrised tests alike. A
:class:`Case` knows how to build its differentiable inputs, how to call the layer from a namespace
(``jbp`` or ``jbp.autodiff``), its keyword configuration (:attr:`Case.kwargs`), and, where PyTorch
has the same operation, how to compute it with ``torch.nn.functional`` on NHWC tensors
(:mod:`jbp.testing.torch_reference`). Non-differentiable inputs (integer labels, running
statistics, PRNG keys) are fixed per case and closed over.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jbp.layers import pooling as _pooling
from jbp.testing import torch_reference as _ref
from jbp.testing.case import Case  # re-exported: jbp.testing.grid.Case
from jbp.testing.option_grid import LOSS_OPTION_CASES, OPTION_CASES
from jbp.testing.segmentation_grid import SEGMENTATION_CASES


# --- conv2d -----------------------------------------------------------------------------------

def _conv_call(ns, *, bias, **kw):
    if bias:
        return lambda x, w, b: ns.conv2d(x, w, b, **kw)
    return lambda x, w: ns.conv2d(x, w, **kw)


def _conv_case(hw, cin, cout, k, *, bias=True, n=2, **kw):
    groups = kw.get("groups", 1)
    kh, kw_ = (k, k) if isinstance(k, int) else k
    shapes = ((n, *hw, cin), (kh, kw_, cin // groups, cout)) + (((cout,),) if bias else ())
    names = ("x", "w", "b")[:len(shapes)]
    config = " ".join([f"{hw[0]}x{hw[1]}x{cin}->{cout}", f"k{kh}x{kw_}"]
                      + [f"{key}={val}" for key, val in kw.items()] + ([] if bias else ["no-bias"]))
    return Case("conv2d", config, shapes, names,
                functools.partial(_conv_call, bias=bias, **kw),
                functools.partial(_ref.conv2d, kw=kw), tags=("conv",), kwargs=dict(kw))


CONV_CASES = [
    _conv_case((6, 6), 3, 4, 3),
    _conv_case((7, 9), 3, 4, 3, padding="VALID"),
    _conv_case((7, 9), 2, 3, 3, stride=2),                      # SAME, stride 2: asymmetric pad
    _conv_case((8, 8), 2, 3, 3, stride=2, padding="VALID"),
    _conv_case((7, 7), 3, 2, 3, stride=(2, 1), padding=1),
    _conv_case((6, 7), 2, 3, (2, 3), padding=((1, 0), (2, 1))),
    _conv_case((9, 9), 2, 3, 3, dilation=2),
    _conv_case((9, 8), 2, 2, 3, dilation=(2, 1), padding="VALID", stride=2),
    _conv_case((6, 6), 4, 6, 3, groups=2),
    _conv_case((7, 7), 4, 4, 3, groups=4, stride=2),             # depthwise
    _conv_case((6, 6), 3, 6, 3, groups=3, padding="VALID"),       # depthwise, multiplier 2
    _conv_case((8, 8), 4, 6, 1, stride=2, padding="VALID"),       # 1x1 stride 2 projection
    _conv_case((7, 7), 3, 5, 1),                                  # 1x1 odd size
    _conv_case((9, 9), 2, 3, 5, stride=2, padding=2),
    _conv_case((5, 5), 3, 2, 5, padding="VALID"),                 # kernel = input size
    _conv_case((6, 6), 3, 4, 3, bias=False),
    _conv_case((11, 10), 1, 2, 4, stride=3, padding="SAME"),
    # Shapes that take jbp's CPU-specialised backward formulations (jbp.layers.conv, _cpu_*_grad;
    # tests/test_conv_formulations.py checks that every form is reached):
    _conv_case((10, 7), 3, 4, 1, stride=3, padding="VALID"),      # 1x1 stride 3, odd: dW matmul
    _conv_case((33, 32), 4, 6, 1, stride=2, padding="VALID"),     # 1x1, 17x16 δ: dW and dx matmul
    _conv_case((5, 5), 2, 3, 1, stride=2, padding=1),             # 1x1 padded: not pointwise
    _conv_case((9, 9), 2, 3, 2, stride=3, padding=1),             # kernel < stride
    _conv_case((16, 16), 32, 4, 3, bias=False, n=32),             # C_in 32, 16x16: per-tap dW
    _conv_case((33, 31), 32, 3, 3, stride=2, n=33),               # taps + dx phases, odd, N=33
    _conv_case((8, 8), 64, 4, 3, bias=False, n=32),               # C_in 64, 8x8: patch-matrix dW
    _conv_case((7, 9), 64, 3, 3, stride=2, n=33),                 # patches, stride 2, odd, N=33
    _conv_case((17, 15), 16, 4, 3, stride=2, n=32, bias=False),   # stride 2: patches
    _conv_case((5, 6), 2, 3, 3, n=66),                            # split taps
    _conv_case((5, 6), 2, 3, (2, 3), n=66),                       # batch chunks of 16, +2
    _conv_case((4, 5), 3, 17, 3, stride=2, n=64, bias=False),     # chunks of 4
    _conv_case((3, 2), 64, 64, 3, n=64, bias=False),              # split forward (manual)
    # Thin layers: the forward over blocks of columns (the table's "columns" forms), and from
    # batch 32 the weight gradient too; widths that leave a partial last block.
    _conv_case((6, 17), 1, 6, 5),                                 # 4 columns per block
    _conv_case((5, 13), 3, 16, 3, n=32),                          # 2 per block, dW columns
    _conv_case((9, 10), 6, 16, 5, padding=((1, 0), (2, 1)), n=32, bias=False),  # dW only
    _conv_case((9, 8), 3, 4, 5, padding="VALID"),                 # unpadded: dx by rows
    # Shapes the oneDNN form (float32 on CPU) sees that the cases above do not cover.
    _conv_case((10, 9), 6, 9, 3, groups=3, dilation=2, stride=2, padding=1, n=3),
    _conv_case((3, 3), 2, 3, 5, padding=2, n=1),                  # kernel wider than the input
    _conv_case((9, 8), 4, 8, 5, groups=4, stride=2, n=2),         # depthwise, multiplier 2
    _conv_case((8, 8), 4, 6, 3, n=1),                             # batch 1 (a vmapped example)
    _conv_case((7, 10), 3, 4, (3, 2), stride=(1, 2), padding=((2, 0), (1, 3))),
    # MobileNetV2 / EfficientNet-B0 shapes (small spatial sizes): depthwise 5×5 stride 2 with
    # torchvision's padding 2, depthwise 3×3 stride 1, and the expand-ratio-6 pointwise
    # convolution and its projection back.
    _conv_case((9, 9), 6, 6, 5, stride=2, padding=2, groups=6, bias=False),
    _conv_case((8, 8), 6, 6, 5, stride=2, padding=2, groups=6, bias=False),
    _conv_case((6, 6), 12, 12, 3, padding=1, groups=12, bias=False),
    _conv_case((5, 5), 4, 24, 1, padding="VALID", bias=False),      # expand ×6
    _conv_case((5, 5), 24, 4, 1, padding="VALID", bias=False),      # project back
]


# --- dense and flatten ------------------------------------------------------------------------

DENSE_CASES = [
    Case("dense", "4x5->3", ((4, 5), (5, 3), (3,)), ("x", "w", "b"),
         lambda ns: lambda x, w, b: ns.dense(x, w, b), _ref.dense),
    Case("dense", "1x7->10 no-bias", ((1, 7), (7, 10)), ("x", "w"),
         lambda ns: lambda x, w: ns.dense(x, w), _ref.dense),
    Case("dense", "3x16->1", ((3, 16), (16, 1), (1,)), ("x", "w", "b"),
         lambda ns: lambda x, w, b: ns.dense(x, w, b), _ref.dense),
    Case("flatten", "2x3x4x5", ((2, 3, 4, 5),), ("x",), lambda ns: ns.flatten, _ref.flatten),
]


# --- activations ------------------------------------------------------------------------------

def _away_from_kinks(rng, shapes):
    """Normal samples nudged away from 0, where ReLU-type rules are not differentiable."""
    x = rng.standard_normal(shapes[0])
    return [np.where(np.abs(x) < 1e-3, 1e-3 * np.sign(x) + 1e-3 * (x == 0), x)]


def _away_from(rng, shapes, kinks, scale):
    """Normal samples of standard deviation ``scale``, each at least 1e-3 from every kink (the
    kinks of ReLU6, hard sigmoid, hard swish), so both sides of each kink are sampled."""
    x = rng.standard_normal(shapes[0]) * scale
    for k in kinks:
        near = np.abs(x - k) < 1e-3
        x = np.where(near, k + 1e-3 * np.where(x >= k, 1, -1), x)
    return [x]


def _activation_case(name, shape=(2, 5, 4, 3), make=_away_from_kinks, **kw):
    def call(ns):
        return lambda x: getattr(ns, name)(x, **kw)
    torch_kw = {k: v for k, v in kw.items() if k != "residuals"}     # jbp's own option
    config = "x".join(map(str, shape)) + "".join(f" {k}={v}" for k, v in kw.items())
    return Case(name, config, (shape,), ("x",), call, _ref.activation(name, **torch_kw),
                make=make, kwargs=dict(kw))


ACTIVATION_CASES = [
    _activation_case("relu"),
    _activation_case("relu", (3, 7)),
    _activation_case("relu", residuals="int8"),        # the mask residual
    _activation_case("leaky_relu", negative_slope=0.01),
    _activation_case("leaky_relu", (3, 7), negative_slope=0.2),
    _activation_case("sigmoid"),
    _activation_case("tanh"),
    _activation_case("softmax", (4, 6)),
    _activation_case("softmax", (2, 3, 4, 5), axis=1),
    _activation_case("log_softmax", (4, 6)),
    _activation_case("log_softmax", (2, 3, 4, 5), axis=2),
    _activation_case("silu"),
    _activation_case("silu", (3, 7)),
    _activation_case("relu6", make=lambda rng, shapes: _away_from(rng, shapes, (0.0, 6.0), 4)),
    _activation_case("hard_sigmoid", make=lambda rng, shapes: _away_from(rng, shapes,
                                                                          (-3.0, 3.0), 3)),
    _activation_case("hard_swish", make=lambda rng, shapes: _away_from(rng, shapes,
                                                                        (-3.0, 3.0), 3)),
]


# --- pooling ----------------------------------------------------------------------------------

def _pool_case(kind, hw, window, stride=None, padding="VALID", count_include_pad=True, c=3):
    kw = dict(window=window, stride=stride, padding=padding)
    if kind == "avg":
        kw["count_include_pad"] = count_include_pad
    name = f"{kind}_pool"
    short = {"window": "k", "stride": "s", "padding": "pad"}

    def call(ns):
        return lambda x: getattr(ns, name)(x, **kw)

    cfg = _pooling.pool_config(jnp.zeros((1, *hw, 1)), window, stride, padding)
    (t, b), (l, r) = cfg.padding
    torch_ok = kind == "max" or count_include_pad or (
        t == b and l == r and 2 * t <= cfg.window[0] and 2 * l <= cfg.window[1])
    torch_fn = functools.partial(_ref.pool, kind=kind, **kw) if torch_ok else None
    config = f"{hw[0]}x{hw[1]} " + " ".join(f"{short[k]}={v}" for k, v in kw.items()
                                            if v is not None and k in short)
    if kind == "avg":
        config += " incl-pad" if count_include_pad else " excl-pad"
    return Case(name, config, ((2, *hw, c),), ("x",), call, torch_fn, tags=("pool",),
                kwargs=dict(kw))


POOL_CASES = [
    _pool_case("max", (6, 6), 2),
    _pool_case("max", (4, 9), (2, 3)),                            # tiling, not square
    _pool_case("max", (7, 7), 3, 2),                              # overlapping
    _pool_case("max", (8, 8), 3, 2, 1),                           # overlapping + padding
    _pool_case("max", (7, 9), 3, 1, "SAME"),
    _pool_case("max", (7, 9), (2, 3), (1, 2), ((1, 0), (0, 2))),
    _pool_case("max", (9, 7), 3, 2, "SAME"),
    _pool_case("max", (5, 5), 1),
    _pool_case("avg", (6, 6), 2),
    _pool_case("avg", (7, 7), 3, 2),
    _pool_case("avg", (8, 8), 3, 2, 1),
    _pool_case("avg", (8, 8), 3, 2, 1, count_include_pad=False),
    _pool_case("avg", (7, 9), 3, 1, "SAME"),
    _pool_case("avg", (7, 9), 3, 1, "SAME", count_include_pad=False),
    _pool_case("avg", (7, 9), (2, 3), (1, 2), ((1, 0), (0, 2)), count_include_pad=False),
    _pool_case("avg", (9, 7), 3, 2, "SAME"),
    Case("global_avg_pool", "6x6", ((2, 6, 6, 4),), ("x",), lambda ns: ns.global_avg_pool,
         _ref.global_avg_pool),
    Case("global_avg_pool", "7x5", ((3, 7, 5, 2),), ("x",), lambda ns: ns.global_avg_pool,
         _ref.global_avg_pool),
]


# --- batch norm -------------------------------------------------------------------------------

def _running_stats(c):
    rng = np.random.default_rng(1234)
    return rng.standard_normal(c) * 0.1, rng.uniform(0.5, 2.0, c)


def _bn_call(ns, *, train, c):
    mean, var = _running_stats(c)

    def f(x, gamma, beta):
        y, _ = ns.batch_norm(x, gamma, beta, jnp.asarray(mean, x.dtype), jnp.asarray(var, x.dtype),
                             train=train)
        return y
    return f


def _bn_case(shape, train):
    c = shape[-1]
    mean, var = _running_stats(c)
    return Case("batch_norm", "x".join(map(str, shape)) + (" train" if train else " eval"),
                (shape, (c,), (c,)), ("x", "gamma", "beta"),
                functools.partial(_bn_call, train=train, c=c),
                functools.partial(_ref.batch_norm, train=train, mean=mean, var=var),
                kwargs={"train": train})


NORM_CASES = [_bn_case((2, 5, 4, 3), True), _bn_case((2, 5, 4, 3), False),
              _bn_case((6, 4), True), _bn_case((6, 4), False), _bn_case((3, 3, 3, 5), True)]


# --- dropout ----------------------------------------------------------------------------------

def _dropout_call(ns, *, rate):
    key = jax.random.key(7)
    return lambda x: ns.dropout(x, rate, key, train=True)


DROPOUT_CASES = [
    Case("dropout", f"2x5x4x3 rate={r}", ((2, 5, 4, 3),), ("x",),
         functools.partial(_dropout_call, rate=r), kwargs={"rate": r, "train": True})
    for r in (0.1, 0.5)
]


def _stochastic_depth_call(ns, *, rate, mode):
    key = jax.random.key(11)
    return lambda x: ns.stochastic_depth(x, rate, key, train=True, mode=mode)


STOCHASTIC_DEPTH_CASES = [
    Case("stochastic_depth", f"8x3x4x2 rate={r} mode={m}", ((8, 3, 4, 2),), ("x",),
         functools.partial(_stochastic_depth_call, rate=r, mode=m),
         kwargs={"rate": r, "train": True, "mode": m})
    for r, m in ((0.2, "row"), (0.5, "row"), (0.3, "batch"))
]


# --- squeeze-and-excitation's channel scale -------------------------------------------------

CHANNEL_SCALE_CASES = [
    Case("channel_scale", f"{n}x{h}x{w}x{c}", ((n, h, w, c), (n, c)), ("x", "s"),
         lambda ns: ns.channel_scale, _ref.channel_scale)
    for n, h, w, c in ((2, 5, 4, 3), (3, 1, 1, 6))
]


# --- losses -----------------------------------------------------------------------------------

_LABELS = np.array([0, 3, 5, 2])


def _soft_labels(rng, shapes):
    logits, labels = (rng.standard_normal(s) for s in shapes)
    e = np.exp(labels)
    return [logits, e / e.sum(-1, keepdims=True)]


def _ce_int_call(ns, *, smoothing):
    return lambda z: ns.softmax_cross_entropy(z, jnp.asarray(_LABELS), label_smoothing=smoothing)


def _ce_soft_call(ns, *, smoothing):
    return lambda z, y: ns.softmax_cross_entropy(z, y, label_smoothing=smoothing)


def _targets01(rng, shapes):
    return [rng.standard_normal(shapes[0]) * 2, rng.uniform(0, 1, shapes[1])]


def _ce_case(config, smoothing, soft):
    shapes, names = (((4, 6), (4, 6)), ("logits", "labels")) if soft else (((4, 6),), ("logits",))
    if soft:
        call = functools.partial(_ce_soft_call, smoothing=smoothing)
        torch_fn = functools.partial(_ref.cross_entropy_soft, smoothing=smoothing)
    else:
        call = functools.partial(_ce_int_call, smoothing=smoothing)
        torch_fn = functools.partial(_ref.cross_entropy_int, labels=_LABELS, smoothing=smoothing)
    return Case("softmax_cross_entropy", config, shapes, names, call, torch_fn,
                make=_soft_labels if soft else None, kwargs={"label_smoothing": smoothing})


LOSS_CASES = [
    _ce_case("4x6 int labels", 0.0, soft=False),
    _ce_case("4x6 int labels smoothing=0.1", 0.1, soft=False),
    _ce_case("4x6 soft labels", 0.0, soft=True),
    _ce_case("4x6 soft labels smoothing=0.2", 0.2, soft=True),
    Case("mse", "3x5", ((3, 5), (3, 5)), ("pred", "target"), lambda ns: ns.mse, _ref.loss("mse")),
    Case("mse", "2x4x3x2", ((2, 4, 3, 2), (2, 4, 3, 2)), ("pred", "target"), lambda ns: ns.mse,
         _ref.loss("mse")),
    Case("sigmoid_binary_cross_entropy", "4x3", ((4, 3), (4, 3)), ("logits", "targets"),
         lambda ns: ns.sigmoid_binary_cross_entropy,
         _ref.loss("sigmoid_binary_cross_entropy"), make=_targets01),
    Case("sigmoid_binary_cross_entropy", "8", ((8,), (8,)), ("logits", "targets"),
         lambda ns: ns.sigmoid_binary_cross_entropy,
         _ref.loss("sigmoid_binary_cross_entropy"), make=_targets01),
]




CASES: Sequence[Case] = (CONV_CASES + DENSE_CASES + ACTIVATION_CASES + POOL_CASES + NORM_CASES
                         + DROPOUT_CASES + STOCHASTIC_DEPTH_CASES + CHANNEL_SCALE_CASES
                         + LOSS_CASES + OPTION_CASES + LOSS_OPTION_CASES + SEGMENTATION_CASES)

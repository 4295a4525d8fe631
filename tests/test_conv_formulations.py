"""The faster formulations of jbp._conv_kernels' table, each checked in float64 against
XLA's convolution (``jbp.layers.conv_equations.correlate``) and JAX's derivative of it (jax.vjp), on shapes chosen
to hit their edge cases: odd sizes, asymmetric padding, strides larger than the kernel,
dilation, batch sizes that do not divide the tap chunk. The public ``conv2d`` on these paths is
also covered by the gradcheck grid (jbp/testing/grid.py) and the PyTorch oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import functools
import zlib

from jbp.layers import conv as C
from jbp.layers import conv_equations as E
from jbp._conv_kernels import (FORMS, arguments, block_forms as B, choose, depthwise_forms as D,
                               dispatch, is_pointwise, tap_forms as T, tuning)
from jbp.gradcheck import vjp_at
from jbp.testing.grid import CONV_CASES
from jbp._conv_kernels.onednn import set_conv_backend

#: Outside the fast loop (``pytest -m 'not slow'``): every CPU form on many shapes (run it when
#: touching jbp/_conv_kernels). CI runs it.
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True, scope="module")
def _xla_forms_only():
    """These tests are about the XLA forms; the oneDNN form that heads the table is switched
    off here and tested in tests/test_onednn.py."""
    set_conv_backend("xla")
    yield
    set_conv_backend(None)

# (N, H, W, C_in, C_out, KH, KW, stride, padding, dilation)
SHAPES = [
    (2, 9, 8, 3, 4, 3, 3, 2, 1, 1),
    (2, 8, 8, 2, 3, 3, 3, 2, 1, 1),
    (2, 7, 9, 3, 5, 1, 1, 2, "VALID", 1),
    (2, 8, 8, 2, 2, 1, 1, (2, 3), "VALID", 1),
    (2, 5, 5, 2, 3, 1, 1, 2, 1, 1),
    (2, 10, 7, 2, 3, 5, 3, (3, 2), "SAME", 1),
    (2, 6, 6, 2, 2, 3, 3, 2, "VALID", 1),
    (3, 11, 11, 1, 2, 2, 2, 2, ((0, 1), (1, 0)), 1),
    (2, 8, 8, 2, 2, 4, 4, 3, ((2, 1), (0, 2)), 1),
    (1, 5, 5, 1, 1, 3, 3, 4, 2, 1),
    (16, 9, 8, 3, 4, 3, 3, 1, 1, 1),
    (5, 11, 11, 1, 2, 3, 3, (1, 2), ((0, 1), (1, 0)), 2),
    (8, 8, 8, 2, 2, 4, 4, 3, ((2, 1), (0, 2)), (2, 1)),
    (2, 14, 14, 6, 16, 5, 5, 1, "VALID", 1),
]

# Stride-1 thin layers for the column-blocked forms: widths that leave a partial last block,
# asymmetric padding, one row, one-column-wider-than-the-kernel inputs.
COLUMN_SHAPES = [
    (2, 28, 28, 1, 6, 5, 5, 1, 2, 1),
    (3, 9, 13, 3, 16, 3, 3, 1, 1, 1),
    (2, 7, 11, 2, 5, 2, 4, 1, ((1, 0), (2, 1)), 1),
    (2, 5, 23, 2, 5, 3, 4, 1, ((1, 0), (2, 1)), 1),            # B = 8, a partial last block
    (2, 14, 14, 6, 16, 5, 5, 1, "VALID", 1),
    (1, 1, 9, 4, 3, 1, 3, 1, "VALID", 1),
    (2, 6, 6, 1, 2, 3, 5, 1, ((0, 2), (3, 0)), 1),
    (2, 3, 4, 1, 6, 3, 6, 1, ((0, 0), (3, 3)), 1),             # kernel wider than the input
    (2, 4, 2, 1, 3, 3, 5, 1, ((1, 1), (6, 1)), 1),             # left padding wider than it
    (32, 5, 13, 3, 16, 3, 3, 1, 1, 1),                         # batch 32: dW columns too
    (33, 4, 9, 6, 8, 3, 3, 1, ((2, 0), (1, 2)), 1),            # N = 33: scan + remainder
]


def _compiled(fn, *args):
    """``fn(*args)`` as one compiled program, the arrays its arguments and the rest (shapes,
    configurations, chunk and block sizes) fixed in it: op-by-op dispatch would compile every
    op of a form as a program of its own, most of this file's time (docs/testing.md)."""
    where = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]

    def program(*arrays):
        full = list(args)
        for i, a in zip(where, arrays):
            full[i] = a
        return fn(*full)

    return jax.jit(program)(*(args[i] for i in where))


@functools.lru_cache(maxsize=None)      # every test of a shape shares its inputs and references
def _setup(shape):
    n, h, w, cin, cout, kh, kw, stride, padding, dilation = shape
    rng = np.random.default_rng(zlib.crc32(str(shape).encode()))   # the same every run
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)))
    wt = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)))
    cfg = C.conv_config(x, wt, stride=stride, padding=padding, dilation=dilation)
    z_shape = jax.eval_shape(lambda x, w: E.correlate(x, w, cfg), x, wt).shape
    g = jnp.asarray(rng.standard_normal(z_shape))
    _, (dx_ref, dw_ref), _ = vjp_at(lambda x, w: E.correlate(x, w, cfg), (x, wt), g)
    return x, wt, g, cfg, dx_ref, dw_ref


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                               atol=1e-12 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("form", ["tap_weight_grad", "patch_weight_grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_chunked_weight_grads(shape, form):
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(_compiled(getattr(T, form), x, g, wt.shape, cfg), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_chunked_weight_grad(shape, chunk):
    """Chunks that divide the batch, and ones that leave a smaller last chunk."""
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(_compiled(T.batch_chunked_weight_grad, x, g, wt.shape, cfg, chunk), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1], ids=str)
def test_split_tap_weight_grad(shape, chunk):
    """Stride 1 (the only stride it takes): asymmetric padding, dilation, kernels wider than
    the input or one row tall; chunks that divide the batch, leave a remainder, or hold it."""
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(_compiled(B.split_tap_weight_grad, x, g, wt.shape, cfg, chunk), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1], ids=str)
def test_split_tap_correlate(shape, chunk):
    """The split forward on the same stride-1 shapes: chunks that divide the batch, leave a
    smaller last chunk, or hold it all."""
    x, wt, _, cfg, _, _ = _setup(shape)
    _close(_compiled(B.split_tap_correlate, x, wt, cfg, chunk),
           _compiled(E.correlate, x, wt, cfg))


def test_manual_forward_takes_the_split_on_cpu():
    """Under differentiation the manual rule's forward of a small wide layer is the split form
    on CPU (matmuls, no forward convolution), and its value is XLA's convolution's."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only check")
    import jbp
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4, 4, 64)))
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)))
    cfg = C.conv_config(x, w, padding=1)
    assert choose("forward", x.shape, w.shape, cfg, x.dtype)[0].name == "split"
    z, _ = jax.vjp(lambda x, w: jbp.conv2d(x, w, padding=1), x, w)
    _close(z, E.correlate(x, w, cfg))
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    hlo = jax.jit(lambda x, w: jax.vjp(lambda x, w: jbp.conv2d(x, w, padding=1), x, w)[0]
                  ).lower(x32, w32).compile().as_text()
    assert "convolution(" not in hlo and ("dot(" in hlo or "dot_general" in hlo), hlo


@pytest.mark.parametrize("block", [2, 4, 8])
@pytest.mark.parametrize("shape", COLUMN_SHAPES, ids=str)
def test_column_blocked_forms(shape, block):
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(_compiled(B.column_blocked_correlate, x, wt, cfg, block),
           _compiled(E.correlate, x, wt, cfg))
    _close(_compiled(B.column_blocked_weight_grad, x, g, wt.shape, cfg, block), dw_ref)


@pytest.mark.parametrize("images", [1, 2, 4, 7])
def test_column_blocked_weight_grad_in_batch_chunks(monkeypatch, images):
    """Past COLUMN_PATCH_BYTES the patch matrix is built per chunk of images inside a scan,
    plus one call for the images left over (7 = one chunk of 7, no scan)."""
    x, wt, g, cfg, _, dw_ref = _setup((7, 9, 13, 3, 6, 3, 3, 1, 1, 1))
    per_image = 9 * 4 * (3 * 2 * 4 * 3) * 8       # H_out · blocks · KH·KB·B·C_in · 8 bytes
    monkeypatch.setattr(tuning, "COLUMN_PATCH_BYTES", images * per_image)
    jaxpr = str(jax.make_jaxpr(
        lambda x, g: B.column_blocked_weight_grad(x, g, wt.shape, cfg, 4))(x, g))
    assert ("scan" in jaxpr) == (images < 7)
    _close(B.column_blocked_weight_grad(x, g, wt.shape, cfg, 4), dw_ref)


def test_column_blocked_forward_past_the_patch_limit_is_a_convolution(monkeypatch):
    """Up to COLUMN_FORWARD_PATCH_BYTES the blocked forward is one matmul of the patch matrix;
    past it, a convolution of the blocked input with the blocked kernel. Both are the
    convolution."""
    x, wt, _, cfg, _, _ = _setup((3, 9, 13, 3, 16, 3, 3, 1, 1, 1))
    ref = E.correlate(x, wt, cfg)
    for limit in (1 << 30, 0):
        monkeypatch.setattr(tuning, "COLUMN_FORWARD_PATCH_BYTES", limit)
        jaxpr = str(jax.make_jaxpr(lambda x, w: B.column_blocked_correlate(x, w, cfg, 2))(x, wt))
        assert ("conv_general_dilated" in jaxpr) == (limit == 0), jaxpr
        _close(B.column_blocked_correlate(x, wt, cfg, 2), ref)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (4, 4, 4, 6), (1, 1, 7, 3), (2, 2, 2, 16),
                                   (3, 5, 7, 1), (2, 4, 4, 15), (0, 3, 3, 4)])
def test_channel_sum(shape):
    """The bias gradient, folded R rows at a time for thin layers (R = 16, 8, 4, 2 or 1 as the
    row count allows), is the plain sum over N, H, W."""
    g = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
    got = E.channel_sum(g)
    assert got.shape == (shape[-1],) and got.dtype == g.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(g).sum(axis=(0, 1, 2)),
                               rtol=1e-12, atol=1e-12)


def _blocks(shape):
    """(forward B, weight-gradient B) that the table picks for a float64 shape, 1 for none."""
    n, h, w, cin, cout, kh, kw, stride, padding, dilation = shape
    x_shape, w_shape = (n, h, w, cin), (kh, kw, cin, cout)
    cfg = C.conv_config(jnp.zeros(x_shape), jnp.zeros(w_shape), stride=stride,
                        padding=padding, dilation=dilation)
    blocks = []
    for equation in ("forward", "weight_grad"):
        chosen = choose(equation, x_shape, w_shape, cfg, jnp.float64)
        blocks.append(chosen[1]["block"] if chosen and chosen[0].name == "columns" else 1)
    return tuple(blocks)


BLOCKED_SHAPES = [s for s in SHAPES + COLUMN_SHAPES if _blocks(s)[0] > 1]


def test_shapes_reach_the_column_blocked_dispatch():
    """test_forward has blocked shapes to run on, and test_cpu_dispatch reaches the
    column-blocked weight gradient (with and without a remainder after the scan)."""
    assert len(BLOCKED_SHAPES) >= 4, BLOCKED_SHAPES
    assert sum(_blocks(s)[1] > 1 for s in COLUMN_SHAPES) >= 2


@pytest.mark.parametrize("shape", BLOCKED_SHAPES, ids=str)
def test_forward(shape):
    """``_forward``, column-blocked on CPU for these shapes, is the convolution; forward-mode
    differentiation of the autodiff twin (through ``lax.platform_dependent``) is JAX's."""
    x, wt, _, cfg, _, _ = _setup(shape)
    _close(_compiled(C._forward, x, wt, None, cfg), _compiled(E.correlate, x, wt, cfg))
    tangents = (jnp.ones_like(x), jnp.full_like(wt, 0.5))
    _, jvp = _compiled(lambda x, w, tx, tw: jax.jvp(lambda x, w: C._forward(x, w, None, cfg),
                                                    (x, w), (tx, tw)), x, wt, *tangents)
    _, jvp_ref = _compiled(lambda x, w, tx, tw: jax.jvp(lambda x, w: E.correlate(x, w, cfg),
                                                        (x, w), (tx, tw)), x, wt, *tangents)
    _close(jvp, jvp_ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1 and s[9] == 1],
                         ids=str)
def test_row_input_grad(shape):
    x, wt, g, cfg, dx_ref, _ = _setup(shape)
    _close(_compiled(T.row_input_grad, g, wt, x.shape, cfg), dx_ref)


@pytest.mark.parametrize("equation", ["forward", "input_grad", "weight_grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dispatch(shape, equation):
    """``dispatch(equation, *arguments(...))``, the one call of the table's forms and generic
    functions, computes its equation: the convolution, or JAX's derivative of it."""
    x, wt, g, cfg, dx_ref, dw_ref = _setup(shape)
    want = {"forward": _compiled(E.correlate, x, wt, cfg), "input_grad": dx_ref,
            "weight_grad": dw_ref}
    _close(_compiled(dispatch, equation, *arguments(equation, x, wt, g, cfg)), want[equation])


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[9] == 1], ids=str)
def test_phase_input_grad(shape):
    x, wt, g, cfg, dx_ref, _ = _setup(shape)
    _close(_compiled(T.phase_input_grad, g, wt, x.shape, cfg), dx_ref)


@pytest.mark.parametrize("shape", SHAPES + COLUMN_SHAPES, ids=str)
def test_cpu_dispatch(shape):
    """The rule's backward, with whatever forms the table chooses on this backend."""
    x, wt, g, cfg, dx_ref, dw_ref = _setup(shape)
    dx, dw, _ = _compiled(lambda x, w, g: C._bwd(cfg, (x, w, None), g), x, wt, g)
    _close(dx, dx_ref)
    _close(dw, dw_ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES if (s[5], s[6]) == (1, 1)], ids=str)
def test_pointwise(shape):
    x, wt, g, cfg, dx_ref, dw_ref = _setup(shape)
    if not is_pointwise(wt.shape, cfg):
        pytest.skip("padded 1x1: not pointwise (takes the phase path, tested above)")
    _close(_compiled(T.pointwise_input_grad, g, wt, x.shape, cfg), dx_ref)
    _close(_compiled(T.pointwise_weight_grad, x, g, wt.shape, cfg), dw_ref)


# Depthwise (groups = C_in = C_out): (N, H, W, C, KH, KW, stride, padding, dilation). The nets'
# shapes small (EfficientNet's 5×5 stride 2 padding 2 on odd and even sizes, MobileNetV2's 3×3
# stride 1 and 2), and the edges: asymmetric padding, dilation, a stride larger than the kernel,
# unpadded, a 1×1 depthwise kernel, a kernel wider than the input.
DEPTHWISE_SHAPES = [
    (2, 9, 9, 6, 5, 5, 2, 2, 1),
    (2, 8, 8, 6, 5, 5, 2, 2, 1),
    (2, 6, 7, 12, 3, 3, 1, 1, 1),
    (3, 8, 7, 4, 3, 3, 2, 1, 1),
    (2, 11, 10, 3, 3, 2, (2, 1), ((0, 2), (1, 0)), (1, 2)),
    (2, 10, 9, 5, 3, 3, 1, 1, 2),
    (1, 8, 8, 2, 2, 2, 3, "VALID", 1),
    (2, 5, 6, 3, 1, 1, 2, "VALID", 1),
    (1, 3, 3, 2, 5, 5, 1, 2, 1),
]


@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES, ids=str)
def test_depthwise_forms(shape):
    """The shifted-slice forms of a depthwise convolution: XLA's grouped convolution and JAX's
    derivative of it, and the rule's backward through the table."""
    n, h, w, c, kh, kw, stride, padding, dilation = shape
    rng = np.random.default_rng(zlib.crc32(str(shape).encode()))
    x = jnp.asarray(rng.standard_normal((n, h, w, c)))
    wt = jnp.asarray(rng.standard_normal((kh, kw, 1, c)))
    cfg = C.conv_config(x, wt, stride=stride, padding=padding, dilation=dilation, groups=c)
    assert D.is_depthwise(x.shape, wt.shape, cfg)
    z_shape = jax.eval_shape(lambda x, w: E.correlate(x, w, cfg), x, wt).shape
    g = jnp.asarray(rng.standard_normal(z_shape))
    z, (dx_ref, dw_ref), _ = vjp_at(lambda x, w: E.correlate(x, w, cfg), (x, wt), g)
    _close(_compiled(D.correlate, x, wt, cfg), z)
    _close(_compiled(D.input_grad, g, wt, x.shape, cfg), dx_ref)
    _close(_compiled(D.weight_grad, x, g, wt.shape, cfg), dw_ref)
    dx, dw, _ = _compiled(lambda x, w, g: C._bwd(cfg, (x, w, None), g), x, wt, g)
    _close(dx, dx_ref)
    _close(dw, dw_ref)


# --- which form the table chooses ------------------------------------------------------------
#
# (equation, x shape, kernel shape, conv2d keywords, dtype, the form chosen or None, its
# parameters): each row is a rule of docs/performance.md, stated for one shape. The expected
# chunk sizes are worked out by hand in the comments.
F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16
VALID, PAD2, S2 = {"padding": "VALID"}, {"padding": 2}, {"stride": 2}
CHOSEN = [
    # weight gradient: per-tap from 32 input channels over >= 16×16 pixels, batch >= 32 ...
    ("weight_grad", (32, 16, 16, 32), (3, 3, 32, 4), {}, F32, "taps", {}),
    ("weight_grad", (32, 8, 8, 32), (3, 3, 32, 4), {}, F32, None, None),       # small images
    ("weight_grad", (32, 16, 16, 16), (3, 3, 16, 4), {}, F32, None, None),     # narrow
    ("weight_grad", (8, 16, 16, 32), (3, 3, 32, 4), {}, F32, None, None),      # small batch
    ("weight_grad", (32, 16, 16, 64), (3, 3, 64, 4), {}, F32, "taps", {}),     # not patches
    # ... patches for C_in >= 64 over <= 8×8 pixels, or strided with rows >= 128 values
    ("weight_grad", (32, 8, 8, 64), (3, 3, 64, 4), {}, F32, "patches", {}),
    ("weight_grad", (33, 7, 9, 64), (3, 3, 64, 3), {}, F32, "patches", {}),
    ("weight_grad", (63, 8, 8, 64), (3, 3, 64, 4), {}, F32, "patches", {}),    # batch < 64
    ("weight_grad", (16, 8, 8, 64), (3, 3, 64, 4), {}, F32, None, None),       # small batch
    ("weight_grad", (32, 7, 7, 256), (3, 3, 256, 4), {}, F32, None, None),     # rows of 2304
    ("weight_grad", (32, 17, 15, 16), (3, 3, 16, 4), S2, F32, "patches", {}),  # 144-value rows
    ("weight_grad", (32, 17, 15, 8), (3, 3, 8, 4), S2, F32, None, None),       # 72-value rows
    # ... column blocks for thin layers from batch 32 (LeNet-5's 6 -> 16: B = 2, 2·16 >= 24)
    ("weight_grad", (128, 14, 14, 6), (5, 5, 6, 16), VALID, F32, "columns", {"block": 2}),
    ("weight_grad", (16, 14, 14, 6), (5, 5, 6, 16), VALID, F32, None, None),
    ("weight_grad", (128, 14, 14, 6), (5, 5, 6, 16), VALID, BF16, None, None),
    # ... split taps for 3×3 stride 1 with <= 16 channels on one side, batch >= 64; chunk = the
    # largest power of two of images whose A, (H_out + 2)·W_out·3·C_in·4 bytes, fits in 2 MiB:
    # 34·32·48·4 = 208,896 B an image -> 8
    ("weight_grad", (128, 32, 32, 16), (3, 3, 16, 16), {}, F32, "split", {"chunk": 8}),
    ("weight_grad", (128, 16, 16, 16), (3, 3, 16, 16), {}, F32, "split", {"chunk": 32}),  # 55 KB
    ("weight_grad", (64, 512, 512, 16), (3, 3, 16, 16), {}, F32, "split", {"chunk": 1}),
    ("weight_grad", (128, 32, 32, 16), (3, 3, 16, 32), {}, F32, "split", {"chunk": 8}),
    ("weight_grad", (128, 32, 32, 32), (3, 3, 32, 16), {}, F32, "split", {"chunk": 4}),  # 417 KB
    ("weight_grad", (128, 16, 16, 32), (3, 3, 32, 32), {}, F32, "chunks", {"chunk": 4}),
    ("weight_grad", (63, 32, 32, 16), (3, 3, 16, 16), {}, F32, None, None),    # batch < 64
    # ... batch chunks from batch 64: 16 images with <= 16 output channels, else 4, at most 32
    # chunks (1000 images: 32 an image)
    ("weight_grad", (128, 32, 32, 16), (3, 3, 16, 16), S2, F32, "chunks", {"chunk": 16}),
    ("weight_grad", (64, 8, 8, 64), (3, 3, 64, 64), {}, F32, "chunks", {"chunk": 4}),
    ("weight_grad", (1000, 8, 8, 64), (3, 3, 64, 64), {}, F32, "chunks", {"chunk": 32}),
    ("weight_grad", (128, 32, 32, 16), (3, 3, 16, 16), {}, BF16, None, None),
    # ... and a matmul for unpadded 1×1 kernels
    ("weight_grad", (128, 8, 8, 16), (1, 1, 16, 32), {**S2, **VALID}, F32, "pointwise", {}),
    ("weight_grad", (1, 10, 7, 3), (1, 1, 3, 4), {"stride": 3, **VALID}, F32, "pointwise", {}),
    ("weight_grad", (1, 5, 5, 2), (1, 1, 2, 3), {"stride": 2, "padding": 1}, F32, None, None),
    # input gradient: stride phases and pointwise only for δ of >= 16×16 pixels
    ("input_grad", (32, 16, 16, 32), (3, 3, 32, 64), S2, F32, None, None),     # 8×8 δ
    ("input_grad", (32, 32, 32, 32), (3, 3, 32, 64), S2, F32, "phases", {}),
    ("input_grad", (32, 32, 32, 16), (1, 1, 16, 32), VALID, F32, "pointwise", {}),
    ("input_grad", (32, 8, 8, 16), (1, 1, 16, 32), VALID, F32, None, None),
    # ... rows: thin, unpadded stride-1 layers with W <= 6·KW (LeNet-5's 6 -> 16: 14 <= 30)
    ("input_grad", (128, 14, 14, 6), (5, 5, 6, 16), VALID, F32, "rows", {}),
    ("input_grad", (128, 14, 14, 6), (5, 5, 6, 16), VALID, BF16, None, None),
    ("input_grad", (128, 14, 14, 6), (5, 5, 6, 17), VALID, F32, None, None),   # 17 out
    ("input_grad", (128, 30, 30, 6), (5, 5, 6, 16), VALID, F32, "rows", {}),   # 30 <= 6·5
    ("input_grad", (128, 31, 31, 6), (5, 5, 6, 16), VALID, F32, None, None),   # 31 > 6·5
    ("input_grad", (128, 14, 14, 16), (5, 5, 16, 6), VALID, F32, None, None),  # 16 in
    ("input_grad", (128, 14, 14, 6), (5, 5, 6, 16), PAD2, F32, None, None),    # padded
    # forward: column blocks for C_in <= 4, C_out <= 16, B the smallest of 2, 4, 8 with
    # B·C_out >= 24, the output at least two blocks wide ...
    ("forward", (128, 28, 28, 1), (5, 5, 1, 6), PAD2, F32, "columns", {"block": 4}),
    ("forward", (128, 32, 32, 3), (3, 3, 3, 16), {}, F32, "columns", {"block": 2}),
    ("forward", (128, 32, 32, 3), (3, 3, 3, 16), {}, F64, "columns", {"block": 2}),
    ("forward", (128, 32, 32, 16), (3, 3, 16, 16), {}, F32, None, None),
    ("forward", (128, 32, 32, 3), (3, 3, 3, 17), {}, F32, None, None),
    ("forward", (128, 32, 32, 3), (3, 3, 3, 16), {}, BF16, None, None),
    ("forward", (128, 32, 32, 3), (3, 1, 3, 16), {}, F32, None, None),         # 1 column
    ("forward", (128, 32, 3, 3), (3, 3, 3, 16), {}, F32, None, None),          # W_out 3 < 4
    ("forward", (128, 32, 32, 3), (3, 3, 3, 16), S2, F32, None, None),
    ("forward", (128, 8, 8, 4), (3, 3, 2, 4), {"groups": 2}, F32, None, None),
    ("forward", (128, 32, 32, 3), (3, 3, 3, 16), {"dilation": 2}, F32, None, None),
    ("forward", (64, 28, 28, 1), (2, 2, 1, 1), VALID, F32, None, None),        # 8·1 < 24
    ("forward", (64, 28, 28, 1), (2, 2, 1, 2), VALID, F32, None, None),        # 8·2 < 24
    ("forward", (64, 28, 28, 1), (2, 2, 1, 3), VALID, F32, "columns", {"block": 8}),
    ("forward", (1, 8, 8, 1), (3, 3, 1, 6), {}, F32, "columns", {"block": 4}),  # W_out 8
    ("forward", (1, 8, 7, 1), (3, 3, 1, 6), {}, F32, None, None),               # W_out 7
    ("forward", (16, 28, 28, 1), (5, 5, 1, 6), PAD2, F32, "columns", {"block": 4}),
    # ... and up to 8 input channels from batch 32, sharing the weight gradient's patch matrix
    ("forward", (128, 14, 14, 6), (5, 5, 6, 16), VALID, F32, "columns", {"block": 2}),
    ("forward", (16, 14, 14, 6), (5, 5, 6, 16), VALID, F32, None, None),
    ("forward", (128, 14, 14, 9), (5, 5, 9, 16), VALID, F32, None, None),
    # ... split (the rule's forward only): 3×3 stride 1, >= 64 channels on both sides over
    # <= 8×8 pixels, batch >= 64; chunk from 10·8·192·itemsize bytes an image: float32 61 KB
    # -> 32, float64 123 KB -> 16, and at least batch / 32
    ("forward", (128, 8, 8, 64), (3, 3, 64, 64), {}, F32, "split", {"chunk": 32}),
    ("forward", (64, 8, 8, 64), (3, 3, 64, 128), {}, F64, "split", {"chunk": 16}),
    ("forward", (4096, 8, 8, 64), (3, 3, 64, 64), {}, F32, "split", {"chunk": 128}),
    ("forward", (63, 8, 8, 64), (3, 3, 64, 64), {}, F32, None, None),          # batch < 64
    ("forward", (128, 16, 16, 64), (3, 3, 64, 64), {}, F32, None, None),       # 16×16 pixels
    ("forward", (128, 8, 8, 32), (3, 3, 32, 64), {}, F32, None, None),         # C_in < 64
    ("forward", (128, 8, 8, 64), (3, 3, 64, 63), {}, F32, None, None),         # C_out < 64
    ("forward", (128, 8, 8, 64), (3, 3, 64, 64), S2, F32, None, None),
    ("forward", (128, 8, 8, 64), (3, 3, 64, 64), {}, BF16, None, None),
    # depthwise (groups = C_in = C_out), every equation, float32 and float64; not bfloat16, not a
    # channel multiplier of 2, not other groups
    ("forward", (4, 56, 56, 144), (5, 5, 1, 144), {**S2, **PAD2, "groups": 144}, F32,
     "depthwise", {}),
    ("input_grad", (4, 56, 56, 144), (5, 5, 1, 144), {**S2, **PAD2, "groups": 144}, F32,
     "depthwise", {}),
    ("weight_grad", (4, 112, 112, 32), (3, 3, 1, 32), {"padding": 1, "groups": 32}, F64,
     "depthwise", {}),
    ("input_grad", (4, 56, 56, 144), (5, 5, 1, 144), {**S2, **PAD2, "groups": 144}, BF16,
     None, None),
    ("forward", (4, 8, 8, 4), (3, 3, 1, 8), {"groups": 4}, F32, None, None),
    ("weight_grad", (4, 8, 8, 4), (3, 3, 2, 4), {"groups": 2}, F32, None, None),
]


@pytest.mark.parametrize("equation, x_shape, w_shape, kwargs, dtype, name, params", CHOSEN,
                         ids=[f"{r[0]}-{r[1]}-{r[2]}-{r[3]}-{jnp.dtype(r[4]).name}"
                              for r in CHOSEN])
def test_table_chooses(equation, x_shape, w_shape, kwargs, dtype, name, params):
    cfg = C.conv_config(jnp.zeros(x_shape, dtype), jnp.zeros(w_shape, dtype), **kwargs)
    chosen = choose(equation, x_shape, w_shape, cfg, dtype)
    assert (chosen and (chosen[0].name, chosen[1])) == (name and (name, params)), chosen


def test_autodiff_forward_skips_rule_only_forms():
    """``jbp.autodiff`` differentiates the generic forward where only the rule takes the split."""
    cfg = C.conv_config(jnp.zeros((128, 8, 8, 64)), jnp.zeros((3, 3, 64, 64)))
    assert choose("forward", (128, 8, 8, 64), (3, 3, 64, 64), cfg, F32, rule=False) is None


def test_grid_reaches_every_form():
    """The grid's conv cases (jbp/testing/grid.py) reach every form of the table, and the generic
    convolution of each equation."""
    reached = set()
    for case in CONV_CASES:
        kw = {k: v for k, v in case.kwargs.items() if k != "padding_mode"}
        x, w = jnp.zeros(case.shapes[0]), jnp.zeros(case.shapes[1])
        cfg = C.conv_config(x, w, **kw)
        for equation in FORMS:
            chosen = choose(equation, x.shape, w.shape, cfg, x.dtype)
            reached.add((equation, chosen[0].name if chosen else "generic"))
    expected = {(eq, form.name) for eq, forms in FORMS.items() for form in forms
                if form.name != "onednn"}  # off here; tests/test_onednn.py checks its reach
    assert reached == expected | {(eq, "generic") for eq in FORMS}, reached ^ expected


def test_cpu_lowering_takes_the_cpu_branch():
    """On CPU the manual backward of a 1x1 stride-2 conv is a matmul, not a convolution
    (lax.platform_dependent picks per backend at lowering time)."""
    if jax.default_backend() != "cpu":
        pytest.skip("CPU-only check")
    import jbp
    x = jnp.ones((4, 8, 8, 16), jnp.float32)
    w = jnp.ones((1, 1, 16, 32), jnp.float32)

    def loss(w):
        return jnp.sum(jbp.conv2d(x, w, stride=2, padding="VALID") ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(w).compile().as_text()
    # The forward is one convolution; the weight gradient must not add a second one.
    assert hlo.count("convolution(") == 1, hlo
    assert "dot(" in hlo or "dot_general" in hlo


@pytest.mark.parametrize("x_shape, w_shape, dtype, chosen", [
    ((2, 8, 8, 16), (3, 3, 16, 16), F32, False),     # small batch: no form for any equation
    ((128, 32, 32, 16), (3, 3, 16, 16), F32, True),  # the split weight gradient
    ((128, 32, 32, 16), (3, 3, 16, 16), BF16, False),  # ... not in bfloat16
])
def test_platform_dependent_only_where_a_form_is_chosen(x_shape, w_shape, dtype, chosen):
    """The rule emits ``lax.platform_dependent`` (a ``platform_index`` in the jaxpr) only where
    the table chooses a form; elsewhere every backend, CPU included, gets the generic
    convolutions alone."""
    import jbp
    f = lambda x, w: jnp.sum(jbp.conv2d(x, w))
    jaxpr = str(jax.make_jaxpr(jax.grad(f, (0, 1)))(jnp.ones(x_shape, dtype),
                                                     jnp.ones(w_shape, dtype)))
    assert ("platform_index" in jaxpr) == chosen

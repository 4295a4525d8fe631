"""The faster formulations jbp.conv dispatches to on CPU, each checked in float64 against
XLA's convolution (``_correlate``) and JAX's derivative of it (jax.vjp), on shapes chosen
to hit their edge cases: odd sizes, asymmetric padding, strides larger than the kernel,
dilation, batch sizes that do not divide the tap chunk. The public ``conv2d`` on these paths is
also covered by the gradcheck grid (jbp/cases.py) and the PyTorch oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import conv as C
from jbp.testing.grid import CONV_CASES

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


def _setup(shape):
    n, h, w, cin, cout, kh, kw, stride, padding, dilation = shape
    rng = np.random.default_rng(abs(hash(str(shape))) % 2**32)
    x = jnp.asarray(rng.standard_normal((n, h, w, cin)))
    wt = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)))
    cfg = C.conv_config(x, wt, stride=stride, padding=padding, dilation=dilation)
    z, vjp = jax.vjp(lambda x, w: C._correlate(x, w, cfg), x, wt)
    g = jnp.asarray(rng.standard_normal(z.shape))
    dx_ref, dw_ref = vjp(g)
    return x, wt, g, cfg, dx_ref, dw_ref


def _close(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12,
                               atol=1e-12 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("form", ["_tap_weight_grad", "_patch_weight_grad"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_chunked_weight_grads(shape, form):
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(getattr(C, form)(x, g, wt.shape, cfg), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_chunked_weight_grad(shape, chunk):
    """Chunks that divide the batch, and ones that leave a smaller last chunk."""
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(C._batch_chunked_weight_grad(x, g, wt.shape, cfg, chunk), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1], ids=str)
def test_split_tap_weight_grad(shape, chunk):
    """Stride 1 (the only stride it takes): asymmetric padding, dilation, kernels wider than
    the input or one row tall; chunks that divide the batch, leave a remainder, or hold it."""
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(C._split_tap_weight_grad(x, g, wt.shape, cfg, chunk), dw_ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, 64])
@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1], ids=str)
def test_split_tap_correlate(shape, chunk):
    """The split forward on the same stride-1 shapes: chunks that divide the batch, leave a
    smaller last chunk, or hold it all."""
    x, wt, _, cfg, _, _ = _setup(shape)
    _close(C._split_tap_correlate(x, wt, cfg, chunk), C._correlate(x, wt, cfg))


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
    assert C._use_split_forward(x.shape, w.shape, cfg, x.dtype)
    z, _ = jax.vjp(lambda x, w: jbp.conv2d(x, w, padding=1), x, w)
    _close(z, C._correlate(x, w, cfg))
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    hlo = jax.jit(lambda x, w: jax.vjp(lambda x, w: jbp.conv2d(x, w, padding=1), x, w)[0]
                  ).lower(x32, w32).compile().as_text()
    assert "convolution(" not in hlo and ("dot(" in hlo or "dot_general" in hlo), hlo


@pytest.mark.parametrize("block", [2, 4, 8])
@pytest.mark.parametrize("shape", COLUMN_SHAPES, ids=str)
def test_column_blocked_forms(shape, block):
    x, wt, g, cfg, _, dw_ref = _setup(shape)
    _close(C._column_blocked_correlate(x, wt, cfg, block), C._correlate(x, wt, cfg))
    _close(C._column_blocked_weight_grad(x, g, wt.shape, cfg, block), dw_ref)


@pytest.mark.parametrize("images", [1, 2, 4, 7])
def test_column_blocked_weight_grad_in_batch_chunks(monkeypatch, images):
    """Past COLUMN_PATCH_BYTES the patch matrix is built per chunk of images inside a scan,
    plus one call for the images left over (7 = one chunk of 7, no scan)."""
    x, wt, g, cfg, _, dw_ref = _setup((7, 9, 13, 3, 6, 3, 3, 1, 1, 1))
    per_image = 9 * 4 * (3 * 2 * 4 * 3) * 8       # H_out · blocks · KH·KB·B·C_in · 8 bytes
    monkeypatch.setattr(C, "COLUMN_PATCH_BYTES", images * per_image)
    jaxpr = str(jax.make_jaxpr(
        lambda x, g: C._column_blocked_weight_grad(x, g, wt.shape, cfg, 4))(x, g))
    assert ("scan" in jaxpr) == (images < 7)
    _close(C._column_blocked_weight_grad(x, g, wt.shape, cfg, 4), dw_ref)


def test_column_blocked_forward_past_the_patch_limit_is_a_convolution(monkeypatch):
    """Up to COLUMN_FORWARD_PATCH_BYTES the blocked forward is one matmul of the patch matrix;
    past it, a convolution of the blocked input with the blocked kernel. Both are the
    convolution."""
    x, wt, _, cfg, _, _ = _setup((3, 9, 13, 3, 16, 3, 3, 1, 1, 1))
    ref = C._correlate(x, wt, cfg)
    for limit in (1 << 30, 0):
        monkeypatch.setattr(C, "COLUMN_FORWARD_PATCH_BYTES", limit)
        jaxpr = str(jax.make_jaxpr(lambda x, w: C._column_blocked_correlate(x, w, cfg, 2))(x, wt))
        assert ("conv_general_dilated" in jaxpr) == (limit == 0), jaxpr
        _close(C._column_blocked_correlate(x, wt, cfg, 2), ref)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (4, 4, 4, 6), (1, 1, 7, 3), (2, 2, 2, 16),
                                   (3, 5, 7, 1), (2, 4, 4, 15), (0, 3, 3, 4)])
def test_channel_sum(shape):
    """The bias gradient, folded R rows at a time for thin layers (R = 16, 8, 4, 2 or 1 as the
    row count allows), is the plain sum over N, H, W."""
    g = jnp.asarray(np.random.default_rng(0).standard_normal(shape))
    got = C._channel_sum(g)
    assert got.shape == (shape[-1],) and got.dtype == g.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(g).sum(axis=(0, 1, 2)),
                               rtol=1e-12, atol=1e-12)


def _blocks(shape):
    """(forward B, weight-gradient B) that jbp's dispatch picks for a float64 shape."""
    n, h, w, cin, cout, kh, kw, stride, padding, dilation = shape
    x_shape, w_shape = (n, h, w, cin), (kh, kw, cin, cout)
    cfg = C.conv_config(jnp.zeros(x_shape), jnp.zeros(w_shape), stride=stride,
                        padding=padding, dilation=dilation)
    return (C._forward_column_block(x_shape, w_shape, jnp.float64, cfg),
            C._weight_grad_column_block(x_shape, w_shape, jnp.float64, cfg))


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
    _close(C._forward(x, wt, None, cfg), C._correlate(x, wt, cfg))
    tangents = (jnp.ones_like(x), jnp.full_like(wt, 0.5))
    _, jvp = jax.jvp(lambda x, w: C._forward(x, w, None, cfg), (x, wt), tangents)
    _, jvp_ref = jax.jvp(lambda x, w: C._correlate(x, w, cfg), (x, wt), tangents)
    _close(jvp, jvp_ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES + COLUMN_SHAPES if s[7] == 1 and s[9] == 1],
                         ids=str)
def test_row_input_grad(shape):
    x, wt, g, cfg, dx_ref, _ = _setup(shape)
    _close(C._row_input_grad(g, wt, x.shape, cfg), dx_ref)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_tap_input_grad(shape):
    x, wt, g, cfg, dx_ref, _ = _setup(shape)
    _close(C._tap_input_grad(g, wt, x.shape, cfg), dx_ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[9] == 1], ids=str)
def test_phase_input_grad(shape):
    x, wt, g, cfg, dx_ref, _ = _setup(shape)
    _close(C._phase_input_grad(g, wt, x.shape, cfg), dx_ref)


@pytest.mark.parametrize("shape", SHAPES + COLUMN_SHAPES, ids=str)
def test_cpu_dispatch(shape):
    x, wt, g, cfg, dx_ref, dw_ref = _setup(shape)
    _close(C._cpu_input_grad(g, wt, x.shape, cfg), dx_ref)
    _close(C._cpu_weight_grad(x, g, wt.shape, cfg), dw_ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES if (s[5], s[6]) == (1, 1)], ids=str)
def test_pointwise(shape):
    x, wt, g, cfg, dx_ref, dw_ref = _setup(shape)
    if not C._is_pointwise(wt.shape, cfg):
        pytest.skip("padded 1x1: not pointwise (takes the phase path, tested above)")
    _close(C._pointwise_input_grad(g, wt, x.shape, cfg), dx_ref)
    _close(C._pointwise_weight_grad(x, g, cfg), dw_ref)


def test_dispatch_rules_pick_the_specialised_paths():
    """The grid's new cases (jbp/cases.py) really exercise the formulations they are for."""
    x = jnp.zeros((32, 16, 16, 32))
    w = jnp.zeros((3, 3, 32, 4))
    cfg = C.conv_config(x, w)
    assert C._use_taps(x.shape, w.shape, cfg, (16, 16))
    assert not C._use_taps(x.shape, w.shape, cfg, (8, 8))            # small images: conv
    assert not C._use_taps((32, 16, 16, 16), (3, 3, 16, 4), cfg, (16, 16))  # narrow: conv
    assert not C._use_taps((8, 16, 16, 32), w.shape, cfg, (16, 16))   # small batch: conv
    assert C._use_patches((32, 8, 8, 64), (3, 3, 64, 4), cfg, (8, 8))
    assert C._use_patches((33, 7, 9, 64), (3, 3, 64, 3), cfg, (4, 5))
    assert not C._use_patches((32, 16, 16, 64), (3, 3, 64, 4), cfg, (16, 16))  # large images
    assert not C._use_patches((32, 8, 8, 32), (3, 3, 32, 4), cfg, (8, 8))      # narrow
    assert not C._use_patches((16, 8, 8, 64), (3, 3, 64, 4), cfg, (8, 8))      # small batch
    assert not C._use_patches((32, 7, 7, 256), (3, 3, 256, 4), cfg, (7, 7))    # long rows
    s2 = C.conv_config(jnp.zeros((32, 17, 15, 16)), jnp.zeros((3, 3, 16, 4)), stride=2)
    assert C._use_patches((32, 17, 15, 16), (3, 3, 16, 4), s2, (9, 8))          # strided
    assert not C._use_patches((32, 17, 15, 8), (3, 3, 8, 4), s2, (9, 8))        # short rows
    s2_64 = C.conv_config(jnp.zeros((32, 16, 16, 32)), jnp.zeros((3, 3, 32, 64)), stride=2)
    f32 = jnp.float32
    assert C._cpu_input_grad_form((32, 16, 16, 32), (3, 3, 32, 64), s2_64, (8, 8),
                                  f32) == "generic"                            # small δ
    assert C._cpu_input_grad_form((32, 32, 32, 32), (3, 3, 32, 64), s2_64, (16, 16),
                                  f32) == "phases"
    # Rows: thin, unpadded stride-1 layers within 6× the convolution's multiplications
    # (LeNet-5's 6 -> 16 layer: W_p = 14 <= 6·5).
    valid = C.conv_config(jnp.zeros((1, 14, 14, 6)), jnp.zeros((5, 5, 6, 16)), padding="VALID")
    assert C._cpu_input_grad_form((128, 14, 14, 6), (5, 5, 6, 16), valid, (10, 10),
                                  f32) == "rows"
    assert C._cpu_input_grad_form((128, 14, 14, 6), (5, 5, 6, 16), valid, (10, 10),
                                  jnp.bfloat16) == "generic"
    assert C._cpu_input_grad_form((128, 14, 14, 6), (5, 5, 6, 17), valid, (10, 10),
                                  f32) == "generic"                           # 17 channels
    assert C._cpu_input_grad_form((128, 30, 30, 6), (5, 5, 6, 16), valid, (26, 26),
                                  f32) == "rows"                              # 30 <= 6·5
    assert C._cpu_input_grad_form((128, 31, 31, 6), (5, 5, 6, 16), valid, (27, 27),
                                  f32) == "generic"                           # 31 > 6·5
    assert C._cpu_input_grad_form((128, 14, 14, 16), (5, 5, 16, 6), valid, (10, 10),
                                  f32) == "generic"                           # 16 in
    padded = C.conv_config(jnp.zeros((1, 14, 14, 6)), jnp.zeros((5, 5, 6, 16)), padding=2)
    assert C._cpu_input_grad_form((128, 14, 14, 6), (5, 5, 6, 16), padded, (14, 14),
                                  f32) == "generic"
    # Column blocks: LeNet-5's first layer 4, ResNet's 3 -> 16 stem 2; not for 16 channels,
    # strides, groups, bfloat16, 1-column kernels, or outputs narrower than two blocks.
    same = C.conv_config(jnp.zeros((1, 28, 28, 1)), jnp.zeros((5, 5, 1, 6)), padding=2)
    one = C.conv_config(jnp.zeros((1, 32, 32, 3)), jnp.zeros((3, 3, 3, 16)))
    assert C._column_block((128, 28, 28, 1), (5, 5, 1, 6), f32, same) == 4
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 16), f32, one) == 2
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 16), jnp.float64, one) == 2
    assert C._column_block((128, 32, 32, 16), (3, 3, 16, 16), f32, one) == 1
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 17), f32, one) == 1
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 16), jnp.bfloat16, one) == 1
    assert C._column_block((128, 32, 32, 3), (3, 1, 3, 16), f32, one) == 1
    assert C._column_block((128, 32, 3, 3), (3, 3, 3, 16), f32, one) == 1    # W_out 3 < 4
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 16), f32, s2) == 1
    grouped = C.conv_config(jnp.zeros((1, 8, 8, 4)), jnp.zeros((3, 3, 2, 4)), groups=2)
    assert C._column_block((128, 8, 8, 4), (3, 3, 2, 4), f32, grouped) == 1
    dilated = C.conv_config(jnp.zeros((1, 32, 32, 3)), jnp.zeros((3, 3, 3, 16)), dilation=2)
    assert C._column_block((128, 32, 32, 3), (3, 3, 3, 16), f32, dilated) == 1
    # C_out <= 2: no B reaches 24 channels (the seed example's 1 -> 1 layer stays as it is).
    seed = C.conv_config(jnp.zeros((1, 28, 28, 1)), jnp.zeros((2, 2, 1, 1)), padding="VALID")
    assert C._column_block((64, 28, 28, 1), (2, 2, 1, 1), f32, seed) == 1
    assert C._column_block((64, 28, 28, 1), (2, 2, 1, 2), f32, seed) == 1
    assert C._column_block((64, 28, 28, 1), (2, 2, 1, 3), f32, seed) == 8
    # The output must be two blocks wide: W_out 8 takes B = 4, W_out 7 does not.
    assert C._column_block((1, 8, 8, 1), (3, 3, 1, 6), f32, one) == 4
    assert C._column_block((1, 8, 7, 1), (3, 3, 1, 6), f32, one) == 1
    lenet2 = C.conv_config(jnp.zeros((1, 14, 14, 6)), jnp.zeros((5, 5, 6, 16)), padding="VALID")
    assert C._column_block((128, 14, 14, 6), (5, 5, 6, 16), f32, lenet2) == 1   # forward
    # ... but from batch 32 the weight gradient builds the blocked patch matrix anyway, and the
    # forward shares it.
    assert C._forward_column_block((128, 14, 14, 6), (5, 5, 6, 16), f32, lenet2) == 2
    assert C._forward_column_block((16, 14, 14, 6), (5, 5, 6, 16), f32, lenet2) == 1
    assert C._forward_column_block((128, 14, 14, 9), (5, 5, 9, 16), f32, lenet2) == 1
    assert C._forward_column_block((16, 28, 28, 1), (5, 5, 1, 6), f32, same) == 4
    assert C._cpu_weight_grad_form((128, 14, 14, 6), (5, 5, 6, 16), lenet2, (10, 10),
                                   f32) == "columns"
    assert C._cpu_weight_grad_form((16, 14, 14, 6), (5, 5, 6, 16), lenet2, (10, 10),
                                   f32) == "generic"
    assert C._cpu_weight_grad_form((128, 14, 14, 6), (5, 5, 6, 16), lenet2, (10, 10),
                                   jnp.bfloat16) == "generic"
    # Split taps from batch 64: 3×3, stride 1, at most 16 channels on one side; chunks of
    # the largest power of two of images whose input-side matrix fits in 2 MiB.
    assert C._cpu_weight_grad_form((128, 32, 32, 16), (3, 3, 16, 16), one, (32, 32),
                                   f32) == "split"
    assert C._split_taps_chunk((3, 3, 16, 16), (32, 32), f32, one) == 8  # 204 KiB
    assert C._split_taps_chunk((3, 3, 16, 16), (16, 16), f32, one) == 32  # 54 KiB
    assert C._split_taps_chunk((3, 3, 16, 16), (512, 512), f32, one) == 1
    for x_shape, w_shape in (((128, 32, 32, 16), (3, 3, 16, 32)), ((128, 32, 32, 32),
                                                                     (3, 3, 32, 16))):
        assert C._cpu_weight_grad_form(x_shape, w_shape, one, (32, 32), f32) == "split"
    s2 = C.conv_config(jnp.zeros((1, 32, 32, 16)), jnp.zeros((3, 3, 16, 16)), stride=2)
    for x_shape, w_shape, c, hw, dtype in (
            ((63, 32, 32, 16), (3, 3, 16, 16), one, (32, 32), f32),          # batch < 64
            ((128, 16, 16, 32), (3, 3, 32, 32), one, (16, 16), f32),         # > 16 both sides
            ((128, 32, 32, 16), (3, 3, 16, 16), s2, (16, 16), f32),          # stride 2
            ((128, 32, 32, 16), (3, 3, 16, 16), one, (32, 32), jnp.bfloat16)):
        assert C._cpu_weight_grad_form(x_shape, w_shape, c, hw, dtype) != "split"
    # The split forward (manual rule only): 3×3 stride 1, >= 64 channels on both sides over at
    # most 8×8 output pixels, batch >= 64, float32/float64.
    assert C._use_split_forward((128, 8, 8, 64), (3, 3, 64, 64), one, f32)
    assert C._use_split_forward((64, 8, 8, 64), (3, 3, 64, 128), one, jnp.float64)
    assert C._split_taps_chunk((3, 3, 64, 64), (8, 8), f32, one) == 32   # 60 KiB an image
    assert C._split_forward_chunk((128, 8, 8, 64), (3, 3, 64, 64), f32, one) == 32
    assert C._split_forward_chunk((4096, 8, 8, 64), (3, 3, 64, 64), f32, one) == 128  # <= 32
    s2_64 = C.conv_config(jnp.zeros((1, 8, 8, 64)), jnp.zeros((3, 3, 64, 64)), stride=2)
    for x_shape, w_shape, c, dtype in (
            ((63, 8, 8, 64), (3, 3, 64, 64), one, f32),                   # batch < 64
            ((128, 16, 16, 64), (3, 3, 64, 64), one, f32),                # 16×16 pixels
            ((128, 8, 8, 32), (3, 3, 32, 64), one, f32),                  # C_in < 64
            ((128, 8, 8, 64), (3, 3, 64, 63), one, f32),                  # C_out < 64
            ((128, 8, 8, 64), (3, 3, 64, 64), s2_64, f32),                # stride 2
            ((128, 8, 8, 64), (3, 3, 64, 64), one, jnp.bfloat16)):
        assert not C._use_split_forward(x_shape, w_shape, c, dtype)
    # Batch chunks from batch 64 elsewhere: 16 images with <= 16 output channels, else 4; not
    # for 1×1 kernels or thin layers, which keep their own forms.
    assert C._cpu_weight_grad_form((128, 32, 32, 16), (3, 3, 16, 16), s2, (16, 16),
                                   f32) == "chunks"
    assert C._weight_grad_chunk((128, 32, 32, 16), (3, 3, 16, 16), f32) == 16
    assert C._weight_grad_chunk((64, 8, 8, 64), (3, 3, 64, 64), f32) == 4
    assert C._weight_grad_chunk((63, 8, 8, 64), (3, 3, 64, 64), f32) == 0
    assert C._weight_grad_chunk((1000, 8, 8, 64), (3, 3, 64, 64), f32) == 32  # <= 32 chunks
    assert C._cpu_weight_grad_form((63, 8, 8, 64), (3, 3, 64, 4), cfg, (8, 8),
                                   f32) == "patches"
    assert C._cpu_weight_grad_form((128, 14, 14, 6), (5, 5, 6, 16), lenet2, (10, 10),
                                   f32) == "columns"
    pw = C.conv_config(jnp.zeros((1, 8, 8, 16)), jnp.zeros((1, 1, 16, 32)), stride=2,
                       padding="VALID")
    assert C._cpu_weight_grad_form((128, 8, 8, 16), (1, 1, 16, 32), pw, (4, 4),
                                   f32) == "pointwise"
    # The grid's conv cases (jbp/cases.py) reach every form of both gradients and the
    # column-blocked and split forwards.
    forms = set()
    for case in CONV_CASES:
        kw = {k: v for k, v in case.call.keywords.items() if k != "bias"}
        x, w = jnp.zeros(case.shapes[0]), jnp.zeros(case.shapes[1])
        cfg = C.conv_config(x, w, **kw)
        out_hw = jax.eval_shape(lambda: C._forward(x, w, None, cfg)).shape[1:3]
        forms.add("dW " + C._cpu_weight_grad_form(x.shape, w.shape, cfg, out_hw, x.dtype))
        forms.add("dx " + C._cpu_input_grad_form(x.shape, w.shape, cfg, out_hw, x.dtype))
        block = C._forward_column_block(x.shape, w.shape, x.dtype, cfg)
        split = C._use_split_forward(x.shape, w.shape, cfg, x.dtype)
        forms.add("z " + ("columns" if block > 1 else "split" if split else "generic"))
    assert forms == {"dW pointwise", "dW columns", "dW split", "dW chunks", "dW taps",
                     "dW patches",
                     "dW generic",
                     "dx rows", "dx pointwise", "dx phases", "dx generic", "z columns",
                     "z split", "z generic"}, forms
    assert C._is_pointwise((1, 1, 3, 4), C.conv_config(jnp.zeros((1, 10, 7, 3)),
                                                        jnp.zeros((1, 1, 3, 4)), stride=3,
                                                        padding="VALID"))
    assert not C._is_pointwise((1, 1, 2, 3), C.conv_config(jnp.zeros((1, 5, 5, 2)),
                                                           jnp.zeros((1, 1, 2, 3)), stride=2,
                                                           padding=1))


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

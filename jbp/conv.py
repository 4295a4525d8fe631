"""2-D convolution (cross-correlation) with a hand-written backward.

Layout: images NHWC, kernels HWIO (``w.shape == (KH, KW, C_in // groups, C_out)``).

Equations (EQUATIONS.md, "Convolution"), with stride ``s``, dilation ``d``, ``δ = ∂L/∂z``::

    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k] + b[k]
    ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]    (δ ⋆ a)
    ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]
    ∂L/∂a          = full convolution of δ, dilated by s, with W rotated 180°
                     and its input/output channels swapped (per group)

``a`` above is the zero-padded input; the backward crops the padding away again.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import _checks
from jbp._rule import cast_like, manual_rule

_NHWC = ("NHWC", "HWIO", "NHWC")


class ConvConfig(NamedTuple):
    """Static (hashable) configuration of one convolution, padding already explicit."""

    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    dilation: Tuple[int, int]
    groups: int


def _correlate(x, w, cfg: ConvConfig):
    """z = a ⋆ W (no bias), as one XLA convolution."""
    return lax.conv_general_dilated(
        x, w, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=_NHWC, feature_group_count=cfg.groups)


def _forward(x, w, b, cfg: ConvConfig):
    block = _forward_column_block(x.shape, w.shape, x.dtype, cfg)
    if block > 1:
        # Thin convolutions: the same correlation over blocks of columns on XLA:CPU (below).
        z = lax.platform_dependent(
            x, w, cpu=lambda x, w: _column_blocked_correlate(x, w, cfg, block),
            default=lambda x, w: _correlate(x, w, cfg))
    else:
        z = _correlate(x, w, cfg)
    return z if b is None else z + b


def _rule_forward(x, w, b, cfg: ConvConfig):
    """The manual rule's forward: ``_forward``, except for small wide layers on XLA:CPU, which
    take the split form (:func:`_split_tap_correlate`, :func:`_use_split_forward`): the same
    sum in another order, equal to rounding. Not in ``_forward`` itself: differentiated by JAX
    (``jbp.autodiff``) it made the autodiff step slower (docs/performance.md), so the
    autodiff twin keeps XLA's convolution."""
    if not _use_split_forward(x.shape, w.shape, cfg, x.dtype):
        return _forward(x, w, b, cfg)
    chunk = _split_forward_chunk(x.shape, w.shape, x.dtype, cfg)
    z = lax.platform_dependent(x, w, cpu=lambda x, w: _split_tap_correlate(x, w, cfg, chunk),
                               default=lambda x, w: _correlate(x, w, cfg))
    return z if b is None else z + b


def _fwd(x, w, b, cfg: ConvConfig):
    # Residuals: the input a (N·H·W·C_in elements) and the kernel W; the bias only for its
    # dtype/None-ness (C_out elements). Bytes saved = (x.size + w.size + b.size) · itemsize.
    return _rule_forward(x, w, b, cfg), (x, w, b)


def _leftover(size: int, out: int, k_eff: int, stride: int, pad: Tuple[int, int]) -> int:
    """Padded-input cells past the last window (they receive no gradient)."""
    return size + pad[0] + pad[1] - ((out - 1) * stride + k_eff)


def _input_grad(g, w, x_shape, cfg: ConvConfig):
    """∂L/∂a: full convolution of δ (dilated by the stride) with W rotated 180°, I/O swapped."""
    kh, kw, cin_g, cout = w.shape
    groups = cfg.groups
    # Rotate 180° and swap input/output channels within each group:
    #   W_rot[i, j, k, g·C_in/G + c] = W[KH-1-i, KW-1-j, c, g·C_out/G + k]
    w_rot = (w[::-1, ::-1]
             .reshape(kh, kw, cin_g, groups, cout // groups)
             .transpose(0, 1, 4, 3, 2)
             .reshape(kh, kw, cout // groups, groups * cin_g))
    pads = []
    for axis, k in ((0, kh), (1, kw)):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        rem = _leftover(x_shape[1 + axis], g.shape[1 + axis], k_eff, cfg.stride[axis], (lo, hi))
        # "full" padding k_eff-1 on each side, minus the forward padding we crop back off.
        pads.append((k_eff - 1 - lo, k_eff - 1 - hi + rem))
    return lax.conv_general_dilated(
        g, w_rot, window_strides=(1, 1), padding=pads, lhs_dilation=cfg.stride,
        rhs_dilation=cfg.dilation, dimension_numbers=_NHWC, feature_group_count=groups)


def _weight_grad_pads(x, g, w_shape, cfg: ConvConfig):
    """Forward padding, minus the padded-input cells past the last window (no gradient)."""
    pads = []
    for axis, k in ((0, w_shape[0]), (1, w_shape[1])):
        k_eff = (k - 1) * cfg.dilation[axis] + 1
        lo, hi = cfg.padding[axis]
        rem = _leftover(x.shape[1 + axis], g.shape[1 + axis], k_eff, cfg.stride[axis], (lo, hi))
        pads.append((lo, hi - rem))
    return pads


def _weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c].

    A correlation of the input with δ in which the batch axis N is the contraction ("feature")
    axis, C_in plays the batch, the stride dilates δ and the dilation strides the window. Groups
    become a batch-group count: group g's input channels pair with group g's output channels.
    """
    return lax.conv_general_dilated(
        x, g, window_strides=cfg.dilation, padding=_weight_grad_pads(x, g, w_shape, cfg),
        rhs_dilation=cfg.stride,
        dimension_numbers=("CHWN", "IHWO", "HWNC"), batch_group_count=cfg.groups)


# --- faster formulations of the same equations (chosen per case; docs/performance.md) -------
#
# Each function below computes exactly one of the equations above, with a different XLA
# operation. On XLA:CPU they beat `conv_general_dilated` for the shapes `_forward` and `_bwd`
# dispatch them to; on other backends (cuDNN, TPU) the generic convolutions are used
# (`lax.platform_dependent`).

#: The batch-chunked weight gradient is used from this batch size on (:func:`_weight_grad_chunk`),
#: with at most this many chunks (each is its own convolution in the compiled step).
BATCH_CHUNK_MIN_BATCH, BATCH_CHUNK_MAX_CHUNKS = 64, 32


def _weight_grad_chunk(x_shape, w_shape, dtype) -> int:
    """Images per chunk for :func:`_batch_chunked_weight_grad`, 0 for "do not chunk".

    From batch 64: 16 images when C_out <= 16 (the chunk's weight-gradient convolution then
    has at most 16 channels on both sides and runs on Eigen, which here beats YNNPACK; 4-image
    chunks measured slower than none), else 4. Measured at batch 128 (docs/performance.md):
    ResNet-20's 32×32×16 layers 0.71× the one-convolution form, 8×8×64 0.63× the patch form,
    the train step 0.85×; at batch 32 a tie, and ResNet-18 at batch 16 1.11× slower.
    float32/float64 only (what was measured)."""
    if x_shape[0] < BATCH_CHUNK_MIN_BATCH or jnp.dtype(dtype) not in _MEASURED_DTYPES:
        return 0
    # Larger chunks past 32 of them (batch > 128 with 4-image chunks): compile time grows with
    # the number of chunks, which the unrolled loop makes separate operations.
    return max(16 if w_shape[3] <= 16 else 4, -(-x_shape[0] // BATCH_CHUNK_MAX_CHUNKS))


def _batch_chunked_weight_grad(x, g, w_shape, cfg: ConvConfig, chunk: int):
    """∂L/∂W = Σ_chunks δ_chunk ⋆ a_chunk: the sum over n split into chunks of ``chunk`` images,
    each chunk's sum one XLA convolution (:func:`_weight_grad`), the chunks unrolled.

    The weight-gradient convolution contracts over the batch, so XLA:CPU first transposes the
    whole input to put N innermost and then runs one large convolution; per chunk, the
    transpose and the convolution work on a few hundred KB that stay in cache, and the
    independent chunks run side by side on XLA's thunk executor. Unrolled on purpose: the same
    chunks inside ``lax.map`` (a while loop) ran 50–100× slower."""
    n = x.shape[0]
    total = None
    for start in range(0, n, chunk):
        part = _weight_grad(x[start:start + chunk], g[start:start + chunk], w_shape, cfg)
        total = part if total is None else total + part
    return total


def _is_pointwise(w_shape, cfg: ConvConfig) -> bool:
    """1×1 kernel, no padding, one group: every output pixel is a matmul of one input pixel."""
    return (tuple(w_shape[:2]) == (1, 1) and cfg.groups == 1
            and cfg.padding == ((0, 0), (0, 0)))


def _pointwise_input_grad(g, w, x_shape, cfg: ConvConfig):
    """1×1 kernel: ∂L/∂a[n, h·s, w·s, c] = Σ_k δ[n,h,w,k] W[0,0,c,k]; the other cells get 0.

    One matmul ``δ Wᵀ`` over all pixels, then the stride gaps and the cells past the last
    window are filled with zeros by one interior/edge pad (no multiplications by zero)."""
    n, ho, wo, _ = g.shape
    dx = lax.dot_general(g, w[0, 0], (((3,), (1,)), ((), ())))          # (N, Ho, Wo, C_in)
    (sh, sw) = cfg.stride
    pad_h = x_shape[1] - ((ho - 1) * sh + 1)
    pad_w = x_shape[2] - ((wo - 1) * sw + 1)
    return lax.pad(dx, jnp.zeros((), dx.dtype),
                   ((0, 0, 0), (0, pad_h, sh - 1), (0, pad_w, sw - 1), (0, 0, 0)))


def _pointwise_weight_grad(x, g, cfg: ConvConfig):
    """1×1 kernel: ∂L/∂W[0,0,c,k] = Σ_{n,h,w} a[n, h·s, w·s, c] δ[n,h,w,k] — one matmul ``aᵀ δ``
    over the strided pixels (XLA:CPU's convolution for this is 5–9× slower)."""
    (sh, sw) = cfg.stride
    n, ho, wo, _ = g.shape
    xs = lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, x.shape[3]),
                   (1, sh, sw, 1))
    dw = lax.dot_general(xs, g, (((0, 1, 2), (0, 1, 2)), ((), ())))      # (C_in, C_out)
    return dw[None, None]


def _phase_input_grad(g, w, x_shape, cfg: ConvConfig):
    """Strided kernel: ∂L/∂a by *phases* instead of a stride-dilated δ.

    With stride s, input row p = s·q + r only meets kernel rows i ≡ r + pad_lo (mod s). So
    for each of the s_h·s_w phases (r_h, r_w) the input gradient is a stride-1 full
    correlation of δ with the sub-kernel W[i₀::s, j₀::s] (rotated 180°, channels swapped), and
    the phases interleave back by interior padding. Same sum as the dilated form, without its
    (1 − 1/s²) multiplications by the inserted zeros."""
    kh, kw, cin, cout = w.shape
    (sh, sw), ((lo_h, _), (lo_w, _)) = cfg.stride, cfg.padding
    n, ho, wo, _ = g.shape
    h_in, w_in = x_shape[1], x_shape[2]
    zero = jnp.zeros((), g.dtype)
    total = None
    for r_h in range(sh):
        for r_w in range(sw):
            q_h, q_w = -(-(h_in - r_h) // sh), -(-(w_in - r_w) // sw)   # rows/cols of phase
            i0, j0 = (r_h + lo_h) % sh, (r_w + lo_w) % sw
            sub = w[i0::sh, j0::sw]
            m_h, m_w = sub.shape[:2]
            if q_h <= 0 or q_w <= 0:
                continue
            if m_h == 0 or m_w == 0:          # no kernel tap reaches this phase: zero gradient
                phase = jnp.zeros((n, q_h, q_w, cin), g.dtype)
            else:
                # phase[q] = Σ_m δ[q + off − m] · W_sub[m],   off = (r + pad_lo) // s
                pads = []
                for q, m, off, size in ((q_h, m_h, (r_h + lo_h) // sh, ho),
                                        (q_w, m_w, (r_w + lo_w) // sw, wo)):
                    lo = m - 1 - off
                    pads.append((lo, q + m - 1 - size - lo))
                rot = jnp.transpose(sub[::-1, ::-1], (0, 1, 3, 2))          # (m_h, m_w, K, C)
                gp = lax.pad(g, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))
                phase = lax.conv_general_dilated(gp, rot, (1, 1), "VALID",
                                                 dimension_numbers=_NHWC)
            placed = lax.pad(phase, zero, (
                (0, 0, 0),
                (r_h, h_in - (r_h + (q_h - 1) * sh + 1), sh - 1),
                (r_w, w_in - (r_w + (q_w - 1) * sw + 1), sw - 1),
                (0, 0, 0)))
            total = placed if total is None else total + placed
    return total


#: Largest C_in for the column-blocked forward and weight gradient, smallest batch for the
#: latter (see :func:`_column_block`).
COLUMN_FORWARD_MAX_CIN, COLUMN_WEIGHT_GRAD_MAX_CIN, COLUMN_WEIGHT_GRAD_MIN_BATCH = 4, 8, 32

#: The dtypes the thin-layer and batch-chunk forms are for: XLA:CPU's YNNPACK convolutions and
#: matmuls take float32 and float64 (not bfloat16 convolutions), and only these were measured.
_MEASURED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def _column_block(x_shape, w_shape, dtype, cfg: ConvConfig,
                  max_cin: int = COLUMN_FORWARD_MAX_CIN) -> int:
    """Columns per block B for the column-blocked forms on XLA:CPU; 1 means "do not block".

    For thin layers only: at most ``max_cin`` input and 16 output channels (an image stem,
    LeNet-5's layers), stride 1, no dilation, one group, a kernel wider than one column,
    float32 or float64. XLA:CPU runs those convolutions through Eigen at 13–35 GFLOP/s
    (YNNPACK takes a convolution only with more than 16 channels on one side); blocked they
    have B·C_in → B·C_out channels. B is the smallest of 2, 4, 8 with B·C_out >= 24 (so
    C_out >= 3), and the output must be at least two blocks wide. Measured
    (scripts/bench_ops.py, docs/performance.md): the forward 0.25–0.76× the convolution's time
    for C_in <= 4 and a tie at LeNet-5's 6 → 16, hence ``max_cin=4`` for the forward; the
    weight gradient 0.55–0.73× up to 6 → 16 at batch >= 32 (a tie at batch 16), hence
    :func:`_weight_grad_column_block`. ResNet-20's 16 → 16 layers measured 3.1× (forward)
    and 1.4× (weight gradient) slower blocked."""
    kh, kw, cin, cout = w_shape
    if (cfg.groups != 1 or cfg.stride != (1, 1) or cfg.dilation != (1, 1) or kw < 2
            or cin > max_cin or not 3 <= cout <= 16 or jnp.dtype(dtype) not in _MEASURED_DTYPES):
        return 1
    w_out = _out_hw(x_shape, w_shape, cfg)[1]
    block = next(b for b in (2, 4, 8) if b * cout >= 24)
    return block if 2 * block <= w_out else 1


def _weight_grad_column_block(x_shape, w_shape, dtype, cfg: ConvConfig) -> int:
    """B for the column-blocked weight gradient (C_in <= 8, batch >= 32), 1 for "do not"."""
    if x_shape[0] < COLUMN_WEIGHT_GRAD_MIN_BATCH:
        return 1
    return _column_block(x_shape, w_shape, dtype, cfg, max_cin=COLUMN_WEIGHT_GRAD_MAX_CIN)


def _forward_column_block(x_shape, w_shape, dtype, cfg: ConvConfig) -> int:
    """B for the column-blocked forward: C_in <= 4 always; up to the weight gradient's C_in <= 8
    where that builds the same patch matrix of the blocked input (batch >= 32). When the weight
    gradient builds it in one piece (up to :data:`COLUMN_PATCH_BYTES`; LeNet-5: 4.6 MB), XLA
    computes the two identical patch matrices once and the forward costs one matmul: LeNet-5's
    6 → 16 layer alone ties with the convolution (1.06×), and the train step is 7–9% faster
    (same-process A/B, docs/performance.md)."""
    block = _column_block(x_shape, w_shape, dtype, cfg)
    return block if block > 1 else _weight_grad_column_block(x_shape, w_shape, dtype, cfg)


def _column_blocks(w_out: int, kw: int, block: int) -> Tuple[int, int, int]:
    """(output blocks ⌈W_out / B⌉, kernel blocks KB = ⌈(B + KW − 1) / B⌉, input blocks)."""
    out_blocks = -(-w_out // block)
    kb = -(-(block + kw - 1) // block)
    return out_blocks, kb, out_blocks + kb - 1


def _column_select(kb: int, block: int, kw: int, dtype) -> jax.Array:
    """select[jb, p, q, j] = 1 where j = jb·B + p − q ∈ [0, KW): W_B = select · W."""
    jb, p, q, j = np.ogrid[:kb, :block, :block, :kw]
    return jnp.asarray(jb * block + p - q == j, dtype)


def _blocked_input(x, cfg: ConvConfig, block: int, in_blocks: int):
    """The padded input, zero-filled on the right to whole blocks, as (N, H_p, blocks, B·C)."""
    n, h, wd, cin = x.shape
    (pt, pb), (pl, _) = cfg.padding
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pt, pb, 0), (pl, in_blocks * block - wd - pl, 0), (0, 0, 0)))
    return xp.reshape(n, h + pt + pb, in_blocks, block * cin)


def _column_blocked_correlate(x, w, cfg: ConvConfig, block: int):
    """z = a ⋆ W (stride 1, no dilation, one group) as a correlation over blocks of ``B``
    adjacent columns, computed as one matmul of the blocked input's patch matrix.

    Reshaping the padded input (N, H_p, W_p, C) to (N, H_p, W_p / B, B·C) puts B columns in
    the channel axis. Output column b·B + q (q < B) needs input columns b·B + p with
    p − q = j ∈ [0, KW), i.e. blocks b … b + KB − 1 with KB = ⌈(B + KW − 1) / B⌉, so

        z_B[n, h, b, (q, k)] = Σ_{i, jb, p, c} a_B[n, h + i, b + jb, (p, c)]
                                                · W_B[i, jb, (p, c), (q, k)]
        W_B[i, jb, (p, c), (q, k)] = W[i, jb·B + p − q, c, k]   (0 where jb·B + p − q ∉ [0, KW))

    is the same sum over the same taps (plus products with W_B's zeros), and reshaping
    z_B (N, H_out, ⌈W_out / B⌉, B·C_out) back gives z. The input is zero-padded on the right
    to whole blocks; output columns past W_out are cut off.

    The sum is ``P · W_B`` with P the patch matrix of a_B, (N·H_out·⌈W_out / B⌉, KH·KB·B·C_in)
    (:func:`_patch_matrix`): a plain matmul, 2.3× faster than XLA:CPU's convolution of a_B
    with W_B on LeNet-5's first layer and 1.9× on ResNet-20's stem (docs/performance.md).
    Past :data:`COLUMN_FORWARD_PATCH_BYTES` of patch matrix it stays a convolution."""
    kh, kw, cin, cout = w.shape
    n = x.shape[0]
    w_out = _out_hw(x.shape, w.shape, cfg)[1]
    out_blocks, kb, in_blocks = _column_blocks(w_out, kw, block)
    xb = _blocked_input(x, cfg, block, in_blocks)
    ho = xb.shape[1] - kh + 1
    wb = jnp.einsum("bpqj,ijck->ibpcqk", _column_select(kb, block, kw, w.dtype), w,
                    precision=lax.Precision.HIGHEST).reshape(kh, kb, block * cin, block * cout)
    patch_bytes = n * ho * out_blocks * kh * kb * block * cin * jnp.dtype(x.dtype).itemsize
    if patch_bytes <= COLUMN_FORWARD_PATCH_BYTES:
        # The same views, hence the same patch matrix, as _column_blocked_weight_grad's: XLA
        # builds it once when both run in one step.
        views = _tap_views(xb, (kh, kb), (ho, out_blocks), _BLOCKED)
        zb = lax.dot_general(_patch_matrix(views), wb.reshape(-1, block * cout),
                             (((1,), (0,)), ((), ())))
    else:
        zb = _correlate(xb, wb, _BLOCKED)
    return zb.reshape(n, ho, out_blocks * block, cout)[:, :, :w_out]


#: Largest patch matrix (bytes) :func:`_column_blocked_correlate` builds; past it the blocked
#: correlation runs as a convolution. LeNet-5's first layer at batch 128 needs 4 MB, ResNet-20's
#: stem 9.4 MB.
COLUMN_FORWARD_PATCH_BYTES = 64 << 20

#: Bytes of patch matrix per step of :func:`_column_blocked_weight_grad`'s loop over the batch.
COLUMN_PATCH_BYTES = 8 << 20

#: A stride-1, unpadded correlation: the blocked input already carries the padding.
_BLOCKED = ConvConfig((1, 1), ((0, 0), (0, 0)), (1, 1), 1)


def _column_blocked_weight_grad(x, g, w_shape, cfg: ConvConfig, block: int):
    """∂L/∂W for the column-blocked form: the patch matrix of the blocked input, then W_B's
    gradient folded back onto W.

    With a_B, δ_B the input and δ in blocks of B columns (:func:`_column_blocked_correlate`),

        ∂L/∂W_B[i, jb, (p, c), (q, k)] = Σ_{n, h, b} a_B[n, h + i, b + jb, (p, c)]
                                                   · δ_B[n, h, b, (q, k)]
        ∂L/∂W[i, j, c, k] = Σ_{jb, p, q : jb·B + p − q = j} ∂L/∂W_B[i, jb, (p, c), (q, k)]

    (the chain rule through W_B = select · W). The first line is the weight gradient of an
    unpadded stride-1 correlation of a_B, computed as ``Pᵀ δ_B`` with the patch matrix P of
    a_B, (N·H_out·⌈W_out / B⌉, KH·KB·B·C_in) (:func:`_patch_matmul`): for thin layers a few
    MB, built for as many images at a time as fit in :data:`COLUMN_PATCH_BYTES`. δ_B's columns
    past W_out are zero, so the padding to whole blocks adds nothing."""
    kh, kw, cin, cout = w_shape
    n, ho, w_out, _ = g.shape
    out_blocks, kb, in_blocks = _column_blocks(w_out, kw, block)
    xb = _blocked_input(x, cfg, block, in_blocks)
    gb = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (0, 0, 0), (0, out_blocks * block - w_out, 0), (0, 0, 0)))
    gb = gb.reshape(n, ho, out_blocks, block * cout)
    wb_shape = (kh, kb, block * cin, block * cout)
    per_image = ho * out_blocks * kh * kb * block * cin * jnp.dtype(x.dtype).itemsize
    dwb = _chunked_weight_grad(xb, gb, wb_shape, _BLOCKED, COLUMN_PATCH_BYTES // per_image,
                               _patch_matmul)
    dwb = dwb.reshape(kh, kb, block, cin, block, cout)
    return jnp.einsum("bpqj,ibpcqk->ijck", _column_select(kb, block, kw, dwb.dtype), dwb,
                      precision=lax.Precision.HIGHEST)


def _row_input_grad(g, w, x_shape, cfg: ConvConfig):
    """∂L/∂a (stride 1, no dilation, one group) as one matmul of δ's rows with a banded kernel,
    then a sum of KH row-shifted slices.

    In padded-input coordinates,

        ∂L/∂a[n, r, x, c] = Σ_{i, j, k} δ[n, r − i, x − j, k] W[i, j, c, k].

    Put each δ row in one vector, (x′, k) → x′·C_out + k. The sum over j (and k) is a banded
    (Toeplitz) matrix in x, one per kernel row i:

        Y[n, h, (i, x, c)] = Σ_{(x′, k)} δ[n, h, (x′, k)] · T[(x′, k), (i, x, c)]
        T[(x′, k), (i, x, c)] = W[i, x − x′, c, k]   (0 unless 0 <= x − x′ < KW)
        ∂L/∂a[n, r, (x, c)]  = Σ_i Y[n, r − i, (i, x, c)]   (0 <= r − i < H_out)

    The matmul reads δ as it is, (N·H_out, W_out·C_out) × (W_out·C_out, KH·W_p·C_in), about
    W_p / KW times the convolution's multiplications (2.8× on LeNet-5's 6 → 16 layer); the
    row sum is one elementwise pass. The padding is cropped off."""
    kh, kw, cin, cout = w.shape
    n, ho, wo, _ = g.shape
    (pt, pb), (pl, pr) = cfg.padding
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    xq, x, j = np.ogrid[:wo, :wp, :kw]
    band = jnp.asarray(x == xq + j, w.dtype)                            # band[x′, x, j]
    toeplitz = jnp.einsum("qxj,ijck->qkixc", band, w, precision=lax.Precision.HIGHEST)
    y = lax.dot_general(g.reshape(n * ho, wo * cout), toeplitz.reshape(wo * cout, -1),
                        (((1,), (0,)), ((), ()))).reshape(n, ho, kh, wp * cin)
    zero = jnp.zeros((), y.dtype)
    dxp = sum(lax.pad(y[:, :, i], zero, ((0, 0, 0), (i, hp - ho - i, 0), (0, 0, 0)))
              for i in range(kh))                                       # hp = ho + kh − 1
    return dxp.reshape(n, hp, wp, cin)[:, pt:pt + x_shape[1], pl:pl + x_shape[2], :]


def _use_rows(x_shape, w_shape, cfg: ConvConfig, out_hw, dtype) -> bool:
    """Where :func:`_row_input_grad` measured faster on XLA:CPU (docs/performance.md): thin
    layers, fewer than 16 input and at most 16 output channels (the convolution runs on Eigen),
    with an unpadded stride-1 forward (the input gradient then is a "full" correlation, larger
    than δ) and at most 6× the convolution's multiplications (W_p <= 6·KW). Measured at
    batch 128: LeNet-5's 6 → 16 layer 0.36× the convolution's time (0.59× at batch 32, 0.48×
    at 16), 0.58–0.91× on other thin shapes up to W_p = 5.6·KW; with 16 input channels the
    convolution won (1.07–1.67×), and padded forwards lost with the earlier row-gathering form."""
    _, kw, cin, cout = w_shape
    return (cfg.stride == (1, 1) and cfg.dilation == (1, 1) and cfg.groups == 1
            and cfg.padding == ((0, 0), (0, 0)) and kw > 1 and cin < 16 and cout <= 16
            and jnp.dtype(dtype) in _MEASURED_DTYPES and x_shape[2] <= 6 * kw)


#: Images per chunk in :func:`_tap_weight_grad` (a chunk of x and δ stays in cache).
TAP_CHUNK = 8


def _tap_weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c], one matmul per tap.

    For each kernel tap (i, j) the sum over (n, h, w) is a plain matmul ``a_tapᵀ δ`` of the
    (strided, shifted) input view with δ. Looping over chunks of the batch (``lax.scan``) keeps
    each chunk's input and δ in cache while its KH·KW matmuls read them; the convolution form
    instead transposes the whole input to put N innermost (docs/performance.md)."""
    cin = w_shape[2]

    def tap_matmuls(views, gb):
        grads = [lax.dot_general(v.reshape(-1, cin), gb, (((0,), (0,)), ((), ())))
                 for v in views]                                    # each (C_in, C_out)
        return jnp.concatenate(grads)

    return _chunked_weight_grad(x, g, w_shape, cfg, TAP_CHUNK, tap_matmuls)


def _tap_views(xp, taps_hw, out_hw, cfg: ConvConfig):
    """The KH·KW shifted, strided views ``a[n, h·s+i·d, w·s+j·d, :]`` of the padded input, each
    (N, H_out, W_out, C_in), in (i, j) order."""
    (kh, kw), (ho, wo) = taps_hw, out_hw
    (sh, sw), (dh, dw_) = cfg.stride, cfg.dilation
    n, _, _, cin = xp.shape
    return [lax.slice(xp, (0, i * dh, j * dw_, 0),
                      (n, i * dh + (ho - 1) * sh + 1, j * dw_ + (wo - 1) * sw + 1, cin),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _chunked_weight_grad(x, g, w_shape, cfg: ConvConfig, target: int, per_chunk):
    """Σ over batch chunks of ``per_chunk(views, δ_chunk)``, (KH·KW·C_in, C_out).

    ``views`` are the KH·KW shifted, strided input views ``a[n, h·s+i·d, w·s+j·d, :]`` of one
    chunk of B images, each (B, H_out, W_out, C_in), in (i, j) order; δ_chunk is
    (B·H_out·W_out, C_out). The input is padded once, then summed in chunks of ``target``
    images (:func:`_sum_over_batch_chunks`). Shared by the per-tap, patch-matrix and
    column-blocked forms."""
    kh, kw, cin, cout = w_shape
    n, ho, wo, _ = g.shape
    (pt, pb), (pl, pr) = _weight_grad_pads(x, g, w_shape, cfg)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))

    def contribution(xb, gb):
        views = _tap_views(xb, (kh, kw), (ho, wo), cfg)
        return per_chunk(views, gb.reshape(xb.shape[0] * ho * wo, cout))

    total = _sum_over_batch_chunks(contribution, xp, g, target, (kh * kw * cin, cout))
    return total.reshape(kh, kw, cin, cout)


def _sum_over_batch_chunks(contribution, x, g, target: int, shape):
    """Σ over chunks of the batch of ``contribution(x_chunk, δ_chunk)`` (each of ``shape``).

    Chunks of ``target`` images run in a ``lax.scan`` and the N mod ``target`` images left over
    in one more call; a batch of at most ``target`` images is one call."""
    n = x.shape[0]
    b = max(1, min(n, target))
    if b == n:
        return contribution(x, g)
    full = n - n % b

    def step(acc, inputs):
        return acc + contribution(*inputs), None

    acc = jnp.zeros(shape, jnp.result_type(x.dtype, g.dtype))
    acc, _ = lax.scan(step, acc, (x[:full].reshape(full // b, b, *x.shape[1:]),
                                  g[:full].reshape(full // b, b, *g.shape[1:])))
    if full < n:
        acc = acc + contribution(x[full:], g[full:])
    return acc


#: Bytes of the input-side matrix A per chunk of :func:`_split_tap_weight_grad`: measured
#: best at 8 images of ResNet-20's 32×32×16 layers (1.7 MB) and 16–32 of 16×16×16 ones.
SPLIT_CHUNK_BYTES = 2 << 20


def _split_input_columns(xb, cfg: ConvConfig, kw: int, wo: int):
    """A[n, r, w, (j, c)] = a_p[n, r, w + j·d_w, c]: the padded input's KW column shifts side by
    side, (B, H_p, W_out, KW·C_in). The input side of both split forms (stride 1)."""
    (pt, pb), (pl, pr) = cfg.padding
    dw_ = cfg.dilation[1]
    xp = lax.pad(xb, jnp.zeros((), xb.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return jnp.concatenate([lax.slice_in_dim(xp, j * dw_, j * dw_ + wo, axis=2)
                            for j in range(kw)], axis=3)


def _split_tap_weight_grad(x, g, w_shape, cfg: ConvConfig, chunk: int):
    """∂L/∂W (stride 1, one group) with the kernel's columns on the input's side of one matmul
    and its rows on δ's side, per chunk of ``chunk`` images.

    With a_p the padded input (H_p = H_out + (KH − 1)·d_h rows, stride 1) and r over its rows,

        A[n, r, w, (j, c)] = a_p[n, r, w + j·d_w, c]          the KW column shifts of a_p
        D[n, r, w, (i, k)] = δ[n, r − i·d_h, w, k]            the KH row shifts of δ
                                                               (0 where r − i·d_h ∉ [0, H_out))
        Σ_{n, r, w} A[n, r, w, (j, c)] · D[n, r, w, (i, k)]
            = Σ_{n, h, w} a_p[n, h + i·d_h, w + j·d_w, c] · δ[n, h, w, k]     (h = r − i·d_h)
            = ∂L/∂W[i, j, c, k]

    so ∂L/∂W is ``Aᵀ D``, (KW·C_in, KH·C_out), one matmul per chunk: KW + KH copies of the
    data instead of the KH·KW of a patch matrix, and no transposed input, which the
    convolution form builds (N innermost) before it runs. Each chunk is padded and shifted
    inside the ``lax.scan`` (:func:`_sum_over_batch_chunks`), where its A and D stay in cache;
    padding the whole input first measured 1.5× slower. Where it wins: 3×3 kernels with at most
    16 channels on one side from batch 64 (:func:`_use_split_taps`)."""
    assert cfg.stride == (1, 1) and cfg.groups == 1, cfg
    kh, kw, cin, cout = w_shape
    _, ho, wo, _ = g.shape
    dh = cfg.dilation[0]
    reach = (kh - 1) * dh
    zero = jnp.zeros((), x.dtype)

    def contribution(xb, gb):
        a = _split_input_columns(xb, cfg, kw, wo)                    # (B, H_p, W_out, KW·C_in)
        hp = a.shape[1]                                              # H_out + reach: stride 1
        gp = lax.pad(gb, zero, ((0, 0, 0), (reach, reach, 0), (0, 0, 0), (0, 0, 0)))
        d = jnp.concatenate([lax.slice_in_dim(gp, reach - i * dh, reach - i * dh + hp, axis=1)
                             for i in range(kh)], axis=3)              # (B, H_p, W_out, KH·C_out)
        return lax.dot_general(a.reshape(-1, kw * cin), d.reshape(-1, kh * cout),
                               (((0,), (0,)), ((), ())))

    total = _sum_over_batch_chunks(contribution, x, g, chunk, (kw * cin, kh * cout))
    return total.reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)


def _split_tap_correlate(x, w, cfg: ConvConfig, chunk: int):
    """z = a ⋆ W (stride 1, one group) as one matmul per chunk of ``chunk`` images, then a sum
    of KH row-shifted slices: the split of :func:`_split_tap_weight_grad` for the forward.

    With A the KW column shifts of the padded input as there, A[n, r, w, (j, c)] =
    a_p[n, r, w + j·d_w, c], and W' the kernel with its rows beside its output channels,
    W'[(j, c), (i, k)] = W[i, j, c, k],

        B = A · W'                                 (N·H_p·W_out, KH·C_out)
        z[n, h, w, k] = Σ_i B[n, h + i·d_h, w, (i, k)]
                      = Σ_{i, j, c} a_p[n, h + i·d_h, w + j·d_w, c] · W[i, j, c, k]

    KW copies of the input and KH row-shifted reads of B instead of XLA's convolution.
    The chunks are unrolled (independent, so XLA's thunk executor runs them side by side;
    inside a ``lax.map`` the step measured 1.5% slower). Where it wins:
    :func:`_use_split_forward`."""
    assert cfg.stride == (1, 1) and cfg.groups == 1, cfg
    kh, kw, cin, cout = w.shape
    dh = cfg.dilation[0]
    ho, wo = _out_hw(x.shape, w.shape, cfg)
    w_split = w.transpose(1, 2, 0, 3).reshape(kw * cin, kh * cout)

    def correlate_chunk(xb):
        a = _split_input_columns(xb, cfg, kw, wo)                    # (B, H_p, W_out, KW·C_in)
        bm = lax.dot_general(a, w_split, (((3,), (0,)), ((), ())))    # (B, H_p, W_out, KH·C_out)
        return sum(bm[:, i * dh:i * dh + ho, :, i * cout:(i + 1) * cout] for i in range(kh))

    n = x.shape[0]
    return jnp.concatenate([correlate_chunk(x[s:s + chunk]) for s in range(0, n, chunk)])


def _out_hw(x_shape, w_shape, cfg: ConvConfig) -> Tuple[int, int]:
    """(H_out, W_out) of a stride-1 correlation."""
    return tuple(x_shape[1 + a] + sum(cfg.padding[a]) - (w_shape[a] - 1) * cfg.dilation[a]
                 for a in (0, 1))


def _use_split_forward(x_shape, w_shape, cfg: ConvConfig, dtype) -> bool:
    """Where the split forward measured faster on XLA:CPU (docs/performance.md): 3×3 kernels,
    stride 1, no dilation, one group, at least 64 channels on both sides over at most 8×8
    output pixels, batch >= 64, float32/float64. Alone at batch 128 it is 0.77–0.95× XLA's
    convolution on ResNet-20's 8×8×64 layers, a tie to 1.26× slower on 16×16×32 and 1.26×
    slower on 32×32×16;
    in the ResNet-20 b128 train step 0.97× (five same-process A/Bs) on the 8×8×64 layers and
    a tie with the 16×16×32 ones added."""
    if not (_split_measured(x_shape, w_shape, cfg, dtype) and min(w_shape[2:]) >= 64):
        return False
    ho, wo = _out_hw(x_shape, w_shape, cfg)
    return ho * wo <= 64


def _split_forward_chunk(x_shape, w_shape, dtype, cfg: ConvConfig) -> int:
    """Images per (unrolled) chunk of the split forward: :func:`_split_taps_chunk`'s, made
    larger where the batch would need more than :data:`BATCH_CHUNK_MAX_CHUNKS` chunks (each
    chunk is its own matmul in the compiled step, and compile time grows with their number)."""
    chunk = _split_taps_chunk(w_shape, _out_hw(x_shape, w_shape, cfg), dtype, cfg)
    return max(chunk, -(-x_shape[0] // BATCH_CHUNK_MAX_CHUNKS))


def _split_taps_chunk(w_shape, out_hw, dtype, cfg: ConvConfig) -> int:
    """Images per chunk for :func:`_split_tap_weight_grad` (and, through
    :func:`_split_forward_chunk`, the split forward): the largest power of two whose A,
    (H_out + (KH − 1)·d_h) × W_out × KW·C_in per image, fits in :data:`SPLIT_CHUNK_BYTES`."""
    kh, kw, cin, _ = w_shape
    hp = out_hw[0] + (kh - 1) * cfg.dilation[0]
    per_image = max(1, hp * out_hw[1] * kw * cin * jnp.dtype(dtype).itemsize)
    return 1 << max(0, (SPLIT_CHUNK_BYTES // per_image).bit_length() - 1)


def _use_split_taps(x_shape, w_shape, cfg: ConvConfig, dtype) -> bool:
    """Where the split-tap weight gradient measured faster on XLA:CPU (scripts/bench_ops.py,
    docs/performance.md): 3×3 kernels, stride 1, no dilation, one group, at most 16 channels on
    one side, batch >= 64, float32/float64. Against the batch chunks at batch 128: ResNet-20's
    32×32×16 layers 0.68×, 32×32 16 → 8 0.58×, 16 → 32 0.89×, 32 → 16 0.66×, 16×16×16 0.86×;
    ResNet-20's 16×16×32 layers 1.6× slower (the chunked convolutions there run on YNNPACK),
    5×5 kernels 1.13× slower; at batch 32 the one convolution 0.88× of it."""
    return _split_measured(x_shape, w_shape, cfg, dtype) and min(w_shape[2:]) <= 16


def _split_measured(x_shape, w_shape, cfg: ConvConfig, dtype) -> bool:
    """What both split forms were measured on: 3×3 kernels, stride 1, no dilation, one group,
    batch >= 64, float32/float64."""
    return (tuple(w_shape[:2]) == (3, 3) and cfg.stride == (1, 1) and cfg.dilation == (1, 1)
            and cfg.groups == 1 and x_shape[0] >= BATCH_CHUNK_MIN_BATCH
            and jnp.dtype(dtype) in _MEASURED_DTYPES)


#: Images per step of the patch-matrix loop (``_patch_weight_grad``): measured best at 2 on
#: ResNet-20's 8×8×64 layers (scripts/bench_ops.py).
PATCH_CHUNK = 2


def _patch_weight_grad(x, g, w_shape, cfg: ConvConfig):
    """∂L/∂W as one matmul per batch chunk of the patch matrix (im2col): ∂L/∂W = Pᵀ δ.

    Row ``(n, h, w)`` of ``P`` holds every tap's input vector ``a[n, h·s+i·d, w·s+j·d, :]``, so
    ``P`` is (N·H_out·W_out, KH·KW·C_in) and ``Pᵀ δ`` is the whole kernel gradient in one wide
    matmul, ordered (i, j, c) like ``W``. Built for ``PATCH_CHUNK`` images at a time inside a
    ``lax.scan``, each chunk's ``P`` stays in cache; for the whole batch it would be KH·KW
    times the input. Where it wins: small images with wide inputs (ResNet-20's 8×8×64 layers,
    docs/performance.md), where the per-tap matmuls are small and the convolution form
    transposes the input first."""
    return _chunked_weight_grad(x, g, w_shape, cfg, PATCH_CHUNK, _patch_matmul)


def _patch_matrix(views):
    """The views (each (B, H_out, W_out, C_in), in tap order) side by side: the patch matrix
    P, (B·H_out·W_out, taps·C_in), rows ordered (n, h, w) like δ's, columns (i, j, c) like W's."""
    patches = jnp.stack(views, axis=3)                          # (B, H_out, W_out, taps, C_in)
    return patches.reshape(-1, len(views) * views[0].shape[3])


def _patch_matmul(views, gb):
    """``Pᵀ δ`` for one chunk (:func:`_patch_matrix`)."""
    return lax.dot_general(_patch_matrix(views), gb, (((0,), (0,)), ((), ())))


def _use_patches(x_shape, w_shape, cfg: ConvConfig, out_hw) -> bool:
    """Where the patch-matrix form measured faster on XLA:CPU (scripts/bench_ops.py,
    docs/performance.md), batch >= 32 and patch rows of at most 1024 values (ResNet-18's
    7×7×256 layers measured slower): strided kernels with rows of >= 128 values (ResNet-20's
    stride-2 3×3 layers: 0.52× and 0.67×), and C_in >= 64 over at most 8×8 output pixels
    (0.79×)."""
    kh, kw, cin, _ = w_shape
    row = kh * kw * cin
    if cfg.groups != 1 or x_shape[0] < 32 or row > 1024:
        return False
    strided = cfg.stride != (1, 1) and row >= 128
    small_and_wide = cin >= 64 and out_hw[0] * out_hw[1] <= 64
    return strided or small_and_wide


def _use_taps(x_shape, w_shape, cfg: ConvConfig, out_hw) -> bool:
    """Where the per-tap form measured faster on XLA:CPU (scripts/bench_ops.py,
    docs/performance.md): C_in >= 32 over at least 16×16 output pixels, batch >= 32. Narrower
    inputs keep the convolution (the per-tap matmuls are then too thin), and so do smaller
    images and small batches (batch 8: 1.95× slower on 16×16×32; ResNet-18's 28×28×64 at
    batch 16: 1.08× slower)."""
    return (cfg.groups == 1 and w_shape[2] >= 32 and out_hw[0] * out_hw[1] >= 256
            and x_shape[0] >= 32)


def _tap_input_grad(g, w, x_shape, cfg: ConvConfig):
    """∂L/∂a as a sum over kernel taps: ∂L/∂a[n, h·s+i·d, w·s+j·d, c] += Σ_k δ[n,h,w,k] W[i,j,c,k].

    One matmul ``δ Wᵀ`` gives every tap's contribution at once, (N, H_out, W_out, KH·KW·C_in);
    each tap's slice is then placed at its offset (interior padding for the stride) and the
    placements are summed, all in one fused pass over ∂L/∂a. Measured, not used: alone it is
    0.2–0.6× the convolution form for C_in ≤ 6 (scripts/bench_ops.py), but inside the LeNet-5
    step XLA fuses the placements with their producers and the step got slower and 3× larger in
    temp memory (docs/performance.md). Kept for the benchmark and the tests."""
    kh, kw, cin, cout = w.shape
    n, ho, wo, _ = g.shape
    (sh, sw), (dh, dw_) = cfg.stride, cfg.dilation
    (pt, pb), (pl, pr) = cfg.padding
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr
    cols = lax.dot_general(g, w.reshape(kh * kw * cin, cout), (((3,), (1,)), ((), ())))
    zero = jnp.zeros((), g.dtype)
    total = None
    for t, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
        tap = cols[..., t * cin:(t + 1) * cin]
        placed = lax.pad(tap, zero, (
            (0, 0, 0),
            (i * dh, hp - (i * dh + (ho - 1) * sh + 1), sh - 1),
            (j * dw_, wp - (j * dw_ + (wo - 1) * sw + 1), sw - 1),
            (0, 0, 0)))
        total = placed if total is None else total + placed
    return total[:, pt:pt + x_shape[1], pl:pl + x_shape[2], :]


def _cpu_input_grad_form(x_shape, w_shape, cfg: ConvConfig, out_hw, dtype) -> str:
    """Which formulation the CPU backward uses for ∂L/∂a: rows, pointwise, phases or generic.

    Pointwise and phases only for δ of at least 16×16 pixels: on ResNet-20's 8×8 δ both
    measured slower than the convolution (phases 1.26–1.34×, pointwise 1.05–1.24×;
    scripts/bench_ops.py)."""
    if _use_rows(x_shape, w_shape, cfg, out_hw, dtype):
        return "rows"
    if out_hw[0] * out_hw[1] < 256:
        return "generic"
    if _is_pointwise(w_shape, cfg):
        return "pointwise"
    if cfg.stride != (1, 1) and cfg.groups == 1 and cfg.dilation == (1, 1):
        return "phases"
    return "generic"


def _cpu_weight_grad_form(x_shape, w_shape, cfg: ConvConfig, out_hw, dtype) -> str:
    """Which formulation the CPU backward uses for ∂L/∂W: pointwise, columns (thin layers,
    :func:`_weight_grad_column_block`), split taps (:func:`_use_split_taps`), chunks (batch
    >= 64, :func:`_weight_grad_chunk`), taps, patches or generic."""
    if _is_pointwise(w_shape, cfg):
        return "pointwise"
    if _weight_grad_column_block(x_shape, w_shape, dtype, cfg) > 1:
        return "columns"
    if _use_split_taps(x_shape, w_shape, cfg, dtype):
        return "split"
    if _weight_grad_chunk(x_shape, w_shape, dtype):
        return "chunks"
    if _use_taps(x_shape, w_shape, cfg, out_hw):
        return "taps"
    if _use_patches(x_shape, w_shape, cfg, out_hw):
        return "patches"
    return "generic"


def _cpu_input_grad(g, w, x_shape, cfg: ConvConfig):
    form = _cpu_input_grad_form(x_shape, w.shape, cfg, g.shape[1:3], g.dtype)
    if form == "rows":
        return _row_input_grad(g, w, x_shape, cfg)
    if form == "pointwise":
        return _pointwise_input_grad(g, w, x_shape, cfg)
    if form == "phases":
        return _phase_input_grad(g, w, x_shape, cfg)
    return _input_grad(g, w, x_shape, cfg)


def _cpu_weight_grad(x, g, w_shape, cfg: ConvConfig):
    form = _cpu_weight_grad_form(x.shape, w_shape, cfg, g.shape[1:3], x.dtype)
    if form == "pointwise":
        return _pointwise_weight_grad(x, g, cfg)
    if form == "columns":
        return _column_blocked_weight_grad(
            x, g, w_shape, cfg, _weight_grad_column_block(x.shape, w_shape, x.dtype, cfg))
    if form == "split":
        return _split_tap_weight_grad(x, g, w_shape, cfg,
                                      _split_taps_chunk(w_shape, g.shape[1:3], x.dtype, cfg))
    if form == "chunks":
        return _batch_chunked_weight_grad(x, g, w_shape, cfg,
                                          _weight_grad_chunk(x.shape, w_shape, x.dtype))
    if form == "taps":
        return _tap_weight_grad(x, g, w_shape, cfg)
    if form == "patches":
        return _patch_weight_grad(x, g, w_shape, cfg)
    return _weight_grad(x, g, w_shape, cfg)


def _channel_sum(g):
    """∂L/∂b[k] = Σ_{n,h,w} δ[n,h,w,k].

    With fewer than 16 channels the rows of δ are first summed R at a time as one
    (N·H·W / R, R·C_out) column sum (R·C_out <= 128) and the R partial sums folded: XLA:CPU
    reduces a 6-wide minor axis slowly (LeNet-5's first layer: 0.18 ms, 0.04 ms folded)."""
    c = g.shape[-1]
    rows = g.size // c
    r = next((r for r in (16, 8, 4, 2) if r * c <= 128 and rows % r == 0), 1)
    if c >= 16 or r == 1:
        return jnp.sum(g, axis=(0, 1, 2))
    return jnp.sum(jnp.sum(g.reshape(rows // r, r * c), axis=0).reshape(r, c), axis=0)


def _bwd(cfg: ConvConfig, res, g):
    x, w, b = res
    dx = lax.platform_dependent(
        g, w, cpu=lambda g, w: _cpu_input_grad(g, w, x.shape, cfg),
        default=lambda g, w: _input_grad(g, w, x.shape, cfg))
    dw = lax.platform_dependent(
        x, g, cpu=lambda x, g: _cpu_weight_grad(x, g, w.shape, cfg),
        default=lambda x, g: _weight_grad(x, g, w.shape, cfg))
    db = None if b is None else _channel_sum(g)
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


_conv2d_rule = manual_rule("conv2d", _forward, _fwd, _bwd, num_args=4, primal=_rule_forward)


def conv_config(x, w, b=None, *, stride=1, padding="SAME", dilation=1, groups=1) -> ConvConfig:
    """Check the arguments of :func:`conv2d` and resolve them to a :class:`ConvConfig`."""
    _checks.require_rank("x", x, 4, "(N, H, W, C_in) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 4, "(KH, KW, C_in // groups, C_out) in HWIO layout")
    _checks.check_kernel_layout(x, w, groups)          # a PyTorch (C_out, C_in, KH, KW) kernel
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    stride = _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    n, h, wd, cin = x.shape
    kh, kw, w_cin, cout = w.shape
    if cin % groups:
        raise ValueError(f"groups: x has C_in={cin} channels, not divisible by groups={groups}")
    if w_cin != cin // groups:
        raise ValueError(
            f"w: kernel input channels w.shape[2]={w_cin} must equal C_in / groups = "
            f"{cin} / {groups} = {cin // groups} (w.shape={tuple(w.shape)}, x.shape="
            f"{tuple(x.shape)})." + _checks.warn_if_nchw("x", x, w_cin * groups)
        )
    if cout % groups:
        raise ValueError(f"w: C_out={cout} (w.shape[3]) is not divisible by groups={groups}")
    if b is not None:
        _checks.require_array("b", b)
        if tuple(b.shape) != (cout,):
            raise ValueError(f"b: expected shape ({cout},) (C_out), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"b: dtype {b.dtype} differs from x dtype {x.dtype}")
    k_eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
    pads = _checks.resolve_padding("padding", padding, (h, wd), k_eff, stride)
    for axis, what in ((0, "height"), (1, "width")):
        _checks.output_size("w", (h, wd)[axis], k_eff[axis], stride[axis], pads[axis],
                            f"dilated kernel {what}")
    return ConvConfig(stride, pads, dilation, groups)


def _conv2d_api(rule):
    def conv2d(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None, *,
               stride=1, padding="SAME", dilation=1, groups=1) -> jax.Array:
        """2-D convolution: ``z = a ⋆ W + b``.

        Args:
          x: input ``a``, shape ``(N, H, W, C_in)``.
          w: kernel ``W``, shape ``(KH, KW, C_in // groups, C_out)``.
          b: optional bias, shape ``(C_out,)``.
          stride, dilation: int or ``(sh, sw)``.
          padding: ``"SAME"`` (output ``ceil(H / sh)``), ``"VALID"``, an int, or
            ``((top, bottom), (left, right))``.
          groups: feature groups; ``groups == C_in`` is a depthwise convolution.

        Returns:
          ``z`` of shape ``(N, H_out, W_out, C_out)``.

        Backward (hand-written in ``jbp.conv``): ``∂L/∂W = δ ⋆ a``, ``∂L/∂b = Σ_{n,h,w} δ``, and
        ``∂L/∂a`` = full convolution of the stride-dilated ``δ`` with ``W`` rotated 180° and
        channels swapped. Residuals: ``x``, ``w`` and ``b`` (``(x.size + w.size + C_out) ·
        itemsize`` bytes; ``b`` only for its dtype).
        """
        cfg = conv_config(x, w, b, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)
        return rule(x, w, b, cfg)

    return conv2d


conv2d = _conv2d_api(_conv2d_rule)
autodiff_conv2d = _conv2d_api(_conv2d_rule.forward)

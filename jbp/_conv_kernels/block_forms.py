"""Convolutions over re-blocked inputs: blocks of columns (thin layers) and split taps (3×3).

Each function computes one equation of ``jbp.layers.conv_equations`` with other XLA operations
than ``lax.conv_general_dilated``, in that module's calling convention; the table in
``jbp._conv_kernels`` says where each one is used, and docs/performance.md what it measured.
``cfg`` is a ``conv_equations.ConvConfig``.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp.layers import conv_equations as E
from jbp._conv_kernels import tuning
from jbp._conv_kernels.tap_forms import (patch_matmul, patch_matrix, sum_over_batch_chunks,
                                         tap_views, chunked_weight_grad)


def _unpadded_stride_1():
    """The blocked input already carries the padding: a stride-1, unpadded correlation."""
    return E.ConvConfig((1, 1), ((0, 0), (0, 0)), (1, 1), 1)


# --- blocks of B columns ----------------------------------------------------------------------

def column_blocks(w_out: int, kw: int, block: int) -> Tuple[int, int, int]:
    """(output blocks ⌈W_out / B⌉, kernel blocks KB = ⌈(B + KW − 1) / B⌉, input blocks)."""
    out_blocks = -(-w_out // block)
    kb = -(-(block + kw - 1) // block)
    return out_blocks, kb, out_blocks + kb - 1


def _column_select(kb: int, block: int, kw: int, dtype) -> jax.Array:
    """select[jb, p, q, j] = 1 where j = jb·B + p − q ∈ [0, KW): W_B = select · W."""
    jb, p, q, j = np.ogrid[:kb, :block, :block, :kw]
    return jnp.asarray(jb * block + p - q == j, dtype)


def _blocked_input(x, cfg, block: int, in_blocks: int):
    """The padded input, zero-filled on the right to whole blocks, as (N, H_p, blocks, B·C)."""
    n, h, wd, cin = x.shape
    (pt, pb), (pl, _) = cfg.padding
    xp = lax.pad(x, jnp.zeros((), x.dtype),
                 ((0, 0, 0), (pt, pb, 0), (pl, in_blocks * block - wd - pl, 0), (0, 0, 0)))
    return xp.reshape(n, h + pt + pb, in_blocks, block * cin)


def column_blocked_correlate(x, w, cfg, block: int):
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
    to whole blocks; output columns past W_out are cut off. The sum is ``P · W_B`` with P the
    patch matrix of a_B (:func:`patch_matrix`), a plain matmul, up to
    :data:`tuning.COLUMN_FORWARD_PATCH_BYTES` of P; past it, a convolution of a_B with W_B."""
    kh, kw, cin, cout = w.shape
    n = x.shape[0]
    w_out = E.out_hw(x.shape, w.shape, cfg)[1]
    out_blocks, kb, in_blocks = column_blocks(w_out, kw, block)
    xb = _blocked_input(x, cfg, block, in_blocks)
    ho = xb.shape[1] - kh + 1
    wb = jnp.einsum("bpqj,ijck->ibpcqk", _column_select(kb, block, kw, w.dtype), w,
                    precision=lax.Precision.HIGHEST).reshape(kh, kb, block * cin, block * cout)
    patch_bytes = n * ho * out_blocks * kh * kb * block * cin * jnp.dtype(x.dtype).itemsize
    if patch_bytes <= tuning.COLUMN_FORWARD_PATCH_BYTES:
        # The same views, hence the same patch matrix, as column_blocked_weight_grad's: XLA
        # builds it once when both run in one step.
        views = tap_views(xb, (kh, kb), (ho, out_blocks), _unpadded_stride_1())
        zb = lax.dot_general(patch_matrix(views), wb.reshape(-1, block * cout),
                             (((1,), (0,)), ((), ())))
    else:
        zb = E.correlate(xb, wb, _unpadded_stride_1())
    return zb.reshape(n, ho, out_blocks * block, cout)[:, :, :w_out]


def column_blocked_weight_grad(x, g, w_shape, cfg, block: int):
    """∂L/∂W for the column-blocked form: the patch matrix of the blocked input, then W_B's
    gradient folded back onto W.

    With a_B, δ_B the input and δ in blocks of B columns (:func:`column_blocked_correlate`),

        ∂L/∂W_B[i, jb, (p, c), (q, k)] = Σ_{n, h, b} a_B[n, h + i, b + jb, (p, c)]
                                                   · δ_B[n, h, b, (q, k)]
        ∂L/∂W[i, j, c, k] = Σ_{jb, p, q : jb·B + p − q = j} ∂L/∂W_B[i, jb, (p, c), (q, k)]

    (the chain rule through W_B = select · W). The first line is the weight gradient of an
    unpadded stride-1 correlation of a_B, ``Pᵀ δ_B`` with the patch matrix P of a_B
    (:func:`patch_matmul`), built for as many images at a time as fit in
    :data:`tuning.COLUMN_PATCH_BYTES`. δ_B's columns past W_out are zero, so the padding to
    whole blocks adds nothing."""
    kh, kw, cin, cout = w_shape
    n, ho, w_out, _ = g.shape
    out_blocks, kb, in_blocks = column_blocks(w_out, kw, block)
    xb = _blocked_input(x, cfg, block, in_blocks)
    gb = lax.pad(g, jnp.zeros((), g.dtype),
                 ((0, 0, 0), (0, 0, 0), (0, out_blocks * block - w_out, 0), (0, 0, 0)))
    gb = gb.reshape(n, ho, out_blocks, block * cout)
    wb_shape = (kh, kb, block * cin, block * cout)
    per_image = ho * out_blocks * kh * kb * block * cin * jnp.dtype(x.dtype).itemsize
    dwb = chunked_weight_grad(xb, gb, wb_shape, _unpadded_stride_1(),
                              tuning.COLUMN_PATCH_BYTES // per_image, patch_matmul)
    dwb = dwb.reshape(kh, kb, block, cin, block, cout)
    return jnp.einsum("bpqj,ibpcqk->ijck", _column_select(kb, block, kw, dwb.dtype), dwb,
                      precision=lax.Precision.HIGHEST)


# --- split taps: the kernel's columns on one side of a matmul, its rows on the other ----------

def _split_input_columns(xb, cfg, kw: int, wo: int):
    """A[n, r, w, (j, c)] = a_p[n, r, w + j·d_w, c]: the padded input's KW column shifts side by
    side, (B, H_p, W_out, KW·C_in). The input side of both split forms (stride 1)."""
    (pt, pb), (pl, pr) = cfg.padding
    dw_ = cfg.dilation[1]
    xp = lax.pad(xb, jnp.zeros((), xb.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    return jnp.concatenate([lax.slice_in_dim(xp, j * dw_, j * dw_ + wo, axis=2)
                            for j in range(kw)], axis=3)


def split_tap_weight_grad(x, g, w_shape, cfg, chunk: int):
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
    data instead of the KH·KW of a patch matrix, and no transposed input. Each chunk is padded
    and shifted inside the ``lax.scan`` (:func:`sum_over_batch_chunks`), where its A and D stay
    in cache."""
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

    total = sum_over_batch_chunks(contribution, x, g, chunk, (kw * cin, kh * cout))
    return total.reshape(kw, cin, kh, cout).transpose(2, 0, 1, 3)


def split_tap_correlate(x, w, cfg, chunk: int):
    """z = a ⋆ W (stride 1, one group) as one matmul per chunk of ``chunk`` images, then a sum
    of KH row-shifted slices: the split of :func:`split_tap_weight_grad` for the forward.

    With A the KW column shifts of the padded input as there, A[n, r, w, (j, c)] =
    a_p[n, r, w + j·d_w, c], and W' the kernel with its rows beside its output channels,
    W'[(j, c), (i, k)] = W[i, j, c, k],

        B = A · W'                                 (N·H_p·W_out, KH·C_out)
        z[n, h, w, k] = Σ_i B[n, h + i·d_h, w, (i, k)]
                      = Σ_{i, j, c} a_p[n, h + i·d_h, w + j·d_w, c] · W[i, j, c, k]

    The chunks are unrolled (independent, so XLA's thunk executor runs them side by side)."""
    assert cfg.stride == (1, 1) and cfg.groups == 1, cfg
    kh, kw, cin, cout = w.shape
    dh = cfg.dilation[0]
    ho, wo = E.out_hw(x.shape, w.shape, cfg)
    w_split = w.transpose(1, 2, 0, 3).reshape(kw * cin, kh * cout)

    def correlate_chunk(xb):
        a = _split_input_columns(xb, cfg, kw, wo)                    # (B, H_p, W_out, KW·C_in)
        bm = lax.dot_general(a, w_split, (((3,), (0,)), ((), ())))    # (B, H_p, W_out, KH·C_out)
        return sum(bm[:, i * dh:i * dh + ho, :, i * cout:(i + 1) * cout] for i in range(kh))

    n = x.shape[0]
    return jnp.concatenate([correlate_chunk(x[s:s + chunk]) for s in range(0, n, chunk)])

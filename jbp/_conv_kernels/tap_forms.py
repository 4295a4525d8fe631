"""Convolution gradients as matmuls over kernel taps, stride phases and patch matrices.

Each function computes one equation of ``jbp.layers.conv_equations`` (named in its docstring)
with other XLA operations than ``lax.conv_general_dilated``, in that module's calling convention
(operands, static arguments, then the form's parameters); the table in ``jbp._conv_kernels`` says
where each one is used, and docs/performance.md what it measured. ``cfg`` is a
``conv_equations.ConvConfig``; ``a`` is the padded input and ``δ = ∂L/∂z``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp.layers import conv_equations as E
from jbp._conv_kernels import tuning

_NHWC = ("NHWC", "HWIO", "NHWC")


# --- 1×1 kernels ------------------------------------------------------------------------------

def pointwise_input_grad(g, w, x_shape, cfg):
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


def pointwise_weight_grad(x, g, w_shape, cfg):
    """1×1 kernel: ∂L/∂W[0,0,c,k] = Σ_{n,h,w} a[n, h·s, w·s, c] δ[n,h,w,k] — one matmul ``aᵀ δ``
    over the strided pixels (XLA:CPU's convolution for it is 5–9× slower)."""
    (sh, sw) = cfg.stride
    n, ho, wo, _ = g.shape
    xs = lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, x.shape[3]),
                   (1, sh, sw, 1))
    dw = lax.dot_general(xs, g, (((0, 1, 2), (0, 1, 2)), ((), ())))      # (C_in, C_out)
    return dw[None, None]


# --- input gradient ---------------------------------------------------------------------------

def phase_input_grad(g, w, x_shape, cfg):
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


def row_input_grad(g, w, x_shape, cfg):
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
    W_p / KW times the convolution's multiplications; the row sum is one elementwise pass. The
    padding is cropped off."""
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


# --- weight gradient --------------------------------------------------------------------------

def batch_chunked_weight_grad(x, g, w_shape, cfg, chunk: int):
    """∂L/∂W = Σ_chunks δ_chunk ⋆ a_chunk: the sum over n split into chunks of ``chunk`` images,
    each chunk's sum one XLA convolution (``conv_equations.weight_grad``), the chunks unrolled.

    The weight-gradient convolution contracts over the batch, so XLA:CPU first transposes the
    whole input to put N innermost; per chunk the transpose and the convolution stay in cache,
    and the independent chunks run side by side. Unrolled on purpose: inside ``lax.map`` (a
    while loop) the same chunks ran 50–100× slower."""
    n = x.shape[0]
    total = None
    for start in range(0, n, chunk):
        part = E.weight_grad(x[start:start + chunk], g[start:start + chunk], w_shape, cfg)
        total = part if total is None else total + part
    return total


def tap_weight_grad(x, g, w_shape, cfg):
    """∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c], one matmul per tap.

    For each kernel tap (i, j) the sum over (n, h, w) is a plain matmul ``a_tapᵀ δ`` of the
    (strided, shifted) input view with δ, over chunks of :data:`tuning.TAP_CHUNK` images that
    stay in cache; the convolution form instead transposes the whole input first."""
    cin = w_shape[2]

    def tap_matmuls(views, gb):
        grads = [lax.dot_general(v.reshape(-1, cin), gb, (((0,), (0,)), ((), ())))
                 for v in views]                                    # each (C_in, C_out)
        return jnp.concatenate(grads)

    return chunked_weight_grad(x, g, w_shape, cfg, tuning.TAP_CHUNK, tap_matmuls)


def patch_weight_grad(x, g, w_shape, cfg):
    """∂L/∂W as one matmul per batch chunk of the patch matrix (im2col): ∂L/∂W = Pᵀ δ.

    Row ``(n, h, w)`` of ``P`` holds every tap's input vector ``a[n, h·s+i·d, w·s+j·d, :]``, so
    ``P`` is (N·H_out·W_out, KH·KW·C_in) and ``Pᵀ δ`` is the whole kernel gradient in one wide
    matmul, ordered (i, j, c) like ``W``. Built for :data:`tuning.PATCH_CHUNK` images at a time
    inside a ``lax.scan``, so each chunk's ``P`` stays in cache (for the whole batch it would be
    KH·KW times the input)."""
    return chunked_weight_grad(x, g, w_shape, cfg, tuning.PATCH_CHUNK, patch_matmul)


def patch_matrix(views):
    """The views (each (B, H_out, W_out, C_in), in tap order) side by side: the patch matrix
    P, (B·H_out·W_out, taps·C_in), rows ordered (n, h, w) like δ's, columns (i, j, c) like W's."""
    patches = jnp.stack(views, axis=3)                          # (B, H_out, W_out, taps, C_in)
    return patches.reshape(-1, len(views) * views[0].shape[3])


def patch_matmul(views, gb):
    """``Pᵀ δ`` for one chunk (:func:`patch_matrix`)."""
    return lax.dot_general(patch_matrix(views), gb, (((0,), (0,)), ((), ())))


def tap_views(xp, taps_hw, out_hw, cfg):
    """The KH·KW shifted, strided views ``a[n, h·s+i·d, w·s+j·d, :]`` of the padded input, each
    (N, H_out, W_out, C_in), in (i, j) order."""
    (kh, kw), (ho, wo) = taps_hw, out_hw
    (sh, sw), (dh, dw_) = cfg.stride, cfg.dilation
    n, _, _, cin = xp.shape
    return [lax.slice(xp, (0, i * dh, j * dw_, 0),
                      (n, i * dh + (ho - 1) * sh + 1, j * dw_ + (wo - 1) * sw + 1, cin),
                      (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def chunked_weight_grad(x, g, w_shape, cfg, target: int, per_chunk):
    """Σ over batch chunks of ``per_chunk(views, δ_chunk)``, reshaped to W's (KH, KW, C_in, C_out).

    ``views`` are one chunk's :func:`tap_views`, δ_chunk is (B·H_out·W_out, C_out). The input is
    padded once, then summed in chunks of ``target`` images (:func:`sum_over_batch_chunks`).
    Shared by the per-tap, patch-matrix and column-blocked forms."""
    kh, kw, cin, cout = w_shape
    n, ho, wo, _ = g.shape
    (pt, pb), (pl, pr) = E.weight_grad_pads(x, g, w_shape, cfg)
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))

    def contribution(xb, gb):
        views = tap_views(xb, (kh, kw), (ho, wo), cfg)
        return per_chunk(views, gb.reshape(xb.shape[0] * ho * wo, cout))

    total = sum_over_batch_chunks(contribution, xp, g, target, (kh * kw * cin, cout))
    return total.reshape(kh, kw, cin, cout)


def sum_over_batch_chunks(contribution, x, g, target: int, shape):
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

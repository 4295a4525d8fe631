"""Max and average pooling, and max unpooling, with hand-written backwards.

Equations (EQUATIONS.md, "Pooling"), ``δ = ∂L/∂z`` for each pooled output::

    max pool:        ∂L/∂a[p] = Σ_{windows w with argmax(w) = p} δ[w]
    average pool:    ∂L/∂a[p] = Σ_{windows w ∋ p} δ[w] / |w|
    max unpool:      z[idx[q]] = a[q],   ∂L/∂a[q] = δ[idx[q]]

(Global and adaptive average pooling: ``jbp.layers.adaptive_pooling``.)

Overlapping windows (e.g. 3×3 stride 2) accumulate: a cell that lies in several windows receives
the sum of their contributions. Padding is virtual: −∞ for max pooling, 0 for average pooling; the
backward computes on the padded grid and crops the padding away. Max pooling's window may be
dilated (tap (i, j) reads cell (h·s + i·d, w·s + j·d)). ``ceil_mode`` (PyTorch's) adds a last,
partial window where the input leaves a remainder: the padded grid is extended at the bottom and
right by the overhang, which holds −∞ for max pooling and counts in no average's divisor
(EQUATIONS.md, "Pooling").

Max-pool tie rule: the whole of ``δ[w]`` goes to the *first* maximum of the window in row-major
window order (top-left first), the same position JAX picks. So the routed gradient of every window
sums to ``δ[w]`` exactly. Two corner cases, stated rather than special-cased: a window containing
NaN has no position equal to its (NaN) maximum, so its δ goes to tap 0 (JAX routes it to the NaN);
a window whose real cells are all −∞ ties with its padding, and its δ may go to a padded cell and
be cropped (as in JAX).
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jbp import _checks
from jbp._registry import layer
from jbp._rule import manual_rule


class PoolConfig(NamedTuple):
    """Static configuration of one pooling window, padding explicit, input size recorded."""

    window: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]     # the ceil-mode overhang included
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]
    dilation: Tuple[int, int] = (1, 1)
    overhang: Tuple[int, int] = (0, 0)     # ceil mode's cells past the bottom / right padding


def pool_config(x, window, stride, padding, *, dilation=1, ceil_mode=False) -> PoolConfig:
    """Check pooling arguments against ``x`` (NHWC) and resolve them."""
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    window = _checks.pair("window", window)
    stride = window if stride is None else _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode: expected a bool, got {ceil_mode!r}")
    in_hw = tuple(x.shape[1:3])
    k_eff = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = _checks.resolve_padding("padding", padding, in_hw, k_eff, stride)
    out, overhang = [], []
    for axis, what in ((0, "height"), (1, "width")):
        if max(pads[axis]) >= k_eff[axis]:
            raise ValueError(
                f"padding: {pads[axis]} along the {what} must be smaller than the window "
                f"{k_eff[axis]}, or some windows would see only padding")
        size = _checks.output_size("window", in_hw[axis], k_eff[axis], stride[axis],
                                   pads[axis], f"window {what}")
        padded = in_hw[axis] + sum(pads[axis])
        if ceil_mode and (padded - k_eff[axis]) % stride[axis]:
            # PyTorch: one more window, unless it would start past the input and left padding.
            if size * stride[axis] < in_hw[axis] + pads[axis][0]:
                size += 1
        out.append(size)
        overhang.append(max(0, (size - 1) * stride[axis] + k_eff[axis] - padded))
    pads = tuple((lo, hi + extra) for (lo, hi), extra in zip(pads, overhang))
    return PoolConfig(window, stride, pads, in_hw, tuple(out), dilation, tuple(overhang))


def _pad_spec(cfg: PoolConfig):
    (t, b), (l, r) = cfg.padding
    return ((0, 0), (t, b), (l, r), (0, 0))


def _taps(cfg: PoolConfig):
    """Window offsets (i·d_h, j·d_w) in row-major order; tap index t = i·KW + j."""
    (kh, kw), (dh, dw) = cfg.window, cfg.dilation
    return [(i * dh, j * dw) for i in range(kh) for j in range(kw)]


def _tap_view(xp, i, j, cfg: PoolConfig):
    """The element at offset (i, j) of every window (dilation applied): (N, H_out, W_out, C)."""
    (ho, wo), (sh, sw) = cfg.out_hw, cfg.stride
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                     (1, sh, sw, 1))


def _scatter_taps(contribution, cfg: PoolConfig, dtype):
    """Σ over window taps of each tap's (N, H_out, W_out, C) contribution, placed back at the
    input cells that tap read (stride gaps zero), on the padded grid; then the padding is cropped.

    This is the transpose of :func:`_tap_view`: overlapping windows accumulate.
    """
    (ho, wo), (sh, sw) = cfg.out_hw, cfg.stride
    (pt, pb), (pl, pr) = cfg.padding
    hp, wp = cfg.in_hw[0] + pt + pb, cfg.in_hw[1] + pl + pr
    zero = jnp.zeros((), dtype)
    total = None
    for t, (i, j) in enumerate(_taps(cfg)):
        placed = lax.pad(contribution(t).astype(dtype), zero, (
            (0, 0, 0),
            (i, hp - (i + (ho - 1) * sh + 1), sh - 1),
            (j, wp - (j + (wo - 1) * sw + 1), sw - 1),
            (0, 0, 0)))
        total = placed if total is None else total + placed
    return total[:, pt:pt + cfg.in_hw[0], pl:pl + cfg.in_hw[1], :]


# --- Max pooling ------------------------------------------------------------------------------

def _max_forward(x, cfg: PoolConfig):
    kh, kw = cfg.window
    sh, sw = cfg.stride
    if cfg.dilation != (1, 1):
        # z = max over the window's taps, written out: JAX has no derivative of a dilated
        # reduce_window max (select_and_gather), and jbp.autodiff differentiates this function.
        xp = jnp.pad(x, _pad_spec(cfg), constant_values=-jnp.inf)
        return jnp.max(jnp.stack([_tap_view(xp, i, j, cfg) for i, j in _taps(cfg)]), axis=0)
    # The init value must be a concrete (numpy) scalar: a traced one hides the max monoid from
    # lax.reduce_window, which then falls back to a generic reduce that JAX cannot differentiate.
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, kh, kw, 1),
                             (1, sh, sw, 1), _pad_spec(cfg))


def _index_dtype(cfg: PoolConfig):
    size = cfg.window[0] * cfg.window[1]
    return jnp.int8 if size <= 127 else (jnp.int16 if size <= 32767 else jnp.int32)


def _first_max_tap(x, y, cfg: PoolConfig):
    """The tap index t of each window's first maximum (row-major window order)."""
    xp = jnp.pad(x, _pad_spec(cfg), constant_values=-jnp.inf)
    # Walk the taps backwards so the smallest matching tap index wins: the first maximum.
    idx = jnp.zeros(y.shape, _index_dtype(cfg))
    for t, (i, j) in reversed(list(enumerate(_taps(cfg)))):
        idx = jnp.where(_tap_view(xp, i, j, cfg) == y, jnp.asarray(t, idx.dtype), idx)
    return idx


def _max_fwd(x, cfg: PoolConfig):
    # Residual: index of the first maximum of each window, int8 for windows up to 127 cells
    # (N·H_out·W_out·C bytes — a quarter of a float32 output, not the whole input).
    y = _max_forward(x, cfg)
    return y, _first_max_tap(x, y, cfg)


def flat_indices(tap, cfg: PoolConfig):
    """PyTorch's ``return_indices``: the row-major index h·W + w into the (unpadded) input of
    each window's first maximum, from its tap index t = i·KW + j: h = h_out·s_h − p_top + i·d_h."""
    (kh, kw), (sh, sw), (dh, dw) = cfg.window, cfg.stride, cfg.dilation
    (pt, _), (pl, _) = cfg.padding
    ho, wo = cfg.out_hw
    tap = tap.astype(jnp.int32)
    rows = jnp.arange(ho, dtype=jnp.int32)[:, None, None] * sh - pt + (tap // kw) * dh
    cols = jnp.arange(wo, dtype=jnp.int32)[None, :, None] * sw - pl + (tap % kw) * dw
    return rows * cfg.in_hw[1] + cols


def _tiles(cfg: PoolConfig) -> bool:
    """Whether the windows tile the input exactly: stride = window, no padding, no remainder."""
    return (cfg.stride == cfg.window and cfg.padding == ((0, 0), (0, 0))
            and cfg.dilation == (1, 1)
            and cfg.in_hw == (cfg.out_hw[0] * cfg.window[0], cfg.out_hw[1] * cfg.window[1]))


def _max_bwd(cfg: PoolConfig, idx, g):
    zero = jnp.zeros((), g.dtype)
    # ∂L/∂a[p] = Σ_{windows whose first maximum is p} δ[window]
    if _tiles(cfg):
        # Each cell lies in exactly one window: no sum. Viewed as (N, H_out, KH, W_out, KW, C),
        # cell (i, j) of window (h, w) receives δ[h, w] where the window's maximum is tap
        # i·KW + j: one broadcast compare-and-select, where the general form below pads
        # and adds KH·KW shifted copies (LeNet-5's 2×2 pools: docs/performance.md).
        (kh, kw), (n, ho, wo, c) = cfg.window, g.shape
        taps = np.arange(kh * kw).reshape(1, 1, kh, 1, kw, 1)
        dx = jnp.where(idx[:, :, None, :, None, :] == jnp.asarray(taps, idx.dtype),
                       g[:, :, None, :, None, :], zero)
        return (dx.reshape(n, ho * kh, wo * kw, c),)
    dx = _scatter_taps(lambda t: jnp.where(idx == t, g, zero), cfg, g.dtype)
    return (dx,)   # δ has the output's dtype, which is the input's: dtype is preserved


_max_pool_rule = manual_rule("max_pool", _max_forward, _max_fwd, _max_bwd, num_args=2)


@layer(_max_pool_rule)
def max_pool(rule, x: jax.Array, window, stride=None, padding="VALID", *, dilation=1,
             ceil_mode: bool = False, return_indices: bool = False):
    """2-D max pooling over NHWC ``x``.

    Args:
      x: shape ``(N, H, W, C)``.
      window: int or ``(KH, KW)``.
      stride: int or pair; defaults to ``window``.
      padding: ``"VALID"``, ``"SAME"``, an int, or ``((top, bottom), (left, right))``;
        padded cells are ``−∞`` and each pad must be smaller than the (dilated) window.
      dilation: int or pair: tap (i, j) reads cell ``(h·s + i·d, w·s + j·d)``.
      ceil_mode: PyTorch's: ``H_out = ⌈(H + pads − (K−1)·d − 1) / s⌉ + 1`` (a last, partial
        window where the input leaves a remainder, unless it would start past the input).
      return_indices: also return PyTorch's indices: for each output, the row-major
        index ``h·W + w`` of its maximum in the unpadded input, int32, shape of the output
        (for :func:`jbp.max_unpool`; not differentiable).

    Returns:
      shape ``(N, H_out, W_out, C)``; with ``return_indices``, ``(output, indices)``.

    Backward: each window's ``δ`` goes to its maximum, other cells get 0, overlapping windows
    accumulate. Ties: the first maximum in row-major window order takes all of ``δ``.
    Residuals: the int8 tap index of each window's maximum (``N·H_out·W_out·C`` bytes;
    int16 for windows over 127 cells).
    """
    if not isinstance(return_indices, bool):
        raise TypeError(f"return_indices: expected a bool, got {return_indices!r}")
    cfg = pool_config(x, window, stride, padding, dilation=dilation, ceil_mode=ceil_mode)
    y = rule(x, cfg)
    if not return_indices:
        return y
    x0, y0 = lax.stop_gradient(x), lax.stop_gradient(y)
    return y, flat_indices(_first_max_tap(x0, y0, cfg), cfg)


# --- Average pooling --------------------------------------------------------------------------

class AvgConfig(NamedTuple):
    pool: PoolConfig
    count_include_pad: bool


def _divisor(cfg: AvgConfig, dtype):
    """|w| per output position: the window's cells inside the padded input (all KH·KW but for
    a ceil-mode overhang), or, without ``count_include_pad``, its real (unpadded) cells."""
    kh, kw = cfg.pool.window
    if cfg.count_include_pad and cfg.pool.overhang == (0, 0):
        return jnp.asarray(kh * kw, dtype)
    counts = []
    for axis, k in ((0, kh), (1, kw)):
        lo, hi = cfg.pool.padding[axis]
        starts = np.arange(cfg.pool.out_hw[axis]) * cfg.pool.stride[axis] - lo
        if cfg.count_include_pad:          # the user's padding counts, the overhang does not
            end = cfg.pool.in_hw[axis] + hi - cfg.pool.overhang[axis]
            counts.append(np.minimum(starts + k, end) - starts)
        else:
            ends = np.minimum(starts + k, cfg.pool.in_hw[axis])
            counts.append(ends - np.maximum(starts, 0))
    return jnp.asarray(np.outer(counts[0], counts[1])[None, :, :, None], dtype)


def _avg_forward(x, cfg: AvgConfig):
    kh, kw = cfg.pool.window
    sh, sw = cfg.pool.stride
    total = lax.reduce_window(x, np.array(0, x.dtype), lax.add, (1, kh, kw, 1), (1, sh, sw, 1),
                              _pad_spec(cfg.pool))      # concrete init: see _max_forward
    return total / _divisor(cfg, x.dtype)


def _avg_fwd(x, cfg: AvgConfig):
    # Residuals: none (0 bytes); the divisor is rebuilt from the static config.
    return _avg_forward(x, cfg), None


def _avg_bwd(cfg: AvgConfig, _res, g):
    share = g / _divisor(cfg, g.dtype)            # δ[w] / |w| to every cell of window w
    dx = _scatter_taps(lambda t: share, cfg.pool, g.dtype)
    return (dx,)


_avg_pool_rule = manual_rule("avg_pool", _avg_forward, _avg_fwd, _avg_bwd, num_args=2)


@layer(_avg_pool_rule)
def avg_pool(rule, x: jax.Array, window, stride=None, padding="VALID",
             count_include_pad: bool = True, *, ceil_mode: bool = False) -> jax.Array:
    """2-D average pooling over NHWC ``x``; arguments as :func:`max_pool`, padding is 0.

    ``count_include_pad=True`` (PyTorch's default) divides every window by ``KH·KW``;
    ``False`` divides by the number of real (unpadded) cells in the window. With
    ``ceil_mode`` (PyTorch's) the last, partial window divides by its cells inside the
    padded input (``count_include_pad``) or by its real cells, never by the overhang.

    Returns:
      shape ``(N, H_out, W_out, C)``.

    Backward: each cell of window ``w`` receives ``δ[w] / |w|``; overlapping windows
    accumulate. Residuals: none (0 bytes).
    """
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"count_include_pad: expected a bool, got {count_include_pad!r}")
    cfg = pool_config(x, window, stride, padding, ceil_mode=ceil_mode)
    return rule(x, AvgConfig(cfg, count_include_pad))


# --- Max unpooling ----------------------------------------------------------------------------

class UnpoolConfig(NamedTuple):
    out_hw: Tuple[int, int]


def _scatter_index(x, indices):
    n, h, w, c = x.shape
    return (jnp.arange(n)[:, None, None], indices.reshape(n, h * w, c),
            jnp.arange(c)[None, None, :])


def _unpool_forward(x, indices, cfg: UnpoolConfig):
    n, h, w, c = x.shape
    out = jnp.zeros((n, cfg.out_hw[0] * cfg.out_hw[1], c), x.dtype)
    out = out.at[_scatter_index(x, indices)].set(x.reshape(n, h * w, c))
    return out.reshape(n, *cfg.out_hw, c)


def _unpool_fwd(x, indices, cfg: UnpoolConfig):
    return _unpool_forward(x, indices, cfg), indices      # residual: the int32 indices


def _unpool_bwd(cfg: UnpoolConfig, indices, g):
    n, h, w, c = indices.shape
    flat = g.reshape(n, -1, c)
    dx = jnp.take_along_axis(flat, indices.reshape(n, h * w, c), axis=1)   # ∂L/∂a[q] = δ[idx[q]]
    return dx.reshape(n, h, w, c), None


_max_unpool_rule = manual_rule("max_unpool", _unpool_forward, _unpool_fwd, _unpool_bwd,
                               num_args=3)


@layer(_max_unpool_rule)
def max_unpool(rule, x: jax.Array, indices: jax.Array, window, stride=None, padding=0,
               output_size=None) -> jax.Array:
    """Place each value of ``x`` at its max-pooling index (PyTorch's ``max_unpool2d``).

    Args:
      x: pooled values, shape ``(N, H, W, C)``.
      indices: ``max_pool(..., return_indices=True)``'s indices, int, shape of ``x``.
      window, stride, padding: the pooling's (int or pair; ``stride`` defaults to
        ``window``, ``padding`` an int or pair); they give the default output size
        ``(H − 1)·s − 2p + K``.
      output_size: ``(H_out, W_out)``, overriding the default.

    Returns:
      shape ``(N, H_out, W_out, C)``: zeros but at the indices. Where windows overlapped
      and share a maximum, its index appears twice and the cell holds the value once (as
      in PyTorch), and the backward gives each copy that cell's ``δ`` (as PyTorch; JAX's
      derivative of the write credits one copy only).

    Backward: ``∂L/∂a[q] = δ[idx[q]]``, a gather at the indices; none for ``indices``.
    Residuals: the indices (``N·H·W·C · 4`` bytes).
    """
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_array("indices", indices)
    if tuple(indices.shape) != tuple(x.shape):
        raise ValueError(f"indices: expected the shape of x {tuple(x.shape)}, got "
                         f"{tuple(indices.shape)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices: expected an integer array, got dtype {indices.dtype}")
    window = _checks.pair("window", window)
    stride = window if stride is None else _checks.pair("stride", stride)
    pad = _checks.pair("padding", padding, minimum=0)
    if output_size is None:
        output_size = tuple((x.shape[1 + a] - 1) * stride[a] - 2 * pad[a] + window[a]
                            for a in (0, 1))
    out_hw = _checks.pair("output_size", output_size)
    return rule(x, indices.astype(jnp.int32), UnpoolConfig(out_hw))

"""Max, average and global average pooling with hand-written backwards.

Equations (EQUATIONS.md, "Pooling"), ``δ = ∂L/∂z`` for each pooled output::

    max pool:        ∂L/∂a[p] = Σ_{windows w with argmax(w) = p} δ[w]
    average pool:    ∂L/∂a[p] = Σ_{windows w ∋ p} δ[w] / |w|
    global average:  ∂L/∂a[n,h,w,c] = δ[n,c] / (H·W)

Overlapping windows (e.g. 3×3 stride 2) accumulate: a cell that lies in several windows receives
the sum of their contributions. Padding is virtual: −∞ for max pooling, 0 for average pooling; the
backward computes on the padded grid and crops the padding away.

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
from jbp._rule import manual_rule


class PoolConfig(NamedTuple):
    """Static configuration of one pooling window, padding explicit, input size recorded."""

    window: Tuple[int, int]
    stride: Tuple[int, int]
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]


def pool_config(x, window, stride, padding) -> PoolConfig:
    """Check pooling arguments against ``x`` (NHWC) and resolve them."""
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    window = _checks.pair("window", window)
    stride = window if stride is None else _checks.pair("stride", stride)
    in_hw = tuple(x.shape[1:3])
    pads = _checks.resolve_padding("padding", padding, in_hw, window, stride)
    out = []
    for axis, what in ((0, "height"), (1, "width")):
        if max(pads[axis]) >= window[axis]:
            raise ValueError(
                f"padding: {pads[axis]} along the {what} must be smaller than the window "
                f"{window[axis]}, or some windows would see only padding")
        out.append(_checks.output_size("window", in_hw[axis], window[axis], stride[axis],
                                       pads[axis], f"window {what}"))
    return PoolConfig(window, stride, pads, in_hw, tuple(out))


def _pad_spec(cfg: PoolConfig):
    (t, b), (l, r) = cfg.padding
    return ((0, 0), (t, b), (l, r), (0, 0))


def _taps(cfg: PoolConfig):
    """Window offsets (i, j) in row-major order; tap index t = i·KW + j."""
    kh, kw = cfg.window
    return [(i, j) for i in range(kh) for j in range(kw)]


def _tap_view(xp, i, j, cfg: PoolConfig):
    """The element at offset (i, j) of every window: shape (N, H_out, W_out, C)."""
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
    # The init value must be a concrete (numpy) scalar: a traced one hides the max monoid from
    # lax.reduce_window, which then falls back to a generic reduce that JAX cannot differentiate.
    return lax.reduce_window(x, np.array(-np.inf, x.dtype), lax.max, (1, kh, kw, 1),
                             (1, sh, sw, 1), _pad_spec(cfg))


def _index_dtype(cfg: PoolConfig):
    size = cfg.window[0] * cfg.window[1]
    return jnp.int8 if size <= 127 else (jnp.int16 if size <= 32767 else jnp.int32)


def _max_fwd(x, cfg: PoolConfig):
    y = _max_forward(x, cfg)
    xp = jnp.pad(x, _pad_spec(cfg), constant_values=-jnp.inf)
    # Residual: index of the first maximum of each window, int8 for windows up to 127 cells
    # (N·H_out·W_out·C bytes — a quarter of a float32 output, not the whole input).
    # Walk the taps backwards so the smallest matching tap index wins: the first maximum.
    idx = jnp.zeros(y.shape, _index_dtype(cfg))
    for t, (i, j) in reversed(list(enumerate(_taps(cfg)))):
        idx = jnp.where(_tap_view(xp, i, j, cfg) == y, jnp.asarray(t, idx.dtype), idx)
    return y, idx


def _tiles(cfg: PoolConfig) -> bool:
    """Whether the windows tile the input exactly: stride = window, no padding, no remainder."""
    return (cfg.stride == cfg.window and cfg.padding == ((0, 0), (0, 0))
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


def _max_pool_api(rule):
    def max_pool(x: jax.Array, window, stride=None, padding="VALID") -> jax.Array:
        """2-D max pooling over NHWC ``x``.

        Args:
          x: shape ``(N, H, W, C)``.
          window: int or ``(KH, KW)``.
          stride: int or pair; defaults to ``window``.
          padding: ``"VALID"``, ``"SAME"``, an int, or ``((top, bottom), (left, right))``;
            padded cells are ``−∞`` and each pad must be smaller than the window.

        Returns:
          shape ``(N, H_out, W_out, C)``.

        Backward: each window's ``δ`` goes to its maximum, other cells get 0, overlapping windows
        accumulate. Ties: the first maximum in row-major window order takes all of ``δ``.
        Residuals: the int8 tap index of each window's maximum (``N·H_out·W_out·C`` bytes;
        int16 for windows over 127 cells).
        """
        return rule(x, pool_config(x, window, stride, padding))

    return max_pool


max_pool = _max_pool_api(_max_pool_rule)
autodiff_max_pool = _max_pool_api(_max_pool_rule.forward)


# --- Average pooling --------------------------------------------------------------------------

class AvgConfig(NamedTuple):
    pool: PoolConfig
    count_include_pad: bool


def _divisor(cfg: AvgConfig, dtype):
    """|w| per output position: the window size, or the count of real (unpadded) cells."""
    kh, kw = cfg.pool.window
    if cfg.count_include_pad:
        return jnp.asarray(kh * kw, dtype)
    counts = []
    for axis, k in ((0, kh), (1, kw)):
        lo, _ = cfg.pool.padding[axis]
        starts = np.arange(cfg.pool.out_hw[axis]) * cfg.pool.stride[axis] - lo
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


def _avg_pool_api(rule):
    def avg_pool(x: jax.Array, window, stride=None, padding="VALID",
                 count_include_pad: bool = True) -> jax.Array:
        """2-D average pooling over NHWC ``x``; arguments as :func:`max_pool`, padding is 0.

        ``count_include_pad=True`` (PyTorch's default) divides every window by ``KH·KW``;
        ``False`` divides by the number of real (unpadded) cells in the window.

        Returns:
          shape ``(N, H_out, W_out, C)``.

        Backward: each cell of window ``w`` receives ``δ[w] / |w|``; overlapping windows
        accumulate. Residuals: none (0 bytes).
        """
        if not isinstance(count_include_pad, bool):
            raise TypeError(f"count_include_pad: expected a bool, got {count_include_pad!r}")
        return rule(x, AvgConfig(pool_config(x, window, stride, padding), count_include_pad))

    return avg_pool


avg_pool = _avg_pool_api(_avg_pool_rule)
autodiff_avg_pool = _avg_pool_api(_avg_pool_rule.forward)


# --- Global average pooling -------------------------------------------------------------------

def _global_forward(x, _hw=None):
    return jnp.mean(x, axis=(1, 2))


def _global_fwd(x, hw):
    return _global_forward(x), None                          # residuals: none (0 bytes)


def _global_bwd(hw, _res, g):
    h, w = hw
    n, c = g.shape
    # ∂L/∂a[n,h,w,c] = δ[n,c] / (H·W)
    return (jnp.broadcast_to((g / (h * w))[:, None, None, :], (n, h, w, c)),)


_global_rule = manual_rule("global_avg_pool", _global_forward, _global_fwd, _global_bwd,
                           num_args=2)


def _global_api(rule):
    def global_avg_pool(x: jax.Array) -> jax.Array:
        """Mean over the spatial axes: ``(N, H, W, C) -> (N, C)``.

        Backward ``∂L/∂a[n,h,w,c] = δ[n,c] / (H·W)``. Residuals: none (0 bytes).
        """
        _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
        _checks.require_float("x", x)
        return rule(x, tuple(x.shape[1:3]))

    return global_avg_pool


global_avg_pool = _global_api(_global_rule)
autodiff_global_avg_pool = _global_api(_global_rule.forward)

"""Global and adaptive average pooling, and adaptive max pooling, with hand-written backwards.

Equations (EQUATIONS.md, "Pooling"). Adaptive pooling to ``(H_out, W_out)`` averages, for output
``(i, j)``, the rows of bin ``[⌊i·H / H_out⌋, ⌈(i + 1)·H / H_out⌉)`` and the columns of the
matching bin over W (PyTorch's bins: neighbouring bins overlap where ``H_out`` does not divide
``H``). With the bin-averaging matrices ``A_h[i, h] = 1 / |bin_i|`` on bin i (0 elsewhere) and
``A_w`` likewise::

    z[n, i, j, c]   = Σ_{h, w} A_h[i, h] · a[n, h, w, c] · A_w[j, w]
    ∂L/∂a[n,h,w,c]  = Σ_{i, j} A_h[i, h] · δ[n, i, j, c] · A_w[j, w]       (the transpose)
    global average:  ∂L/∂a[n,h,w,c] = δ[n,c] / (H·W)                     (H_out = W_out = 1)

Adaptive max pooling takes the maximum over the same bins and routes each ``δ`` to its bin's
first maximum in row-major order (PyTorch's index), overlapping bins accumulating::

    z[n, i, j, c]  = max_{h ∈ bin_i, w ∈ bin_j} a[n, h, w, c],   (h*, w*) = its first argmax
    ∂L/∂a[n,h,w,c] = Σ_{(i, j) : (h*, w*)(i, j) = (h, w)} δ[n, i, j, c]
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks
from jbp._registry import layer
from jbp._rule import manual_rule


class AdaptiveConfig(NamedTuple):
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]


def bin_matrix(size: int, out: int) -> np.ndarray:
    """A[i, h] = 1 / |bin_i| for h in bin_i = [⌊i·size/out⌋, ⌈(i+1)·size/out⌉), else 0."""
    a = np.zeros((out, size))
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        a[i, lo:hi] = 1.0 / (hi - lo)
    return a


def _matrices(cfg: AdaptiveConfig, dtype):
    return tuple(jnp.asarray(bin_matrix(cfg.in_hw[a], cfg.out_hw[a]), dtype) for a in (0, 1))


def _adaptive_forward(x, cfg: AdaptiveConfig):
    a_h, a_w = _matrices(cfg, x.dtype)
    return jnp.einsum("ih,nhwc,jw->nijc", a_h, x, a_w)


def _adaptive_fwd(x, cfg: AdaptiveConfig):
    return _adaptive_forward(x, cfg), None        # residuals: none (the bins are static)


def _adaptive_bwd(cfg: AdaptiveConfig, _res, g):
    a_h, a_w = _matrices(cfg, g.dtype)
    return (jnp.einsum("ih,nijc,jw->nhwc", a_h, g, a_w),)    # Σ_{i,j} A_h[i,h] δ A_w[j,w]


_adaptive_rule = manual_rule("adaptive_avg_pool", _adaptive_forward, _adaptive_fwd,
                             _adaptive_bwd, num_args=2)


@layer(_adaptive_rule)
def adaptive_avg_pool(rule, x: jax.Array, output_size) -> jax.Array:
    """Average pooling to a given output size, PyTorch's ``AdaptiveAvgPool2d`` bins.

    Args:
      x: shape ``(N, H, W, C)``, H and W >= 1.
      output_size: int or ``(H_out, W_out)``; any size >= 1 (bins overlap where it does
        not divide the input; larger than the input repeats cells).

    Returns:
      shape ``(N, H_out, W_out, C)``.

    Backward: ``∂L/∂a[h, w] = Σ_{bins (i, j) ∋ (h, w)} δ[i, j] / (|bin_i|·|bin_j|)``.
    Residuals: none (0 bytes).
    """
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    out_hw = _checks.pair("output_size", output_size)
    if min(x.shape[1:3]) < 1:
        raise ValueError(f"x: adaptive pooling needs H, W >= 1, got shape {tuple(x.shape)}")
    return rule(x, AdaptiveConfig(tuple(x.shape[1:3]), out_hw))


# --- Global average pooling -----------------------------------------------------------------

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


@layer(_global_rule)
def global_avg_pool(rule, x: jax.Array) -> jax.Array:
    """Mean over the spatial axes: ``(N, H, W, C) -> (N, C)``.

    Backward ``∂L/∂a[n,h,w,c] = δ[n,c] / (H·W)``. Residuals: none (0 bytes).
    """
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    return rule(x, tuple(x.shape[1:3]))


# --- Adaptive max pooling --------------------------------------------------------------------

def bin_cells(size: int, out: int):
    """(index (out, L), valid (out, L)): the cells of each bin, padded to the longest bin L by
    repeating its last cell (masked out by ``valid``)."""
    bounds = [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]
    longest = max(hi - lo for lo, hi in bounds)
    index = np.array([[min(lo + t, hi - 1) for t in range(longest)] for lo, hi in bounds])
    valid = np.array([[lo + t < hi for t in range(longest)] for lo, hi in bounds])
    return index, valid


def _bin_values(x, cfg: AdaptiveConfig):
    """The cells of every bin, (N, H_out, W_out, L_h·L_w, C) row-major within the bin (−∞ where
    a bin is shorter than the longest), and their flat input positions h·W + w."""
    (ih, vh), (iw, vw) = (bin_cells(cfg.in_hw[a], cfg.out_hw[a]) for a in (0, 1))
    n, _, _, c = x.shape
    cells = x[:, ih[:, :, None, None], iw[None, None, :, :], :]      # (N, Ho, Lh, Wo, Lw, C)
    cells = cells.transpose(0, 1, 3, 2, 4, 5).reshape(n, *cfg.out_hw, -1, c)
    valid = (vh[:, None, :, None] & vw[None, :, None, :]).reshape(*cfg.out_hw, -1)
    position = (ih[:, None, :, None] * cfg.in_hw[1] + iw[None, :, None, :]).reshape(
        *cfg.out_hw, -1)
    cells = jnp.where(valid[None, :, :, :, None], cells, -jnp.inf)
    return cells, position


def _adaptive_max_forward(x, cfg: AdaptiveConfig):
    return jnp.max(_bin_values(x, cfg)[0], axis=3)


def _adaptive_max_fwd(x, cfg: AdaptiveConfig):
    cells, position = _bin_values(x, cfg)
    first = jnp.argmax(cells, axis=3)                         # first maximum, row-major
    where = jnp.take_along_axis(jnp.asarray(position)[None, :, :, :, None],
                                first[:, :, :, None, :], axis=3)[:, :, :, 0, :]
    # Residuals: the flat input position h*·W + w* of each output's maximum (int32).
    return jnp.max(cells, axis=3), where.astype(jnp.int32)


def _adaptive_max_bwd(cfg: AdaptiveConfig, where, g):
    # ∂L/∂a[h, w] = Σ δ[i, j] over the outputs whose maximum is (h, w)
    n, _, _, c = g.shape
    rows = where.transpose(0, 3, 1, 2).reshape(n * c, -1)
    offsets = (np.arange(n * c) * (cfg.in_hw[0] * cfg.in_hw[1]))[:, None]
    flat = jnp.zeros((n * c * cfg.in_hw[0] * cfg.in_hw[1],), g.dtype).at[
        (rows + offsets).reshape(-1)].add(g.transpose(0, 3, 1, 2).reshape(-1))
    return (flat.reshape(n, c, *cfg.in_hw).transpose(0, 2, 3, 1),)


_adaptive_max_rule = manual_rule("adaptive_max_pool", _adaptive_max_forward, _adaptive_max_fwd,
                                 _adaptive_max_bwd, num_args=2)


@layer(_adaptive_max_rule)
def adaptive_max_pool(rule, x: jax.Array, output_size) -> jax.Array:
    """Max pooling to a given output size, PyTorch's ``AdaptiveMaxPool2d`` bins.

    Args:
      x: shape ``(N, H, W, C)``, H and W >= 1.
      output_size: int or ``(H_out, W_out)``; any size >= 1 (bins overlap where it does
        not divide the input).

    Returns:
      shape ``(N, H_out, W_out, C)``.

    Backward: ``δ[i, j]`` to the first maximum (row-major) of bin ``(i, j)``; overlapping bins
    accumulate. Residuals: the int32 input position of each maximum (``4·N·H_out·W_out·C``
    bytes).
    """
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    out_hw = _checks.pair("output_size", output_size)
    if min(x.shape[1:3]) < 1:
        raise ValueError(f"x: adaptive pooling needs H, W >= 1, got shape {tuple(x.shape)}")
    return rule(x, AdaptiveConfig(tuple(x.shape[1:3]), out_hw))

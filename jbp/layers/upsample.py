"""Upsampling (PyTorch's ``F.interpolate``, nearest and bilinear) and channel concatenation, with
hand-written backwards.

Both interpolation modes are separable: one interpolation matrix per spatial axis,
``A_h (H_out, H)`` and ``A_w (W_out, W)`` (EQUATIONS.md, "Upsampling")::

    z[n, i, j, c]   = Σ_{h, w} A_h[i, h] · a[n, h, w, c] · A_w[j, w]
    ∂L/∂a[n,h,w,c]  = Σ_{i, j} A_h[i, h] · δ[n, i, j, c] · A_w[j, w]        (the transpose)

with, for output row ``i`` and ``r`` the coordinate scale (``1 / scale`` when a scale is given,
else ``H / H_out``, PyTorch's ``recompute_scale_factor=False``):

- nearest: ``A[i, src(i)] = 1``, ``src(i) = min(⌊i·r⌋, H − 1)`` (in float32, as PyTorch
  computes it), so the backward sums each source cell's copies of ``δ``;
- bilinear, ``align_corners=False``: ``x = max((i + ½)·r − ½, 0)``, ``h₀ = ⌊x⌋``,
  ``h₁ = min(h₀ + 1, H − 1)``, ``λ = x − h₀``: ``A[i, h₀] += 1 − λ``, ``A[i, h₁] += λ``;
- bilinear, ``align_corners=True``: the same with ``x = i·(H − 1)/(H_out − 1)`` (0 when
  ``H_out = 1``).

Concatenation along the channels, ``z = [a⁽¹⁾, …, a⁽ᵐ⁾]``, has the backward that splits ``δ``:
``∂L/∂a⁽ᵗ⁾ = δ[..., C₁ + … + C_{t−1} : C₁ + … + C_t]``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks
from jbp._registry import layer
from jbp._rule import manual_rule

MODES = ("nearest", "bilinear")


class UpsampleConfig(NamedTuple):
    """Static configuration: the mode, ``align_corners``, input and output sizes, and the
    scale given per axis (``None``: computed from the sizes)."""

    mode: str
    align_corners: bool
    in_hw: Tuple[int, int]
    out_hw: Tuple[int, int]
    scale: Tuple[Optional[float], Optional[float]]


def interpolation_matrix(mode: str, size: int, out: int, scale: Optional[float] = None,
                         align_corners: bool = False) -> np.ndarray:
    """A (out, size), float64: row i holds the weights output i takes of each input cell
    (module docstring)."""
    a = np.zeros((out, size))
    rows = np.arange(out)
    if mode == "nearest":
        if out == size:
            src = rows
        else:   # PyTorch computes the scale and the product in float32
            r = np.float32(1.0 / scale) if scale else np.float32(size) / np.float32(out)
            src = np.minimum(np.floor(rows.astype(np.float32) * r).astype(np.int64), size - 1)
        a[rows, src] = 1.0
        return a
    if align_corners:
        r = (size - 1) / (out - 1) if out > 1 else 0.0
        x = rows * r
    else:
        r = 1.0 / scale if scale else size / out
        x = np.maximum((rows + 0.5) * r - 0.5, 0.0)
    h0 = np.minimum(np.floor(x).astype(np.int64), size - 1)
    h1 = np.minimum(h0 + 1, size - 1)
    lam = x - h0
    np.add.at(a, (rows, h0), 1.0 - lam)
    np.add.at(a, (rows, h1), lam)
    return a


def _matrices(cfg: UpsampleConfig, dtype):
    return tuple(jnp.asarray(interpolation_matrix(cfg.mode, cfg.in_hw[a], cfg.out_hw[a],
                                                  cfg.scale[a], cfg.align_corners), dtype)
                 for a in (0, 1))


def _upsample_forward(x, cfg: UpsampleConfig):
    a_h, a_w = _matrices(cfg, x.dtype)
    # z = A_h a A_wᵀ per image and channel, one axis at a time
    z = jnp.einsum("ih,nhwc->niwc", a_h, x)
    return jnp.einsum("jw,niwc->nijc", a_w, z)


def _upsample_fwd(x, cfg: UpsampleConfig):
    return _upsample_forward(x, cfg), None      # residuals: none (the matrices are static)


def _upsample_bwd(cfg: UpsampleConfig, _res, g):
    a_h, a_w = _matrices(cfg, g.dtype)
    # ∂L/∂a = A_hᵀ δ A_w: the transpose of each axis' interpolation (nearest: copies summed)
    d = jnp.einsum("jw,nijc->niwc", a_w, g)
    return (jnp.einsum("ih,niwc->nhwc", a_h, d),)


_upsample_rule = manual_rule("upsample", _upsample_forward, _upsample_fwd, _upsample_bwd,
                             num_args=2)


def _scale_pair(scale) -> Tuple[float, float]:
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        scale = (scale, scale)
    try:
        pair = tuple(float(s) for s in scale)
        assert len(pair) == 2 and all(not isinstance(s, bool) for s in scale)
    except (TypeError, ValueError, AssertionError):
        raise TypeError(f"scale: expected a number or a pair of numbers, got {scale!r}") from None
    if min(pair) <= 0 or not all(math.isfinite(s) for s in pair):
        raise ValueError(f"scale: every entry must be a finite number > 0, got {scale!r}")
    return pair


def upsample_config(x, size=None, scale=None, mode="nearest",
                    align_corners=False) -> UpsampleConfig:
    """Check :func:`upsample`'s arguments and resolve the output size as ``F.interpolate``:
    ``H_out = ⌊H · scale⌋`` from a scale."""
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners: expected a bool, got {align_corners!r}")
    if align_corners and mode == "nearest":
        raise ValueError("align_corners: only the bilinear mode has corners to align "
                         "(PyTorch raises for nearest too)")
    if (size is None) == (scale is None):
        raise ValueError(f"size, scale: give exactly one of them (the output size, or the "
                         f"factor that multiplies the input size), got size={size!r}, "
                         f"scale={scale!r}")
    in_hw = tuple(x.shape[1:3])
    if min(in_hw) < 1:
        raise ValueError(f"x: upsampling needs H, W >= 1, got shape {tuple(x.shape)}")
    if size is not None:
        out_hw = _checks.pair("size", size)
        scales = (None, None)
    else:
        scales = _scale_pair(scale)
        out_hw = tuple(int(math.floor(n * s)) for n, s in zip(in_hw, scales))
        if min(out_hw) < 1:
            raise ValueError(f"scale: {scale!r} makes an empty output {out_hw} from the input "
                             f"{in_hw}")
    return UpsampleConfig(mode, align_corners, in_hw, out_hw, scales)


@layer(_upsample_rule)
def upsample(rule, x: jax.Array, size=None, scale=None, mode: str = "nearest",
             align_corners: bool = False) -> jax.Array:
    """Resize the spatial axes of NHWC ``x``, equal to PyTorch's ``F.interpolate``.

    Args:
      x: shape ``(N, H, W, C)``.
      size: int or ``(H_out, W_out)``; or
      scale: number or ``(s_h, s_w)``, any positive float: ``H_out = ⌊H·s_h⌋``, and the
        coordinates map through ``1 / s_h`` as PyTorch's default
        (``recompute_scale_factor=False``). Exactly one of ``size`` and ``scale``.
      mode: ``"nearest"`` (PyTorch's "nearest", not "nearest-exact") or ``"bilinear"``.
      align_corners: bilinear only, as PyTorch.

    Returns:
      shape ``(N, H_out, W_out, C)``.

    Backward: ``∂L/∂a = A_hᵀ δ A_w`` with the per-axis interpolation matrices (nearest: ``δ``
    summed over each source cell's copies; bilinear: the interpolation weights transposed).
    Residuals: none (0 bytes).
    """
    return rule(x, upsample_config(x, size, scale, mode, align_corners))


# --- concatenation ---------------------------------------------------------------------------

def _concat_forward(xs, sizes):
    return jnp.concatenate(xs, axis=-1)


def _concat_fwd(xs, sizes):
    return _concat_forward(xs, sizes), None      # residuals: none (the sizes are static)


def _concat_bwd(sizes, _res, g):
    # ∂L/∂a⁽ᵗ⁾ = δ[..., C₁+…+C_{t−1} : C₁+…+C_t]
    bounds = np.cumsum((0,) + tuple(sizes))
    return (tuple(g[..., lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])),)


_concat_rule = manual_rule("concat", _concat_forward, _concat_fwd, _concat_bwd, num_args=2)


@layer(_concat_rule)
def concat(rule, xs: Sequence[jax.Array]) -> jax.Array:
    """Concatenate arrays along their last (channel) axis: a U-Net's skip connection.

    Args:
      xs: a list or tuple of at least one array, equal in every axis but the last and in dtype.

    Returns:
      shape ``(..., C₁ + … + C_m)``.

    Backward: ``δ`` split back into the inputs' channel ranges. Residuals: none (0 bytes).
    """
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"xs: expected a non-empty list or tuple of arrays, got {xs!r}")
    for i, x in enumerate(xs):
        _checks.require_float(f"xs[{i}]", x)
        if x.ndim < 1 or x.shape[:-1] != xs[0].shape[:-1]:
            raise ValueError(f"xs[{i}]: shape {tuple(x.shape)} differs from xs[0]'s "
                             f"{tuple(xs[0].shape)} outside the last (channel) axis; crop or pad "
                             f"one of them first (jbp.pad with negative padding crops)")
        if x.dtype != xs[0].dtype:
            raise TypeError(f"xs[{i}]: dtype {x.dtype} differs from xs[0]'s {xs[0].dtype}")
    return rule(tuple(xs), tuple(int(x.shape[-1]) for x in xs))

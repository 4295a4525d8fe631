"""Spatial padding (reflect, replicate, circular, constant; negative pads crop) with a
hand-written backward.

Each mode maps every cell of the padded image to the input cell it copies, one index map per
spatial axis (EQUATIONS.md, "Padding")::

    a_p[n, r, x, c] = a[n, src_h(r), src_w(x), c]
    reflect     src(r) = |r − p_lo| reflected at both ends without repeating the edge
                (PyTorch's "reflect", NumPy's "reflect")
    replicate   src(r) = clip(r − p_lo, 0, H − 1)                      (NumPy's "edge")
    circular    src(r) = (r − p_lo) mod H                              (NumPy's "wrap")

The backward folds the padded gradient back onto the cells it was copied from:

    ∂L/∂a[n, h, w, c] = Σ_{(r, x) : src_h(r) = h, src_w(x) = w} δ[n, r, x, c]

(each cell receives its own δ plus the δ of every padded copy of it). ``conv2d(...,
padding_mode=...)`` pads with this layer and then convolves without padding, as PyTorch does.

The constant mode fills the new cells with ``value``; a negative pad crops that many cells
(PyTorch's ``F.pad`` with negative padding), which a U-Net's skips of unequal size need::

    a_p[n, r, x, c] = a[n, r − p_top, x − p_left, c]   where that cell exists, else value
    ∂L/∂a[n, h, w, c] = δ[n, h + p_top, w + p_left, c]  where that cell exists, else 0

(the backward pads ``δ`` by the negated pads with zeros: crops what was added, restores with
zeros what was cropped; ``value`` receives no gradient).
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

MODES = ("reflect", "replicate", "circular")     # conv2d's padding modes besides "zeros"
PAD_MODES = MODES + ("constant",)                     # pad's modes


class PadConfig(NamedTuple):
    """Static configuration: the mode, the pads ((top, bottom), (left, right)), the input H, W,
    and the constant mode's fill value."""

    mode: str
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    in_hw: Tuple[int, int]
    value: float = 0.0


def _constant_pads(padding, sign=1):
    return [(0, 0, 0)] + [(sign * lo, sign * hi, 0) for lo, hi in padding] + [(0, 0, 0)]


def source_index(mode: str, size: int, lo: int, hi: int) -> np.ndarray:
    """src(r) for r in [0, lo + size + hi): the input cell padded cell r copies."""
    r = np.arange(lo + size + hi) - lo
    if mode == "replicate":
        return np.clip(r, 0, size - 1)
    if mode == "circular":
        return np.mod(r, size)
    period = 2 * (size - 1)                                  # reflect, edge not repeated
    if period == 0:
        return np.zeros_like(r)
    r = np.mod(r, period)
    return np.where(r < size, r, period - r)


def _pad_forward(x, cfg: PadConfig):
    if cfg.mode == "constant":          # lax.pad: value in the new cells, negative pads crop
        return lax.pad(x, jnp.asarray(cfg.value, x.dtype), _constant_pads(cfg.padding))
    for axis in (0, 1):
        src = source_index(cfg.mode, cfg.in_hw[axis], *cfg.padding[axis])
        x = jnp.take(x, jnp.asarray(src), axis=1 + axis)
    return x


def _pad_fwd(x, cfg: PadConfig):
    return _pad_forward(x, cfg), None            # residuals: none (the index maps are static)


def _pad_bwd(cfg: PadConfig, _res, g):
    if cfg.mode == "constant":
        # ∂L/∂a[h, w] = δ[h + p_top, w + p_left]: δ padded by the negated pads, with zeros
        return (lax.pad(g, jnp.zeros((), g.dtype), _constant_pads(cfg.padding, -1)),)
    # ∂L/∂a[h] = Σ_{r : src(r) = h} δ[r], one spatial axis at a time (W first, then H).
    for axis in (1, 0):
        src = source_index(cfg.mode, cfg.in_hw[axis], *cfg.padding[axis])
        moved = jnp.moveaxis(g, 1 + axis, 0)
        folded = jnp.zeros((cfg.in_hw[axis],) + moved.shape[1:], g.dtype).at[src].add(moved)
        g = jnp.moveaxis(folded, 0, 1 + axis)
    return (g,)


_pad_rule = manual_rule("pad", _pad_forward, _pad_fwd, _pad_bwd, num_args=2)


def pad_config(x, padding, mode: str, value=0.0) -> PadConfig:
    """Check :func:`pad`'s arguments and resolve them."""
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    if mode not in PAD_MODES:
        raise ValueError(f"mode: expected one of {PAD_MODES}, got {mode!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        padding = ((padding, padding), (padding, padding))
    constant = mode == "constant"
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        assert len(pads) == 2 and (constant or min(min(p) for p in pads) >= 0)
    except (TypeError, ValueError, AssertionError):
        kind = "ints (negative ones crop)" if constant else "ints >= 0 (negative pads crop in " \
            "the 'constant' mode only)"
        raise ValueError(f"padding: expected an int or ((top, bottom), (left, right)) of "
                         f"{kind}, got {padding!r}") from None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"value: expected a Python number (the constant mode's fill), got "
                        f"{value!r}")
    if value != 0.0 and not constant:
        raise ValueError(f"value: only the 'constant' mode fills with a value, got mode={mode!r}")
    hw = tuple(x.shape[1:3])
    if constant:
        for axis, what in ((0, "height"), (1, "width")):
            if hw[axis] + sum(pads[axis]) < 0 or min(pads[axis]) < -hw[axis]:
                raise ValueError(f"padding: {pads[axis]} along the {what} crops more than the "
                                 f"input {what} {hw[axis]} (x.shape={tuple(x.shape)})")
        return PadConfig(mode, pads, hw, float(value))
    for axis, what in ((0, "height"), (1, "width")):
        if hw[axis] == 0 and max(pads[axis]):
            raise ValueError(f"padding: cannot pad an empty {what} (x.shape={tuple(x.shape)})")
        if mode == "reflect" and max(pads[axis]) >= hw[axis]:
            raise ValueError(
                f"padding: reflect padding {pads[axis]} along the {what} must be smaller than "
                f"the input {what} {hw[axis]} (x.shape={tuple(x.shape)}), as in PyTorch")
        if mode == "circular" and max(pads[axis]) > hw[axis]:
            raise ValueError(
                f"padding: circular padding {pads[axis]} along the {what} must be at most the "
                f"input {what} {hw[axis]} (x.shape={tuple(x.shape)}), as in PyTorch")
    return PadConfig(mode, pads, hw)


@layer(_pad_rule)
def pad(rule, x: jax.Array, padding, mode: str = "reflect", value: float = 0.0) -> jax.Array:
    """Pad the spatial axes of NHWC ``x`` by copying its own cells, or with a constant.

    Args:
      x: shape ``(N, H, W, C)``.
      padding: an int, or ``((top, bottom), (left, right))``; in the ``"constant"`` mode a
        negative pad crops that many cells (``F.pad``'s negative padding).
      mode: ``"reflect"`` (the edge is not repeated; each pad < the axis' size),
        ``"replicate"`` (the edge repeated), ``"circular"`` (wrap around; each pad <= the
        axis' size) or ``"constant"`` (``value`` in every new cell), as PyTorch's ``F.pad``.
      value: the constant mode's fill (a Python number; it gets no gradient).

    Returns:
      shape ``(N, top + H + bottom, left + W + right, C)``.

    Backward: ``∂L/∂a[h, w] = Σ δ`` over the padded cells that copy ``(h, w)``, the cell's
    own included; constant mode: ``δ`` cropped back (0 for the cells a negative pad cropped).
    Residuals: none (0 bytes).
    """
    return rule(x, pad_config(x, padding, mode, value))

"""Non-zero spatial padding (reflect, replicate, circular) with a hand-written backward.

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
"""

from __future__ import annotations

from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jbp import _checks
from jbp._registry import layer
from jbp._rule import manual_rule

MODES = ("reflect", "replicate", "circular")


class PadConfig(NamedTuple):
    """Static configuration: the mode, the pads ((top, bottom), (left, right)), the input H, W."""

    mode: str
    padding: Tuple[Tuple[int, int], Tuple[int, int]]
    in_hw: Tuple[int, int]


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
    for axis in (0, 1):
        src = source_index(cfg.mode, cfg.in_hw[axis], *cfg.padding[axis])
        x = jnp.take(x, jnp.asarray(src), axis=1 + axis)
    return x


def _pad_fwd(x, cfg: PadConfig):
    return _pad_forward(x, cfg), None            # residuals: none (the index maps are static)


def _pad_bwd(cfg: PadConfig, _res, g):
    # ∂L/∂a[h] = Σ_{r : src(r) = h} δ[r], one spatial axis at a time (W first, then H).
    for axis in (1, 0):
        src = source_index(cfg.mode, cfg.in_hw[axis], *cfg.padding[axis])
        moved = jnp.moveaxis(g, 1 + axis, 0)
        folded = jnp.zeros((cfg.in_hw[axis],) + moved.shape[1:], g.dtype).at[src].add(moved)
        g = jnp.moveaxis(folded, 0, 1 + axis)
    return (g,)


_pad_rule = manual_rule("pad", _pad_forward, _pad_fwd, _pad_bwd, num_args=2)


def pad_config(x, padding, mode: str) -> PadConfig:
    """Check :func:`pad`'s arguments and resolve them."""
    _checks.require_rank("x", x, 4, "(N, H, W, C) in NHWC layout")
    _checks.require_float("x", x)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(padding, int) and not isinstance(padding, bool):
        padding = ((padding, padding), (padding, padding))
    try:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        assert len(pads) == 2 and min(min(p) for p in pads) >= 0
    except (TypeError, ValueError, AssertionError):
        raise ValueError(f"padding: expected an int >= 0 or ((top, bottom), (left, right)) "
                         f"of ints >= 0, got {padding!r}") from None
    hw = tuple(x.shape[1:3])
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
def pad(rule, x: jax.Array, padding, mode: str = "reflect") -> jax.Array:
    """Pad the spatial axes of NHWC ``x`` by copying its own cells.

    Args:
      x: shape ``(N, H, W, C)``.
      padding: an int, or ``((top, bottom), (left, right))``.
      mode: ``"reflect"`` (the edge is not repeated; each pad < the axis' size),
        ``"replicate"`` (the edge repeated) or ``"circular"`` (wrap around; each pad <= the
        axis' size), as PyTorch's ``F.pad`` modes.

    Returns:
      shape ``(N, top + H + bottom, left + W + right, C)``.

    Backward: ``∂L/∂a[h, w] = Σ δ`` over the padded cells that copy ``(h, w)``, the cell's
    own included. Residuals: none (0 bytes).
    """
    return rule(x, pad_config(x, padding, mode))

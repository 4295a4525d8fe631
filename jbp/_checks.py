"""Argument checking shared by the layers.

Everything here runs at trace time on static shapes, so a user's mistake raises a ``ValueError`` or
``TypeError`` that names the argument and the expected vs actual value, instead of an error from
deep inside XLA.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jbp._probes import Probed

#: The layers whose rules fill jbp.quantities' probes (jbp._probes).
QUANTITY_LAYERS = ("dense", "conv2d", "conv_transpose2d", "batch_norm (evaluation mode)")

Pair = Tuple[int, int]
Padding = Union[str, int, Tuple[Tuple[int, int], Tuple[int, int]]]


def shape_of(x) -> tuple:
    return tuple(np.shape(x))


def require_array(name: str, x) -> None:
    if isinstance(x, Probed):
        raise ValueError(f"{name}: a parameter wrapped by jbp.quantities reached a layer that "
                         f"computes no per-example quantities (those that do: "
                         f"{', '.join(QUANTITY_LAYERS)})")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")


def require_key(name: str, key) -> None:
    """A JAX PRNG key: typed (``jax.random.key``) or raw uint32 ``(..., 2)`` (``PRNGKey``)."""
    require_array(name, key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return
    if key.dtype != jnp.uint32 or key.shape[-1:] != (2,):
        raise TypeError(f"{name}: expected a PRNG key from jax.random.key(seed), got an array "
                        f"of dtype {key.dtype} and shape {tuple(key.shape)}")


def require_float(name: str, x) -> None:
    """Layers compute in floating point: integer images must be converted (and scaled) first."""
    require_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name}: expected a floating-point array, got dtype {x.dtype}. Convert it first, "
            f"e.g. {name}.astype(jnp.float32) (and scale uint8 images to [0, 1])."
        )


def require_rank(name: str, x, rank: int, layout: str) -> None:
    """``layout`` spells the expected axes, e.g. ``"(N, H, W, C)"``."""
    require_array(name, x)
    if x.ndim != rank:
        hint = ""
        if rank == 4 and x.ndim == 3:
            hint = f" A single image needs a batch axis: {name}[None]."
        raise ValueError(
            f"{name}: expected a rank-{rank} array {layout}, got shape {shape_of(x)} "
            f"(rank {x.ndim}).{hint}"
        )


def warn_if_nchw(name: str, x, channels_expected: int | None = None) -> str:
    """A hint to append to channel errors when an NHWC array looks like NCHW."""
    if x.ndim == 4:
        n, h, w, c = x.shape
        looks_nchw = h in (1, 3, 4) and c > 4 and w == c
        if channels_expected is not None:
            looks_nchw = looks_nchw or (h == channels_expected and c != channels_expected)
        if looks_nchw:
            return (f" {name} looks like NCHW (channels on axis 1); jbp uses NHWC: "
                    f"transpose with {name}.transpose(0, 2, 3, 1).")
    return ""


def require_static_bool(name: str, value) -> None:
    """A flag that selects the computation at trace time (``train=``) must be a Python bool."""
    if isinstance(value, bool):
        return
    if isinstance(value, jax.core.Tracer):
        how = (f"; here it is traced, e.g. passed as an argument of a jax.jit-compiled function: "
               f"make it static (jax.jit(f, static_argnames=({name!r},))) or close over it "
               f"(jax.jit(lambda params, x: f(params, x, {name}=True)))")
    else:
        how = f"; convert it with bool({name})" if np.ndim(value) == 0 else ""
    raise TypeError(f"{name}: expected a Python bool (it selects the computation at trace time), "
                    f"got {type(value).__name__}{how}")


class LayoutWarning(UserWarning):
    """An argument's shape fits, but very likely in another layout than jbp's (NHWC, HWIO)."""


def check_kernel_layout(x, w, groups) -> None:
    """Recognise a PyTorch-layout kernel ``(C_out, C_in / groups, KH, KW)`` passed as HWIO.

    Only the readings that are nearly unambiguous are flagged (``c = C_in / groups``):

    - HWIO does not fit (``w.shape[2] != c``) but PyTorch's layout does, with a square kernel
      (``w.shape[1] == c``, ``w.shape[2] == w.shape[3]``): the shape error names the transpose.
    - HWIO fits only by coincidence: ``w`` is ``(C_out, c, c, c)`` with ``C_out >= 8`` and
      ``2 <= c <= 11``, e.g. a ``(16, 3, 3, 3)`` PyTorch kernel for RGB input, which as HWIO
      reads as a 16×3 kernel with as many output as input channels: a :class:`LayoutWarning`.
      (A kernel that really is that shape can silence it with ``warnings.filterwarnings``.)

    Square 3×3×c×c kernels such as ``(3, 3, 3, 3)`` read the same in both layouts and are never
    flagged. Anything the checks of ``conv2d`` reject anyway (ranks, groups) is left to them.
    """
    if (getattr(x, "ndim", None) != 4 or getattr(w, "ndim", None) != 4
            or not isinstance(groups, int) or groups < 1 or x.shape[-1] % groups):
        return
    c = x.shape[-1] // groups
    o, i, kh, kw = w.shape
    transpose = ("w looks like PyTorch's (C_out, C_in, KH, KW) layout; jbp expects HWIO "
                 "(KH, KW, C_in, C_out): pass w.transpose(2, 3, 1, 0)")
    if kh != c and i == c and kh == kw:
        raise ValueError(
            f"w: kernel input channels w.shape[2]={kh} must equal C_in / groups = "
            f"{x.shape[-1]} / {groups} = {c} (w.shape={tuple(w.shape)}, x.shape="
            f"{tuple(x.shape)}). If {transpose}.")
    if i == kh == kw == c and 2 <= c <= 11 and o >= 8:
        warnings.warn(f"w: shape {tuple(w.shape)} fits HWIO only as a {o}x{i} kernel with "
                      f"C_in = C_out = {c}; {transpose}", LayoutWarning, stacklevel=4)


def pair(name: str, value, *, minimum: int = 1) -> Pair:
    """An int or a pair of ints, each >= ``minimum``, as a pair."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        out = (int(value), int(value))
    elif (isinstance(value, Sequence) and len(value) == 2
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name}: every entry must be >= {minimum}, got {value!r}")
    return out


def resolve_padding(name: str, padding: Padding, spatial: Pair, window: Pair,
                    stride: Pair) -> Tuple[Pair, Pair]:
    """Explicit ((top, bottom), (left, right)) padding from jbp's padding forms.

    ``window`` is the *effective* window (dilation applied). "SAME" follows XLA/TensorFlow:
    output size ceil(in / stride), total padding split with the extra cell at the end.
    """
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0), (0, 0))
        if mode == "SAME":
            pads = []
            for size, k, s in zip(spatial, window, stride):
                out = -(-size // s)
                total = max((out - 1) * s + k - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)  # type: ignore[return-value]
        raise ValueError(
            f"{name}: unknown padding {padding!r}; expected 'SAME', 'VALID', an int, or "
            f"((top, bottom), (left, right))"
        )
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        if padding < 0:
            raise ValueError(f"{name}: padding must be >= 0, got {padding}")
        return ((int(padding), int(padding)), (int(padding), int(padding)))
    try:
        (t, b), (l, r) = padding  # type: ignore[misc]
        pads = ((int(t), int(b)), (int(l), int(r)))
    except (TypeError, ValueError):
        raise TypeError(
            f"{name}: expected 'SAME', 'VALID', an int, or ((top, bottom), (left, right)); "
            f"got {padding!r}"
        ) from None
    if min(pads[0] + pads[1]) < 0:
        raise ValueError(f"{name}: padding must be >= 0, got {padding!r}")
    return pads


def output_size(name: str, size: int, window: int, stride: int, pad: Pair, what: str) -> int:
    """Number of window positions along one axis; error if the window does not fit."""
    padded = size + pad[0] + pad[1]
    if window > padded:
        raise ValueError(
            f"{name}: {what} {window} is larger than the padded input {padded} "
            f"(input {size} + padding {pad[0]}+{pad[1]})"
        )
    return (padded - window) // stride + 1

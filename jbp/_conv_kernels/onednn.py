"""conv2d's three equations as oneDNN kernels (XLA FFI calls), float32 NHWC/HWIO, CPU only.

Equations (EQUATIONS.md, "Convolution"), stride ``s``, dilation ``d``, padded input ``a``, groups
``G`` (``c`` runs over the input channels of ``k``'s group)::

    correlate    z[n,h,w,k]     = Σ_{i,j,c} a[n, h·s+i·d, w·s+j·d, c] · W[i,j,c,k]  =: F(a, W)
    input_grad   ∂L/∂a          = (∂F/∂a)ᵀ δ        (the padding cropped off again)
    weight_grad  ∂L/∂W[i,j,c,k] = Σ_{n,h,w} δ[n,h,w,k] · a[n, h·s+i·d, w·s+j·d, c]

``F`` is bilinear and each map is linear in each argument, so each op's ``jax.custom_jvp``
rule is the op applied to the tangents (``dz = F(da, W) + F(a, dW)`` and likewise), the tangent
terms computed by ``jbp.layers.conv_equations``' generic XLA convolutions, which JAX can
transpose. Evaluated — as jbp's manual rule does in its forward (correlate) and backward
(input_grad, weight_grad) — they run on oneDNN; differentiated (grad of grad, Hessian-vector
products, ``jax.jvp``, ``jax.hessian``) the extra terms run on XLA.

``jax.vmap``: a batch axis on the image side only (per-example forward and input gradient) is
folded into ``N``: one call. A batched kernel, and the per-example weight gradient, loop over the
batch (``lax.map``), one call per example.

These functions have the signatures of the generic forms in ``jbp.layers.conv_equations`` and
must only run on CPU (``lax.platform_dependent``); :func:`select_forward` & co. say whether a
case can take them. Where the ``[onednn]`` extra is installed and builds they are the default
CPU backend (``_onednn_build.DEFAULT_BACKEND``).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_batching import custom_vmap

from jbp._conv_kernels import _onednn_build as build
from jbp._conv_kernels import tuning
from jbp._rule import _varying_axes, make_varying
from jbp._conv_kernels._onednn_build import (  # noqa: F401  (re-exported)
    OneDNNUnavailableWarning, conv_backend, describe, set_conv_backend)
from jbp.layers import conv_equations
from jbp.layers.conv_equations import out_hw

FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2          # indices into build.TARGETS


def _attrs(cfg):
    (pt, pb), (pl, pr) = cfg.padding
    return dict(sh=np.int64(cfg.stride[0]), sw=np.int64(cfg.stride[1]),
                dh=np.int64(cfg.dilation[0]), dw=np.int64(cfg.dilation[1]),
                pt=np.int64(pt), pb=np.int64(pb), pl=np.int64(pl), pr=np.int64(pr),
                groups=np.int64(cfg.groups))


# --- the raw FFI calls, with their vmap rules -------------------------------------------------

def _fold(op, a, b):
    """op over a batch axis on ``a`` only: fold it into N (one call)."""
    n = a.shape[0] * a.shape[1]
    out = op(a.reshape((n,) + a.shape[2:]), b)
    return out.reshape(a.shape[:2] + out.shape[1:])


def _batching(op, fold_first: bool):
    """vmap rule of a raw call ``op(a, b)``; batched arguments have the batch axis first."""
    def rule(axis_size, in_batched, a, b):
        a_batched, b_batched = in_batched
        if fold_first and not b_batched:
            return _fold(op, a, b), True
        if a_batched and b_batched:
            return lax.map(lambda ab: op(*ab), (a, b)), True
        if a_batched:
            return lax.map(lambda ai: op(ai, b), a), True
        return lax.map(lambda bi: op(a, bi), b), True
    return rule


def _ffi(target, shape, a, b, cfg):
    if build.library() is None:  # builds and registers the handlers on first use
        raise RuntimeError(f"jbp: the oneDNN convolution kernels are unavailable "
                           f"({build.unavailable_reason()}); select_*() returns None then")
    out = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32),
                           vmap_method="sequential")(a, b, **_attrs(cfg))
    # Under shard_map an FFI result is not typed as varying over the mesh axes its operands vary
    # over, and lax.platform_dependent then refused it beside the XLA branch ("manual axis types
    # do not match"): give it the operands' axes.
    return make_varying(out, _varying_axes(a) | _varying_axes(b))


@functools.lru_cache(maxsize=None)
def _raw(kind: int, cfg, static=None):
    """One FFI op as a function of its two operands: the forward ``(x, w) -> z``, the input
    gradient ``(δ, w) -> ∂L/∂a`` (``static``: a's (H, W, C)) or the weight gradient
    ``(x, δ) -> ∂L/∂W`` (``static``: W's shape). A vmapped image batch folds into N, except for
    the weight gradient, whose batch is its contraction (``_batching``)."""
    @custom_vmap
    def op(a, b):
        if kind == FORWARD:
            shape = (a.shape[0], *out_hw(a.shape, b.shape, cfg), b.shape[3])
        else:
            shape = (a.shape[0],) + static if kind == INPUT_GRAD else static
        return _ffi(build.TARGETS[kind], shape, a, b, cfg)
    op.def_vmap(_batching(op, fold_first=kind != WEIGHT_GRAD))
    return op


# --- the three equations: oneDNN when evaluated, XLA's convolutions when differentiated ----------
#
# Each op is bilinear, so its JVP is the op itself applied to the tangents: for correlate,
# dz = F(da, W) + F(a, dW), and likewise for the other two. The tangent terms use
# jbp.layers.conv_equations' generic XLA convolutions (correlate / input_grad / weight_grad),
# which JAX can transpose: so forward mode (jax.jvp, jax.hessian = jacfwd∘jacrev), reverse mode
# over them (grad of grad, Hessian-vector products) and vmap all work. jbp's manual rule calls
# these ops as primals — its forward calls correlate, its backward input_grad and weight_grad —
# so a training step's first-order gradient runs on oneDNN; only the extra terms of a second
# derivative run on XLA.

@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def correlate(x, w, cfg):
    """z = a ⋆ W (no bias): ``x (N,H,W,C_in)``, ``w (KH,KW,C_in/G,C_out)`` ->
    ``(N,H_out,W_out,C_out)``."""
    return _raw(FORWARD, cfg)(x, w)


def _bilinear_jvp(op, generic, primals, tangents, *static):
    """d op(a, b) = op(da, b) + op(a, db), the tangent terms by XLA's generic convolution."""
    (a, b), (da, db) = primals, tangents
    return op(a, b, *static), generic(da, b, *static) + generic(a, db, *static)


@correlate.defjvp
def _correlate_jvp(cfg, primals, tangents):
    return _bilinear_jvp(correlate, conv_equations.correlate, primals, tangents, cfg)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def input_grad(g, w, x_shape, cfg):
    """∂L/∂a = (∂F/∂a)ᵀ δ: ``g (N,H_out,W_out,C_out)``, ``w`` -> ``x_shape``."""
    return _raw(INPUT_GRAD, cfg, tuple(x_shape[1:]))(g, w)


@input_grad.defjvp
def _input_grad_jvp(x_shape, cfg, primals, tangents):
    return _bilinear_jvp(input_grad, conv_equations.input_grad, primals, tangents, x_shape, cfg)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def weight_grad(x, g, w_shape, cfg):
    """∂L/∂W = δ ⋆ a: ``x (N,H,W,C_in)``, ``g (N,H_out,W_out,C_out)`` -> ``w_shape``."""
    return _raw(WEIGHT_GRAD, cfg, tuple(w_shape))(x, g)


@weight_grad.defjvp
def _weight_grad_jvp(w_shape, cfg, primals, tangents):
    return _bilinear_jvp(weight_grad, conv_equations.weight_grad, primals, tangents, w_shape, cfg)


# --- when a case can take them -----------------------------------------------------------------

def _supported(kind: int, x_shape: Sequence[int], w_shape: Sequence[int], cfg, dtype) -> bool:
    if jnp.dtype(dtype) != jnp.dtype(jnp.float32) or len(x_shape) != 4 or len(w_shape) != 4:
        return False
    if min(x_shape) < 1 or min(w_shape) < 1 or min(p for pad in cfg.padding for p in pad) < 0:
        return False
    if not build.active():
        return False
    oh, ow = out_hw(x_shape, w_shape, cfg)
    if oh < 1 or ow < 1:
        return False
    return _check(kind, tuple(x_shape), tuple(w_shape), oh, ow, cfg)


@functools.lru_cache(maxsize=4096)
def _check(kind, x_shape, w_shape, oh, ow, cfg) -> bool:
    """Whether oneDNN builds this primitive (it is then cached for the run)."""
    (pt, pb), (pl, pr) = cfg.padding
    params = (ctypes.c_int64 * 19)(kind, *x_shape, w_shape[0], w_shape[1], w_shape[3], oh, ow,
                                   *cfg.stride, *cfg.dilation, pt, pb, pl, pr, cfg.groups)
    msg = ctypes.create_string_buffer(256)
    return bool(build.library().handle.JbpDnnlConvSupported(params, msg, 256))


def _pointwise(w_shape) -> bool:
    return tuple(w_shape[:2]) == (1, 1)


# The table's predicates (jbp._conv_kernels): {} (no parameters) where oneDNN is chosen, else
# None. It is chosen where scripts/bench_onednn.py measured it faster (docs/onednn.md, "Where
# oneDNN wins, per shape"): every k×k kernel (k > 1), except a strided input gradient of one
# group (jbp's phase form) and 1×1 kernels (jbp's pointwise matmuls). A strided *grouped* input
# gradient has no phase form (its XLA convolution ran 66-350× slower: docs/onednn.md,
# "Depthwise and pointwise convolutions"), so it stays on oneDNN.

def select_forward(x_shape, w_shape, cfg, dtype) -> Optional[dict]:
    """float32 k×k kernels (k > 1): oneDNN's JIT kernels, faster than XLA's forms."""
    ok = not _pointwise(w_shape) and _supported(FORWARD, x_shape, w_shape, cfg, dtype)
    return {} if ok else None


def select_input_grad(x_shape, w_shape, cfg, dtype) -> Optional[dict]:
    """float32 k×k kernels (k > 1) at stride 1, or grouped: oneDNN's JIT kernels, faster than
    XLA's forms."""
    ok = (not _pointwise(w_shape) and (tuple(cfg.stride) == (1, 1) or cfg.groups > 1)
          and _supported(INPUT_GRAD, x_shape, w_shape, cfg, dtype))
    return {} if ok else None


def select_weight_grad(x_shape, w_shape, cfg, dtype) -> Optional[dict]:
    """float32 k×k kernels (k > 1): oneDNN's JIT kernels, faster than XLA's forms, except
    narrow inputs summed over many products, where oneDNN rounds worse (tuning)."""
    ok = (not _pointwise(w_shape) and not _narrow_long_sum(x_shape, w_shape, cfg)
          and _supported(WEIGHT_GRAD, x_shape, w_shape, cfg, dtype))
    return {} if ok else None


def _narrow_long_sum(x_shape, w_shape, cfg) -> bool:
    oh, ow = out_hw(x_shape, w_shape, cfg)
    return (w_shape[2] * cfg.groups < tuning.ONEDNN_WEIGHT_GRAD_MIN_CIN
            and x_shape[0] * oh * ow >= tuning.ONEDNN_WEIGHT_GRAD_MAX_PRODUCTS)


def select(x_shape, w_shape, cfg, dtype) -> Optional[dict]:
    """{} if all three equations of this case can run on oneDNN (whether or not it wins)."""
    ok = all(_supported(kind, x_shape, w_shape, cfg, dtype)
             for kind in (FORWARD, INPUT_GRAD, WEIGHT_GRAD))
    return {} if ok else None

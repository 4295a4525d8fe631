"""2-D transposed convolution (PyTorch's ``conv_transpose2d``) with a hand-written backward.

Layout: images NHWC, kernels ``(KH, KW, C_in, C_out // groups)``: PyTorch's
``(C_in, C_out // groups, KH, KW)`` transposed by ``(2, 3, 0, 1)``. With stride ``s``,
dilation ``d``, padding ``p``, output padding ``o`` and ``δ = ∂L/∂z`` (EQUATIONS.md,
"Transposed convolution")::

    H_out = (H − 1)·s − 2p + (KH − 1)·d + o + 1
    z[n, h·s+i·d−p, w·s+j·d−p, g·C_out/G + k] += Σ_c a[n,h,w,c] · W[i,j,c,k]   (c in group g)
    ∂L/∂a[n,h,w,c] = Σ_{i,j,k} δ[n, h·s+i·d−p, w·s+j·d−p, k] · W[i,j,c,k]        (δ ⋆ W)
    ∂L/∂W[i,j,c,k] = Σ_{n,h,w} a[n,h,w,c] · δ[n, h·s+i·d−p, w·s+j·d−p, k]        (a ⋆ δ)
    ∂L/∂b[k]       = Σ_{n,h,w} δ[n,h,w,k]

The transposed convolution *is* conv2d's input gradient (the document's "convolution with
rotated filters") of a convolution ``C`` from ``(N, H_out, W_out, C_out)`` to ``(N, H, W, C_in)``
with HWIO kernel ``W_C = W.transpose(0, 1, 3, 2)`` (``(KH, KW, C_out // G, C_in)``), stride ``s``,
padding ``p``, dilation ``d``, ``G`` groups; ``o`` is the bottom/right cells of ``C``'s padded
input past its last window. Read the other way, the backward is ``C`` itself:

- ``∂L/∂a`` = ``C``'s forward, the correlation ``δ ⋆ W_C`` (cropped to ``H × W`` when
  ``d > s`` lets ``o ≥ s`` add one window);
- ``∂L/∂W`` = ``C``'s weight gradient with ``δ`` as ``C``'s input and ``a`` as ``C``'s error signal.

What runs: all three equations go through ``jbp._conv_kernels.dispatch`` as ``C``'s
``"input_grad"`` (the forward), ``"forward"`` and ``"weight_grad"`` (the backward): on CPU the
table's forms where their predicates choose ``C``'s shape — a stride-2 2×2 up-convolution's
forward is the ``phases`` form's four matmuls; oneDNN's backward-data kernel, which is what
oneDNN's own deconvolution primitive runs for float32 on CPU, where it wins — and one XLA
convolution elsewhere. The forward takes no ``rule_only`` form, so the rule and
``jbp.autodiff`` compute it identically, bit for bit.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from jax import lax

from jbp import _checks, _probes
from jbp._conv_kernels import dispatch
from jbp._registry import layer
from jbp._rule import call_probed, cast_like, manual_rule
from jbp.layers import conv as _conv
from jbp.layers import conv_equations as E


class TransposeConfig(NamedTuple):
    """Static configuration: ``conv`` is the convolution ``C`` this layer transposes (padding
    ``((p_h, p_h), (p_w, p_w))``; the output padding ``o`` is what ``C``'s padded input has past
    its last window), ``out_hw`` the output size ``(H_out, W_out)``."""

    conv: E.ConvConfig
    out_hw: Tuple[int, int]


def _conv_kernel(w):
    """W_C[i, j, k, c] = W[i, j, c, k]: the HWIO kernel of the convolution C."""
    return w.transpose(0, 1, 3, 2)


def _forward(x, w, b, cfg: TransposeConfig):
    """z = C's input gradient of a: the scatter of each a[n,h,w,:] · W over the output."""
    n, _, _, _ = x.shape
    z_shape = (n, *cfg.out_hw, w.shape[3] * cfg.conv.groups)
    w_c = _conv_kernel(w)
    # C's input gradient of an error signal of C's output size: where d > s lets o >= s add one
    # window to C, a's missing row/column of that window is a zero error signal
    z = dispatch("input_grad", (_padded_to_windows(x, z_shape, w_c.shape, cfg), w_c),
                 (z_shape, cfg.conv))
    return z if b is None else z + b


def _fwd(x, w, b, cfg: TransposeConfig):
    # Residuals: the input a and the kernel W; the bias only for its dtype/None-ness.
    return _forward(x, w, b, cfg), (x, w, b)


def _bwd(cfg: TransposeConfig, res, g):
    x, w, b = res
    w_c = _conv_kernel(w)
    # ∂L/∂a = δ ⋆ W_C: C's forward (one extra window cropped when o >= s, possible when d > s)
    dx = dispatch("forward", (g, w_c), (cfg.conv,))[:, :x.shape[1], :x.shape[2]]
    # ∂L/∂W[i,j,c,k] = Σ_{n,h,w} a[n,h,w,c] · δ[n, h·s+i·d−p, w·s+j·d−p, k]: C's weight gradient,
    # a zero-padded to C's output size where C has that extra window (its error signal is 0)
    a = _padded_to_windows(x, g.shape, w_c.shape, cfg)
    dw = _conv_kernel(dispatch("weight_grad", (g, a), (w_c.shape, cfg.conv)))
    # ∂L/∂b[k] = Σ_{n,h,w} δ[n,h,w,k]
    db = None if b is None else E.channel_sum(g)
    return cast_like(dx, x), cast_like(dw, w), cast_like(db, b)


# --- per-example quantities from the same residuals and δ (module docstring) -------------------

def _padded_to_windows(x, z_shape, w_c_shape, cfg: TransposeConfig):
    """a zero-padded to C's output size over an input of ``z_shape``: one more row/column where
    d > s lets o >= s give C an extra window, whose error signal is 0."""
    extra = [c_size - a_size for c_size, a_size in
             zip(E.out_hw(z_shape, w_c_shape, cfg.conv), x.shape[1:3])]
    return jnp.pad(x, ((0, 0), (0, extra[0]), (0, extra[1]), (0, 0))) if max(extra) else x


def per_example_weight_grad(x, g, w_shape, cfg: TransposeConfig):
    """∂ℓ_n/∂W for every n, shape (N, KH, KW, C_in, C_out // groups): the backward's
    weight-gradient equation (C's weight gradient) on each example alone, vmapped over n."""
    w_c_shape = (w_shape[0], w_shape[1], w_shape[3], w_shape[2])
    a = _padded_to_windows(x, g.shape, w_c_shape, cfg)
    return jax.vmap(lambda gn, an: _conv_kernel(
        E.weight_grad(gn[None], an[None], w_c_shape, cfg.conv)))(g, a)


def patches(x, w_shape, cfg: TransposeConfig):
    """p_{n,t}, shape (N, T, KH·KW·C_in), T = H_out·W_out, flattened (KH, KW, C_in) like W's rows:
    ``z[n,t,k] = Σ_r p[n,t,r] W_flat[r,k]`` (groups = 1). p[n, (u, v), (i, j, c)] = a[n,h,w,c]
    where u = h·s+i·d−p, v = w·s+j·d−p, 0 where no (h, w) lands there: the input dilated by s
    (s − 1 zeros between rows/columns), padded by (K−1)·d − p on top/left and (K−1)·d − p + o
    on the bottom/right (negative: cropped), read by conv2d's patches with stride 1, dilation d,
    the kernel taps in reverse order."""
    n, h, wd, cin = x.shape
    kh, kw = w_shape[:2]
    (sh, sw), (dh, dw) = cfg.conv.stride, cfg.conv.dilation
    pads = []
    for k, d, s, p, size, out in ((kh, dh, sh, cfg.conv.padding[0][0], h, cfg.out_hw[0]),
                                  (kw, dw, sw, cfg.conv.padding[1][0], wd, cfg.out_hw[1])):
        lo = (k - 1) * d - p
        pads.append((lo, out + (k - 1) * d - lo - (size - 1) * s - 1, s - 1))
    a = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0)))
    p = _conv.patches(a, (kh, kw, cin, 1), E.ConvConfig((1, 1), ((0, 0), (0, 0)), (dh, dw), 1))
    return p.reshape(n, -1, kh, kw, cin)[:, :, ::-1, ::-1].reshape(n, -1, kh * kw * cin)


def kfac_shapes(w_shape, groups):
    """The shapes of the ``(A, G)`` factors for a kernel (KH, KW, C_in, C_out // groups): W_g =
    W[:, :, group g's input channels] is a (KH·KW·C_in/G, C_out/G) matrix per group."""
    kh, kw, cin, cout_g = w_shape
    rows = kh * kw * cin // groups
    if groups == 1:
        return (rows, rows), (cout_g, cout_g)
    return (groups, rows, rows), (groups, cout_g, cout_g)


def _quantities(cfg: TransposeConfig, res, g, names):
    """The per-example quantities of W and b (EQUATIONS.md, "Per-example quantities"):
    per-example gradients (vmapped weight-gradient equation) for ``batch_grad``, ``batch_l2``,
    ``sum_grad_squared``; KFC factors from the patches of :func:`patches` for ``kfac``."""
    x, w, b = res
    _, names_w, names_b = names
    qw, qb = {}, {}
    if names_w:
        materialised = [q for q in names_w if q != "kfac"]
        if materialised:
            grad_n = per_example_weight_grad(x, g, w.shape, cfg)
            qw.update(_probes.from_per_example(grad_n, materialised, w.dtype))
        if "kfac" in names_w:
            qw["kfac"] = tuple(cast_like(f, w) for f in _conv.kfac_factors(
                patches(x, w.shape, cfg), g, w.shape[0] * w.shape[1], cfg.conv.groups))
    if names_b:
        _probes.check_kfac(names_b, "a bias")
        qb = _probes.from_per_example(jnp.sum(g, axis=(1, 2)), names_b, b.dtype)
    return None, qw or None, qb or None


_conv_transpose_rule = manual_rule("conv_transpose2d", _forward, _fwd, _bwd, num_args=4,
                                   quantities=_quantities)


def _non_negative_pair(name, value):
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    try:
        pair = tuple(int(v) for v in value)
        assert len(pair) == 2 and all(isinstance(v, numbers.Integral)
                                      and not isinstance(v, bool) for v in value)
    except (TypeError, ValueError, AssertionError):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
    if min(pair) < 0:
        raise ValueError(f"{name}: every entry must be >= 0, got {value!r}")
    return pair


def conv_transpose_config(x, w, b=None, *, stride=1, padding=0, output_padding=0, dilation=1,
                          groups=1) -> TransposeConfig:
    """Check the arguments of :func:`conv_transpose2d` and resolve them."""
    _checks.require_rank("x", x, 4, "(N, H, W, C_in) in NHWC layout")
    _checks.require_float("x", x)
    _checks.require_rank("w", w, 4, "(KH, KW, C_in, C_out // groups)")
    if w.dtype != x.dtype:
        raise TypeError(f"w: dtype {w.dtype} differs from x dtype {x.dtype}; cast one of them")
    stride = _checks.pair("stride", stride)
    dilation = _checks.pair("dilation", dilation)
    padding = _non_negative_pair("padding", padding)
    output_padding = _non_negative_pair("output_padding", output_padding)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    n, h, wd, cin = x.shape
    kh, kw, w_cin, cout_g = w.shape
    if w_cin != cin:
        hint = ""
        if kh == cin and w_cin != cin:
            hint = (" w looks like PyTorch's (C_in, C_out // groups, KH, KW) layout; pass "
                    "w.transpose(2, 3, 0, 1)")
        raise ValueError(f"w: kernel input channels w.shape[2]={w_cin} must equal C_in={cin} "
                         f"(w.shape={tuple(w.shape)} is (KH, KW, C_in, C_out // groups), "
                         f"x.shape={tuple(x.shape)}).{hint}")
    if cin == 0 or cout_g == 0:
        raise ValueError(f"x, w: a transposed convolution needs C_in >= 1 and C_out >= 1, got "
                         f"x.shape={tuple(x.shape)}, w.shape={tuple(w.shape)}")
    if cin % groups:
        raise ValueError(f"groups: x has C_in={cin} channels, not divisible by groups={groups}")
    if b is not None:
        _checks.require_array("b", b)
        if tuple(b.shape) != (cout_g * groups,):
            raise ValueError(f"b: expected shape ({cout_g * groups},) (C_out), got "
                             f"{tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise TypeError(f"b: dtype {b.dtype} differs from x dtype {x.dtype}")
    out = []
    for axis, what in ((0, "height"), (1, "width")):
        s, d, p, o = stride[axis], dilation[axis], padding[axis], output_padding[axis]
        if o >= max(s, d):
            raise ValueError(f"output_padding: {output_padding} along the {what} must be smaller "
                             f"than the stride or the dilation ({s}, {d}), as in PyTorch: it "
                             f"only picks one of the input sizes a strided convolution maps "
                             f"to the same output")
        k_eff = ((kh, kw)[axis] - 1) * d + 1
        size = (((h, wd)[axis]) - 1) * s - 2 * p + k_eff + o
        if size < 1 or (h, wd)[axis] < 1:
            raise ValueError(f"padding: the output {what} (H - 1)·s - 2p + (K - 1)·d + o + 1 = "
                             f"{size} is not positive (x.shape={tuple(x.shape)}, kernel "
                             f"{(kh, kw)}, stride {stride}, padding {padding})")
        out.append(size)
    conv = E.ConvConfig(stride, ((padding[0], padding[0]), (padding[1], padding[1])), dilation,
                        groups)
    return TransposeConfig(conv, tuple(out))


@layer(_conv_transpose_rule)
def conv_transpose2d(rule, x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None, *,
                     stride=1, padding=0, output_padding=0, dilation=1,
                     groups=1) -> jax.Array:
    """Transposed convolution (fractionally strided convolution), PyTorch's semantics.

    Args:
      x: input ``a``, shape ``(N, H, W, C_in)``.
      w: kernel ``W``, shape ``(KH, KW, C_in, C_out // groups)`` (PyTorch's weight
        ``(C_in, C_out // groups, KH, KW)`` transposed by ``(2, 3, 0, 1)``).
      b: optional bias ``(C_out,)``.
      stride, padding, output_padding, dilation: int or ``(h, w)``, as PyTorch: ``padding``
        crops ``p`` cells from each side of the full output, ``output_padding`` (smaller than
        the stride or the dilation) adds cells at the bottom/right.
      groups: ``C_in`` and ``C_out`` split into this many independent groups.

    Returns:
      ``z`` of shape ``(N, H_out, W_out, C_out)``, ``H_out = (H − 1)·s − 2p + (KH − 1)·d + o + 1``.

    Backward (hand-written in ``jbp.layers.conv_transpose``): ``∂L/∂a = δ ⋆ W`` (a strided
    convolution: this layer's convolution read the other way), ``∂L/∂W = a ⋆ δ``,
    ``∂L/∂b = Σ δ``. Residuals: ``x``, ``w`` (``b`` only for its dtype).
    ``w``/``b`` wrapped by ``jbp.quantities`` (``jbp._probes.Probed``): the backward also gives
    their per-example quantities (``_quantities``).
    """
    probed_w = w
    w, probes_w = _probes.unwrap(w)
    b, probes_b = _probes.unwrap(b)
    cfg = conv_transpose_config(x, w, b, stride=stride, padding=padding,
                                output_padding=output_padding, dilation=dilation, groups=groups)
    _probes.kfac_shapes(probed_w, *kfac_shapes(w.shape, groups))
    return call_probed(rule, (None, probes_w, probes_b), x, w, b, cfg)

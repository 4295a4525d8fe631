"""The grid's PyTorch references: each layer of :mod:`jbp.testing.grid` in ``torch.nn.functional``.

Every function takes float64 torch tensors in jbp's layouts (NHWC images, HWIO kernels) and
converts to PyTorch's NCHW / OIHW inside, so a :class:`~jbp.testing.grid.Case` can call it on the
same arrays it gives jbp. Padding is resolved by jbp's own config (``conv_config``,
``pool_config``) and applied with ``F.pad``, so ``"SAME"``'s asymmetric padding matches.
:func:`torch_vjp` runs one of them under autograd. torch is imported only when one runs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jbp.layers import conv as _conv
from jbp.layers import pooling as _pooling


def _torch():
    import torch  # noqa: PLC0415 (optional dependency)
    return torch, torch.nn.functional


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1)


def conv2d(x, w, b=None, *, kw):
    """``jbp.conv2d(x, w, b, **kw)``: NHWC ``x``, HWIO ``w`` -> NHWC."""
    _, F = _torch()
    cfg = _conv.conv_config(jnp.zeros(tuple(x.shape)), jnp.zeros(tuple(w.shape)), **kw)
    (t, bo), (l, r) = cfg.padding
    xp = F.pad(_nchw(x), (l, r, t, bo))
    return _nhwc(F.conv2d(xp, w.permute(3, 2, 0, 1), b, stride=cfg.stride,
                          dilation=cfg.dilation, groups=cfg.groups))


def dense(x, w, b=None):
    out = x @ w
    return out if b is None else out + b


def flatten(x):
    return x.reshape(x.shape[0], -1)


def activation(name, **kw):
    """The activation ``name`` (``relu``, ``leaky_relu`` with ``negative_slope``, ``sigmoid``,
    ``tanh``, ``softmax``/``log_softmax`` with ``axis``, ``silu``, ``relu6``, ``hard_sigmoid``,
    ``hard_swish``) as a function of one tensor."""
    def run(x):
        torch, F = _torch()
        fns = {"relu": F.relu, "leaky_relu": F.leaky_relu, "sigmoid": torch.sigmoid,
               "tanh": torch.tanh, "softmax": F.softmax, "log_softmax": F.log_softmax,
               "silu": F.silu, "relu6": F.relu6,
               # F.hardsigmoid's CPU backward multiplies by float32's 1/6 even for float64
               # (relative error 3e-8), so the twin is the definition under autograd.
               "hard_sigmoid": lambda z: F.relu6(z + 3) / 6,
               "hard_swish": F.hardswish}
        if name in ("softmax", "log_softmax"):
            return fns[name](x, dim=kw.get("axis", -1))
        return fns[name](x, **kw)
    return run


def channel_scale(x, s):
    """``jbp.channel_scale``: ``x * s`` with ``s`` (N, C) broadcast over H, W (NHWC)."""
    return x * s[:, None, None, :]


def pool(x, *, kind, window, stride, padding, count_include_pad=True):
    """``jbp.max_pool`` (``kind="max"``) or ``jbp.avg_pool``; excluded padding only where it is
    symmetric (PyTorch's native padding)."""
    _, F = _torch()
    cfg = _pooling.pool_config(jnp.zeros(tuple(x.shape)), window, stride, padding)
    (t, b), (l, r) = cfg.padding
    xc = _nchw(x)
    if kind == "max":
        out = F.max_pool2d(F.pad(xc, (l, r, t, b), value=-float("inf")), cfg.window, cfg.stride)
    elif count_include_pad:
        out = F.avg_pool2d(F.pad(xc, (l, r, t, b)), cfg.window, cfg.stride)
    else:   # symmetric padding only (PyTorch's native padding)
        out = F.avg_pool2d(xc, cfg.window, cfg.stride, padding=(t, l), count_include_pad=False)
    return _nhwc(out)


def global_avg_pool(x):
    return x.mean(dim=(1, 2))


def batch_norm(x, gamma, beta, *, train, mean, var):
    """``jbp.batch_norm`` with running statistics ``mean``/``var`` (numpy), momentum 0.1 in
    PyTorch's convention (jbp's 0.9), eps 1e-5; NHWC images or (N, C) features."""
    torch, F = _torch()
    images = x.ndim == 4
    out = F.batch_norm(_nchw(x) if images else x, torch.tensor(mean), torch.tensor(var),
                       gamma, beta, training=train, momentum=0.1, eps=1e-5)
    return _nhwc(out) if images else out


def cross_entropy_int(z, *, labels, smoothing):
    """Mean softmax cross-entropy of logits ``z`` against fixed integer ``labels`` (numpy)."""
    torch, F = _torch()
    return F.cross_entropy(z, torch.tensor(labels), label_smoothing=smoothing)


def cross_entropy_soft(z, y, *, smoothing):
    _, F = _torch()
    return F.cross_entropy(z, y, label_smoothing=smoothing)


def loss(name):
    """``mse`` or ``sigmoid_binary_cross_entropy`` (mean over all entries)."""
    def run(a, b):
        _, F = _torch()
        return {"mse": F.mse_loss,
                "sigmoid_binary_cross_entropy": F.binary_cross_entropy_with_logits}[name](a, b)
    return run


def native(name, x, **kw):
    """``F.<name>(x, **kw)`` with PyTorch's own options (ceil_mode, dilation, output_size...)."""
    _, F = _torch()
    return _nhwc(getattr(F, name)(_nchw(x), **kw))


def conv2d_padding_mode(x, w, b, *, stride, padding, padding_mode):
    """``torch.nn.Conv2d(..., padding_mode=...)``'s own padding, then its convolution."""
    torch, _ = _torch()
    conv = torch.nn.Conv2d(w.shape[2], w.shape[3], tuple(w.shape[:2]), stride=stride,
                           padding=padding, padding_mode=padding_mode).double()
    return _nhwc(conv._conv_forward(_nchw(x), w.permute(3, 2, 0, 1), b))


def pad(x, *, padding, mode):
    """``F.pad(x, (left, right, top, bottom), mode)``."""
    _, F = _torch()
    (t, b), (l, r) = padding
    return _nhwc(F.pad(_nchw(x), (l, r, t, b), mode=mode))


def max_unpool(x, *, indices, window, stride, output_size):
    """``F.max_unpool2d`` at fixed (numpy, NHWC) indices."""
    torch, F = _torch()
    ti = torch.tensor(np.asarray(indices).transpose(0, 3, 1, 2), dtype=torch.int64)
    return _nhwc(F.max_unpool2d(_nchw(x), ti, window, stride, output_size=output_size))


def linear(x, w, b):
    """``F.linear`` over any leading axes (PyTorch's weight is jbp's transposed)."""
    _, F = _torch()
    return F.linear(x, w.T, b)


def cross_entropy_options(z, *, labels, weight=None, ignore_index=-100, reduction="mean"):
    """``F.cross_entropy`` with class weights, an ignored label and a reduction."""
    torch, F = _torch()
    w = None if weight is None else torch.tensor(np.asarray(weight))
    return F.cross_entropy(z, torch.tensor(labels), weight=w, ignore_index=ignore_index,
                           reduction=reduction)


def bce_options(z, y, *, weight, pos_weight, reduction):
    """``F.binary_cross_entropy_with_logits`` with element and positive weights."""
    torch, F = _torch()
    return F.binary_cross_entropy_with_logits(z, y, weight=torch.tensor(weight),
                                              pos_weight=torch.tensor(pos_weight),
                                              reduction=reduction)


def mse_options(a, b, *, reduction):
    _, F = _torch()
    return F.mse_loss(a, b, reduction=reduction)


def torch_vjp(case, args, cotangent):
    """Forward and gradients of ``case.torch`` by PyTorch autograd in float64: ``(out, grads)`` as
    numpy arrays (zeros for an argument the output does not depend on)."""
    torch, _ = _torch()
    tensors = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]
    out = case.torch(*tensors)
    out.backward(torch.tensor(np.asarray(cotangent, np.float64)))
    return out.detach().numpy(), [t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
                                  for t in tensors]


# --- segmentation's layers (jbp.testing.segmentation_grid) --------------------------------------

def conv_transpose2d(x, w, b=None, **kw):
    """``F.conv_transpose2d``; jbp's kernel (KH, KW, C_in, C_out/G) is PyTorch's transposed."""
    _, F = _torch()
    return _nhwc(F.conv_transpose2d(_nchw(x), w.permute(2, 3, 0, 1), b, **kw))


def interpolate(x, **kw):
    """``F.interpolate`` (``size`` or ``scale_factor``, ``mode``, ``align_corners``)."""
    _, F = _torch()
    return _nhwc(F.interpolate(_nchw(x), **kw))


def concat(*xs):
    torch, _ = _torch()
    return torch.cat(xs, dim=-1)


def pad_constant(x, *, padding, value):
    """``F.pad(x, (left, right, top, bottom), value=value)``; negative pads crop."""
    _, F = _torch()
    (t, b), (l, r) = padding
    return _nhwc(F.pad(_nchw(x), (l, r, t, b), value=value))


def cross_entropy_pixels(z, *, labels, **kw):
    """``F.cross_entropy`` of (N, K, H, W) logits against (N, H, W) labels (per pixel)."""
    torch, F = _torch()
    if kw.get("weight") is not None:
        kw["weight"] = torch.tensor(np.asarray(kw["weight"]))
    return F.cross_entropy(_nchw(z), torch.tensor(labels), **kw)


def soft_dice(z, *, labels, smooth, ignore_index=None):
    """``1 − mean_k (2 Σ p y + ε) / (Σ p + Σ y + ε)`` written in torch from the definition."""
    torch, F = _torch()
    k = z.shape[-1]
    keep = np.ones(labels.shape, bool) if ignore_index is None else labels != ignore_index
    y = F.one_hot(torch.tensor(np.where(keep, labels, 0)), k).double()
    mask = torch.tensor(keep).double()[..., None]
    p = F.softmax(z, dim=-1)
    axes = tuple(range(z.ndim - 1))
    intersection, union = (mask * p * y).sum(axes), (mask * (p + y)).sum(axes) + smooth
    return 1 - ((2 * intersection + smooth) / union).mean()

"""Parameter initialisers: He, LeCun and Glorot for convolution kernels and dense weights.

Plain functions of a PRNG key returning arrays, or the ``{"w", "b"}`` dicts that jbp's layers
take directly (the models in ``jbp.models`` are built from these)::

    k1, k2 = jax.random.split(key)
    params = {"conv": jbp.init.conv(k1, 3, 3, 1, 8),                  # HWIO, He normal, b = 0
              "fc": jbp.init.dense(k2, 14 * 14 * 8, 10, scheme="glorot_uniform")}
    h = jbp.conv2d(x, params["conv"]["w"], params["conv"]["b"])

Fans of a shape: an HWIO kernel ``(KH, KW, C_in // groups, C_out)`` has
``fan_in = KH·KW·C_in/groups`` and ``fan_out = KH·KW·C_out``; dense weights ``(in, out)`` have
``fan_in = in``, ``fan_out = out``. Then::

    he_normal:       W ~ N(0, 2 / fan_in)                 (ReLU layers; He et al., 2015)
    lecun_normal:    W ~ N(0, 1 / fan_in)                 (jbp's models: the classifier layer)
    glorot_normal:   W ~ N(0, 2 / (fan_in + fan_out))     (Glorot & Bengio, 2010)
    glorot_uniform:  W ~ U(−r, r),  r = √(6 / (fan_in + fan_out))

The normals are not truncated (``jax.nn.initializers.he_normal`` truncates at 2σ by default;
``jax.nn.initializers.variance_scaling(2.0, "fan_in", "normal")`` is this ``he_normal``).
Biases start at 0; batch norm at ``γ = 1, β = 0`` with running mean 0 and variance 1.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp

SCHEMES = ("he_normal", "lecun_normal", "glorot_normal", "glorot_uniform")


def fans(shape: Sequence[int]) -> Tuple[int, int]:
    """``(fan_in, fan_out)`` of dense ``(in, out)`` weights or an HWIO kernel ``(KH, KW, I, O)``."""
    shape = tuple(shape)
    if len(shape) < 2 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"shape: expected (in, out) or (KH, KW, C_in, C_out) of positive ints, "
                         f"got {shape}")
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


# One compiled program per (shape, dtype, scale) instead of eager dispatch of each operation:
# a model's init then compiles a program per distinct layer shape, not three or four (the
# draw, the scaling, the zero bias). ``optimization_barrier`` keeps XLA from folding the scale
# into the draw's own arithmetic, so the compiled draw is bit for bit the eager one
# (tests/test_init.py compares both on every model). ``_JIT = False``: eager, as before.
_JIT = True


def _scaled_normal_eager(key, shape, dtype, scale):
    return jax.random.normal(key, shape, dtype) * scale


def _scaled_uniform_eager(key, shape, dtype, low, high, scale):
    return jax.random.uniform(key, shape, dtype, low, high) * scale


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scaled_normal_jit(key, shape, dtype, scale):
    return jax.lax.optimization_barrier(jax.random.normal(key, shape, dtype)) * scale


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _scaled_uniform_jit(key, shape, dtype, low, high, scale):
    return jax.lax.optimization_barrier(jax.random.uniform(key, shape, dtype, low, high)) * scale


def scaled_normal(key, shape, dtype, scale: float) -> jax.Array:
    """``N(0, 1)`` draws of ``shape`` times ``scale`` (a Python float), compiled once per
    ``(shape, dtype, scale)``; the same bits as ``jax.random.normal(key, shape, dtype) * scale``."""
    fn = _scaled_normal_jit if _JIT else _scaled_normal_eager
    return fn(key, tuple(shape), jnp.dtype(dtype), float(scale))


def scaled_uniform(key, shape, dtype, low: float, high: float, scale: float = 1.0) -> jax.Array:
    """``U(low, high)`` draws of ``shape`` times ``scale``, compiled once per arguments; the same
    bits as ``jax.random.uniform(key, shape, dtype, low, high) * scale``."""
    fn = _scaled_uniform_jit if _JIT else _scaled_uniform_eager
    return fn(key, tuple(shape), jnp.dtype(dtype), float(low), float(high), float(scale))


def he_normal(key, shape, dtype=jnp.float32) -> jax.Array:
    """``N(0, 2 / fan_in)``."""
    fan_in, _ = fans(shape)
    return scaled_normal(key, shape, dtype, math.sqrt(2.0 / fan_in))


def lecun_normal(key, shape, dtype=jnp.float32) -> jax.Array:
    """``N(0, 1 / fan_in)``."""
    fan_in, _ = fans(shape)
    return scaled_normal(key, shape, dtype, math.sqrt(1.0 / fan_in))


def glorot_normal(key, shape, dtype=jnp.float32) -> jax.Array:
    """``N(0, 2 / (fan_in + fan_out))``."""
    fan_in, fan_out = fans(shape)
    return scaled_normal(key, shape, dtype, math.sqrt(2.0 / (fan_in + fan_out)))


def glorot_uniform(key, shape, dtype=jnp.float32) -> jax.Array:
    """``U(−r, r)`` with ``r = √(6 / (fan_in + fan_out))``."""
    fan_in, fan_out = fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return scaled_uniform(key, shape, dtype, -1.0, 1.0, limit)


def weights(key, shape, scheme: str = "he_normal", dtype=jnp.float32) -> jax.Array:
    """An array of ``shape`` drawn by the initialiser named ``scheme`` (one of ``SCHEMES``)."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    return globals()[scheme](key, shape, dtype)


def conv(key, kh: int, kw: int, cin: int, cout: int, *, bias: bool = True,
         scheme: str = "he_normal", dtype=jnp.float32) -> dict:
    """``{"w": (kh, kw, cin, cout) HWIO kernel, "b": zeros (cout,)}`` (no ``"b"`` if not
    ``bias``). For ``groups > 1`` pass ``cin = C_in // groups``, the kernel's input channels."""
    w = weights(key, (kh, kw, cin, cout), scheme, dtype)
    return {"w": w, "b": jnp.zeros((cout,), dtype)} if bias else {"w": w}


def dense(key, fan_in: int, fan_out: int, *, bias: bool = True, scheme: str = "he_normal",
          dtype=jnp.float32) -> dict:
    """``{"w": (fan_in, fan_out) weights, "b": zeros (fan_out,)}`` (no ``"b"`` if not ``bias``)."""
    w = weights(key, (fan_in, fan_out), scheme, dtype)
    return {"w": w, "b": jnp.zeros((fan_out,), dtype)} if bias else {"w": w}


def batch_norm(channels: int, dtype=jnp.float32) -> tuple:
    """``(params, state)`` for :func:`jbp.batch_norm`: ``γ = 1, β = 0``; running mean 0,
    running variance 1 (float32)."""
    return ({"gamma": jnp.ones((channels,), dtype), "beta": jnp.zeros((channels,), dtype)},
            {"mean": jnp.zeros((channels,), jnp.float32),
             "var": jnp.ones((channels,), jnp.float32)})

"""Parameter initialisers shared by the models (plain functions returning dicts of arrays)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def conv(key, kh, kw, cin, cout, *, bias=True, dtype=jnp.float32):
    """He-normal HWIO kernel (std √(2 / fan_in), fan_in = KH·KW·C_in) and a zero bias."""
    w = jax.random.normal(key, (kh, kw, cin, cout), dtype) * math.sqrt(2.0 / (kh * kw * cin))
    return {"w": w, "b": jnp.zeros((cout,), dtype)} if bias else {"w": w}


def dense(key, fan_in, fan_out, *, gain=2.0, dtype=jnp.float32):
    """Normal (in, out) weights with std √(gain / fan_in) (He for ReLU layers; gain 1 for the
    classifier) and a zero bias."""
    w = jax.random.normal(key, (fan_in, fan_out), dtype) * math.sqrt(gain / fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), dtype)}


def batch_norm(c, dtype=jnp.float32):
    """(params, state): γ = 1, β = 0; running mean 0, running variance 1."""
    return ({"gamma": jnp.ones((c,), dtype), "beta": jnp.zeros((c,), dtype)},
            {"mean": jnp.zeros((c,), jnp.float32), "var": jnp.ones((c,), jnp.float32)})


def check_input(x, input_shape_hint: str):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x: expected a batch of NHWC images (N, H, W, C) {input_shape_hint}, "
                         f"got shape {getattr(x, 'shape', type(x).__name__)}")

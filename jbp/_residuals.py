"""Residual policies: what a rule keeps of its input for the backward.

A rule whose backward reads its input ``a`` (convolution: ``∂L/∂W = δ ⋆ a``; batch norm:
``x̂ = (a − μ)/σ``) may keep ``a`` compressed (the document's "quantized backpropagation";
Chen et al., ActNN, 2021) and decompress it in the backward:

- ``"exact"``: ``a`` itself.
- ``"bf16"``: ``ã = bf16(a)``, round to nearest: ``|ã − a| ≤ 2⁻⁸ |a|`` (8 significant bits).
- ``"int8"``: per channel ``c`` (the last axis) ``s_c = max|a[..., c]| / 127`` and
  ``q = round(a / s_c) ∈ [−127, 127]``, ``ã = q · s_c``: ``|ã − a| ≤ s_c / 2``.

Only the residual changes: the forward output is exact, and the backward's other inputs (``δ``,
``W``, ``μ``, ``σ``) are exact, so the gradient error is linear in ``ã − a`` (bounds in the tests).
"""

from __future__ import annotations

import jax.numpy as jnp

POLICIES = ("exact", "bf16", "int8")

#: Largest magnitude of the int8 code (symmetric: −127..127).
INT8_MAX = 127


def check(policy) -> str:
    if policy not in POLICIES:
        raise ValueError(f"residuals: expected one of {POLICIES}, got {policy!r}")
    return policy


def int8_scale(a):
    """``s_c = max_{n,h,w} |a[..., c]| / 127`` per channel (1 for an all-zero channel)."""
    amax = jnp.max(jnp.abs(a), axis=tuple(range(a.ndim - 1)))
    return jnp.where(amax > 0, amax / INT8_MAX, jnp.ones_like(amax))


def compress(a, policy: str):
    """The residual kept for ``a`` under ``policy`` (a pytree)."""
    if policy == "exact":
        return a
    if policy == "bf16":
        return a.astype(jnp.bfloat16)
    scale = int8_scale(a)
    q = jnp.clip(jnp.round(a / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def decompress(kept, policy: str, dtype):
    """``ã`` in ``dtype`` from what :func:`compress` kept."""
    if policy == "int8":
        q, scale = kept
        return (q.astype(dtype) * scale.astype(dtype)).astype(dtype)
    return kept.astype(dtype)                    # "exact", "bf16": a cast

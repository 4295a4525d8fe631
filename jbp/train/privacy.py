"""DP-SGD (Abadi et al., 2016) from jbp's rules: per-example clipping without per-example
gradients, Gaussian noise, and the privacy spent from Google's accountant.

One step on a batch of ``N`` examples, clip norm ``C`` and noise multiplier ``σ``::

    ‖∇ℓ_n‖²      from one backward with probes (jbp.quantities' batch_l2: dense ‖a_n‖²‖δ_n‖²,
                 conv Gram matrices or per-example gradients, summed over the parameter arrays)
    c_n          = min(1, C / ‖∇ℓ_n‖)
    Σ_n c_n ∇ℓ_n  a second backward of the same forward (one jax.vjp) seeded with c_n at example n's
                 loss: every rule then receives δ_n scaled by c_n; no per-example gradient is
                 stored, and the first backward's probes are not computed again (their
                 cotangents are unused, so XLA drops them)
    g̃            = (Σ_n c_n ∇ℓ_n + N(0, σ² C² I)) / N        (what the optimiser receives)

The noise is drawn from ``fold_in(state.rng, state.step)``. Per-example gradients are not
defined through training-mode batch norm (jbp.quantities): DP runs need a model without it.

Privacy (:func:`epsilon`): the RDP accountant of ``dp-accounting`` (the ``[dp]`` extra) for
``steps`` compositions of the Poisson-subsampled Gaussian mechanism with sampling rate
``batch_size / dataset_size``, converted to ``(ε, δ)``. jbp's batches are shuffled and of fixed
size, not Poisson-sampled: the reported ε is the one the DP-SGD literature reports for that
practice, not a proof for it.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jbp import quantities

#: δ at which :func:`epsilon` reports by default.
DELTA = 1e-5


def check(clip_norm, noise_multiplier, where: str = "train.dp") -> None:
    """DP settings out of range are a jbp error naming the setting (docs/errors.md)."""
    for name, value in (("clip_norm", clip_norm), ("noise_multiplier", noise_multiplier)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise ValueError(f"{where}.{name}: expected a finite number, got {value!r}")
    if clip_norm <= 0:
        raise ValueError(f"{where}.clip_norm: expected > 0 (the per-example gradient norm "
                         f"bound), got {clip_norm}")
    if noise_multiplier < 0:
        raise ValueError(f"{where}.noise_multiplier: expected >= 0 (noise std / clip_norm), "
                         f"got {noise_multiplier}")


def clipped_gradient(apply: Callable, per_example_loss: Callable, layers, params, model_state,
                     x, y, *, clip_norm: float, noise_multiplier: float, key=None, axis=None):
    """The DP-SGD gradient (module docstring).

    ``per_example_loss(logits, y) -> (N,)``: ``ℓ_n`` for every example. ``key``: the noise's
    (``None`` with ``noise_multiplier == 0``). Returns ``(loss, logits, new_model_state,
    grads, {"per_example_norms": (N,), "clipped_fraction": scalar})``, ``loss`` the mean of
    ``ℓ_n``.

    ``axis``: inside ``jax.shard_map`` over that mesh axis (the data-parallel step), the
    examples are this device's shard: clipping is per example, so each device clips its own,
    the rules ``psum`` the clipped sum over the devices (``jbp._rule``), and the noise (the same
    key everywhere) is added once to the global sum; the norms come back for the global batch.
    """
    n = x.shape[0] if axis is None else x.shape[0] * jax.lax.axis_size(axis)      # global N

    def losses(probed):
        logits, new_state = apply(probed, model_state, x, train=True, layers=layers)
        return per_example_loss(logits, y), (logits, new_state)

    per, backward, (logits, new_state) = jax.vjp(
        losses, quantities._vary(quantities._wrap(params, ("batch_l2",), x.shape[0]), axis),
        has_aux=True)
    (first,) = backward(jnp.ones_like(per))                 # δ_n = ∇ℓ_n at every rule
    sq_norms = sum(jax.tree.leaves(quantities._field(first, "batch_l2")))
    norms = jnp.sqrt(sq_norms)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, 1e-30))     # c_n
    (second,) = backward(jax.lax.stop_gradient(scale).astype(per.dtype))  # Σ_n c_n ∇ℓ_n
    clipped = quantities._values(second)
    if noise_multiplier:
        leaves, tree = jax.tree.flatten(clipped)
        keys = jax.random.split(key, len(leaves))
        leaves = [g + noise_multiplier * clip_norm * jax.random.normal(k, g.shape, g.dtype)
                  for g, k in zip(leaves, keys)]
        clipped = jax.tree.unflatten(tree, leaves)
    grads = jax.tree.map(lambda g: g / n, clipped)
    loss = jnp.mean(per)
    if axis is not None:                     # this device's examples -> the global batch's
        # every device's norms at its rows of a global (N,) vector, summed: replicated
        rows = jax.lax.axis_index(axis) * norms.shape[0]
        norms = jax.lax.psum(jax.lax.dynamic_update_slice(jnp.zeros((n,), norms.dtype), norms,
                                                          (rows,)), axis)
        loss = jax.lax.pmean(loss, axis)
    stats = {"per_example_norms": norms, "clipped_fraction": jnp.mean(norms > clip_norm)}
    return loss, logits, new_state, grads, stats


def epsilon(steps: int, batch_size: int, dataset_size: int, noise_multiplier: float,
            delta: float = DELTA) -> float:
    """ε of ``steps`` DP-SGD steps at ``delta`` from dp-accounting's RDP accountant (module
    docstring); ``inf`` without noise."""
    if noise_multiplier == 0:
        return math.inf
    try:
        import dp_accounting  # noqa: PLC0415  (the optional [dp] extra)
    except ImportError as err:
        raise ImportError("train.dp: the privacy accountant needs the optional extra: "
                          "pip install 'jbp[dp]' (dp-accounting)") from err
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(batch_size / dataset_size,
                                                dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, int(steps))
    return float(accountant.get_epsilon(delta))

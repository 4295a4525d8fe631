"""Second-order optimisers through the hand-written rules: K-FAC and damped Gauss-Newton
(Hessian-free), each an optax ``GradientTransformationExtraArgs``.

    opt = second_order.kfac(0.05, damping=1e-3)            # or second_order.gauss_newton(...)
    step = jbp.train.make_train_step(model.apply, opt)     # one jit-compiled step, as for adam
    # by hand: opt.update(grads, opt_state, params, curvature=CurvatureInputs(...))

Both need more than the gradient: K-FAC the Kronecker factors of each dense/conv weight, Gauss-
Newton products with the generalised Gauss-Newton matrix (GGN). They get them through the extra
argument ``curvature``, a :class:`CurvatureInputs` of *closures* over the step's batch, which the
train step builds (``make_train_step`` does it when ``optimizer.curvature`` names what it needs).
The transformation calls them inside the same trace, so the whole step stays one compiled
function, and K-FAC calls its closure only on refresh steps (``lax.cond``; data parallel, a
separate refresh program chosen on the host, below).

K-FAC (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016)
---------------------------------------------------------------------------
The factors are ``jbp.quantities``' ``kfac``: for a dense weight ``W (in, out)`` and a conv
kernel reshaped to ``(KH·KW·C_in, C_out)``, ``A = (1/N) Σ a aᵀ`` (input statistics) and ``G``
(the output-gradient statistics of the exact GGN columns), so that ``F_W ≈ A ⊗ G`` for ``W``
flattened row-major. Per step ``t`` (``count``):

- every ``refresh_every`` steps the factors of this batch update running averages
  ``Ā ← β Ā + (1 − β) A`` (the first refresh takes ``A`` itself; ``β = factor_decay``);
- every ``invert_every`` steps (on the step's refreshed factors) their eigendecompositions
  ``Ā = Q_A diag(λ_A) Q_Aᵀ``, ``Ḡ = Q_G diag(λ_G) Q_Gᵀ`` are recomputed (``eigh``);
- the preconditioned gradient of ``W`` (gradient ``V``, same shape) is
  ``P = Q_A [(Q_Aᵀ V Q_G) ⊘ D] Q_Gᵀ`` with ``D`` the damped eigenvalues:
  ``damping_kind="tikhonov"``: ``D = λ_A λ_Gᵀ + γ``, i.e. exactly ``(Ā ⊗ Ḡ + γ I)⁻¹ vec V``;
  ``"factored"``: ``D = (λ_A + π√γ)(λ_G + √γ/π)ᵀ`` with ``π = √((tr Ā/d_A)/(tr Ḡ/d_G))``
  (Martens & Grosse §6.3), i.e. ``((Ā + π√γ I) ⊗ (Ḡ + √γ/π I))⁻¹ vec V``;
- grouped convolutions (``groups = G > 1``: MobileNetV2's and EfficientNet's depthwise
  convs, ``G = C``): ``jbp.quantities`` writes one pair per group, ``A_g`` from group g's input
  channels, ``G_g`` from its output channels (stacked, leading axis ``G``); the preconditioner is
  block diagonal over the groups, each group's block of the kernel (conv2d: its output channels
  ``W[..., g·o:(g+1)·o]``; conv_transpose2d: its input channels) with its own ``(Ā_g, Ḡ_g)``
  and eigendecompositions, all groups in one batched ``einsum`` (``precondition``). The state's
  factor shapes come from the layers (:func:`factor_shapes`, which ``init_train_state`` passes
  to ``init``), since a kernel ``(3, 3, 1, 32)`` alone does not tell a depthwise conv over 32
  channels from a plain one over 1;
- every other parameter (biases, batch-norm ``γ``/``β``, any leaf that is not a 2-D dense or
  4-D conv weight) is **not** preconditioned: ``P = V`` (a first-order SGD-with-momentum
  update with the same learning rate and the same step scale);
- the step rule is **KL-clipping** (Ba, Grosse & Martens 2017) applied to the step actually
  taken, momentum included: ``m ← μ m + P``, ``ν = min(1, √(κ / (η² mᵀ F̃ m)))`` over all
  parameters (``κ = kl_clip``, ``η`` the learning rate, ``F̃`` the damped Kronecker curvature
  the preconditioner inverts, the identity for the first-order leaves), ``m ← ν m``, and the
  update is ``−η m``: the predicted change of the model's distribution ``η² mᵀ F̃ m`` stays
  ``≤ κ``. With ``μ = 0`` this is the paper's ``ν = min(1, √(κ / (η² ⟨P, V⟩)))`` exactly
  (``Pᵀ F̃ P = ⟨P, V⟩``). Clipping ``P`` alone before the momentum (the first version) let the
  momentum sum grow to ``1/(1 − μ)`` times the clipped step, 100× the KL bound at ``μ = 0.9``,
  which is what made a 20-step LeNet-5 run end at test loss ~20 (docs/second_order.md).

Batch norm: ``jbp.quantities`` cannot look through batch norm in training mode (it couples the
examples), so the train step computes the factors from an **evaluation-mode** pass of the same
batch (the running statistics in place of the batch's): the dense and conv layers' factors of a
ResNet-20 come from that pass, the gradient itself from the usual training-mode pass. Models
without batch norm (LeNet-5) see the same activations in both.

Damped Gauss-Newton / Hessian-free (Martens 2010)
--------------------------------------------------
Each step solves ``(G + λ I) p = −g`` by ``cg_iters`` conjugate-gradient iterations from
``p = 0`` (a ``lax.fori_loop``), with ``G = Jᵀ H_L J`` on a sub-batch (the first ``gn_batch``
examples, training mode) and ``g`` the full batch's gradient. The GGN-vector product uses only
reverse mode, because ``jax.jvp`` is not defined through ``custom_vjp``:

- ``u ↦ Jᵀ u`` is the model's VJP (the hand-written backward rules);
- ``v ↦ J v`` is the VJP of that linear map (the *double-VJP* trick: the transpose of a
  transpose): reverse mode through the backward rules, which are plain ``jnp``;
- ``H_L w`` is the VJP of ``∇_z L`` at the logits (reverse-over-reverse of the loss);
- ``G v = Jᵀ (H_L (J v))``.

Levenberg–Marquardt: after the step, ``ρ = (L(θ + p) − L(θ)) / (gᵀp + ½ pᵀ G p)`` on the
sub-batch; ``λ ← λ·3/2`` if ``ρ < 1/4``, ``λ ← λ·2/3`` if ``ρ > 3/4`` (clipped to
``[min_damping, max_damping]``), used from the next step on. The update is ``lr · p``
(``lr = 1`` is the Gauss-Newton step). All parameters, batch norm's included, take part.

Data parallel (``make_train_step(mesh=...)``): K-FAC runs; on refresh steps each device
computes its shard's factors and they are averaged over the mesh (``pmean``: both factors are
means over equal shards); the gradient is the step's usual one. The reduction runs **once per
refresh**: a collective inside ``lax.cond`` segfaulted intermittently in XLA's CPU runtime (jax
0.10.2, 2 host devices), so the step is two compiled programs, a *refresh* program (factors
computed and reduced, ``CurvatureInputs(refresh=True)``) and a *plain* one (no factors at all,
``refresh=False``), and the host picks one from K-FAC's count (``count % refresh_every == 0``,
one scalar read per step; ``jbp.train.step``). Gauss-Newton does not run data parallel yet:
that is an error (docs/errors.md), not a silently different result.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

#: ``damping_kind`` values of :func:`kfac`.
DAMPING_KINDS = ("tikhonov", "factored")


class CurvatureInputs(NamedTuple):
    """What a second-order transformation needs beside the gradient: closures over the step's
    batch, called inside the step's trace.

    ``kfac_factors(params)``: ``jbp.quantities.compute(..., quantities=("kfac",))["kfac"]``
    (``(A, G)`` per dense/conv weight, ``None`` elsewhere).
    ``logits(params)``: the model's outputs on the Gauss-Newton sub-batch, ``(n, C)``.
    ``loss_of_logits(z)``: the loss of those outputs against the sub-batch's labels (scalar).
    ``refresh``: ``None``: K-FAC decides from its count whether this step refreshes its factors
    and calls ``kfac_factors`` under ``lax.cond``; ``True``/``False`` (a Python bool, static):
    the caller decided (from the same count, ``refresh_every``), so K-FAC calls ``kfac_factors``
    unconditionally or not at all. The data-parallel step does this: its ``kfac_factors`` holds
    a ``pmean``, a collective XLA's CPU runtime crashed on inside ``lax.cond``, so it compiles
    a refresh program and a plain one and chooses on the host (``jbp.train.step``).
    """

    kfac_factors: Optional[Callable] = None
    logits: Optional[Callable] = None
    loss_of_logits: Optional[Callable] = None
    refresh: Optional[bool] = None   # None: K-FAC's lax.cond on its count; bool: caller decided


class SecondOrder(optax.GradientTransformationExtraArgs):
    """An optax transformation whose ``update`` takes ``curvature=CurvatureInputs(...)``;
    ``curvature`` (class attribute of the subclasses) names the closures it calls;
    ``sub_batch`` (instance attribute, ``None``: the whole batch) how many of the batch's
    first examples the ``logits`` closure sees."""

    curvature = ()
    sub_batch = None


class KFACTransformation(SecondOrder):
    curvature = ("kfac_factors",)


class GaussNewtonTransformation(SecondOrder):
    curvature = ("logits", "loss_of_logits")


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name}: expected a number > 0, got {value!r}")


def _period(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1 (a period in steps), got {value!r}")


def is_kfac_weight(leaf) -> bool:
    """The leaves K-FAC preconditions when its state is made from the parameters alone
    (``init(params)``): dense ``(in, out)`` and conv ``(KH, KW, C_in, C_out)`` weights, with
    one ``(A, G)`` pair each (``groups = 1``). ``init(params, factor_shapes=...)`` (what
    ``jbp.train.init_train_state`` passes, :func:`factor_shapes`) takes the layers' own list
    instead, grouped convolutions included."""
    return leaf.ndim in (2, 4)


def factor_shapes(apply: Callable, params, model_state, input_shape) -> dict:
    """``{path: (A shape, G shape)}`` of the factors ``jbp.quantities`` writes for each weight:
    the shapes the layers state (the forward traced with ``jax.eval_shape`` on one example of
    ``input_shape``, nothing computed) — a grouped convolution's pair stacked over its groups,
    ``((G, r, r), (G, o, o))`` — and one pair for every other 2-D/4-D leaf (dense weights);
    ``path`` is ``jax.tree_util.keystr`` of the leaf."""
    from jbp import quantities  # noqa: PLC0415  (jbp.quantities imports the layers)
    dtype = jnp.result_type(*[leaf for leaf in jax.tree.leaves(params)
                              if jnp.issubdtype(leaf.dtype, jnp.floating)] or [jnp.float32])
    x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), dtype)
    noted = quantities._kfac_shapes(
        lambda probed: apply(probed, model_state, jnp.zeros(x.shape, x.dtype), train=False)[0],
        params, 1)
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        pair = noted.get(key, _default_shapes(leaf))
        if pair is not None:
            shapes[key] = pair
    return shapes

# --- K-FAC ------------------------------------------------------------------------------------

class KFACState(NamedTuple):
    """K-FAC's state (a pytree; every leaf an array, so checkpoints keep it)."""

    count: jax.Array          # int32: updates applied
    factors: Any              # params' structure: (A, G) running averages per weight, else None
    eigen: Any                # params' structure: (Q_A, λ_A, Q_G, λ_G) per weight, else None
    momentum: Any             # params' structure: the momentum buffer m


def _default_shapes(leaf):
    """``(A shape, G shape)`` of a dense or ``groups = 1`` conv weight, else None."""
    if not is_kfac_weight(leaf):
        return None
    rows = leaf.shape[0] if leaf.ndim == 2 else leaf.shape[0] * leaf.shape[1] * leaf.shape[2]
    return (rows, rows), (leaf.shape[-1],) * 2


def _is_pair(node) -> bool:
    return node is None or isinstance(node, tuple)


def _eigh(factors):
    """(A, G) -> (Q_A, λ_A, Q_G, λ_G), eigenvalues clipped at 0 (the factors are PSD up to
    rounding); a grouped pair ``(G, r, r)`` gives one decomposition per group (``eigh``
    batches over the leading axis)."""
    def one(pair):
        if pair is None:
            return None
        (la, qa), (lg, qg) = jnp.linalg.eigh(pair[0]), jnp.linalg.eigh(pair[1])
        return (qa, jnp.maximum(la, 0.0), qg, jnp.maximum(lg, 0.0))
    return jax.tree.map(one, factors, is_leaf=_is_pair)


def _blocks(grad, rows: int, cols: int, groups: int):
    """A weight's gradient as its K-FAC blocks, ``(groups, rows, cols)``: block ``g`` is the
    ``(rows, cols)`` matrix whose factors are ``(A_g, G_g)``, flattened row-major like the
    factors' indices. Dense ``(in, out)`` and ``groups = 1`` kernels: one block, the kernel
    reshaped to ``(KH·KW·C_in, C_out)``. Grouped conv2d ``(KH, KW, C_in/G, C_out)``: group g
    owns output channels ``g·C_out/G …``, so block g is ``W[..., g·o:(g+1)·o]`` reshaped to
    ``(KH·KW·C_in/G, o)``. Grouped conv_transpose2d ``(KH, KW, C_in, C_out/G)``: group g owns
    input channels ``g·C_in/G …``, block g is ``W[:, :, g·c:(g+1)·c, :]`` reshaped to
    ``(KH·KW·c, C_out/G)``. The two layouts are told apart by the factors' shapes (for
    ``G > 1`` they differ)."""
    if groups == 1:
        return grad.reshape(1, rows, cols)
    kh, kw, ci, co = grad.shape
    if kh * kw * ci == rows and co == groups * cols:                 # conv2d
        return jnp.moveaxis(grad.reshape(rows, groups, cols), 1, 0)
    if kh * kw * ci == groups * rows and co == cols:                 # conv_transpose2d
        return jnp.moveaxis(grad.reshape(kh * kw, groups, ci // groups, co), 1, 0).reshape(
            groups, rows, cols)
    raise ValueError(f"optimizer: K-FAC factors of shapes ({groups}, {rows}, {rows}), "
                     f"({groups}, {cols}, {cols}) do not match a grouped conv2d or "
                     f"conv_transpose2d kernel of shape {tuple(grad.shape)}")


def _unblocks(blocks, shape):
    """The inverse of :func:`_blocks`: ``(groups, rows, cols)`` back to the weight's shape."""
    groups, rows, cols = blocks.shape
    if groups == 1:
        return blocks.reshape(shape)
    kh, kw, ci, co = shape
    if kh * kw * ci == rows and co == groups * cols:                 # conv2d
        return jnp.moveaxis(blocks, 0, 1).reshape(shape)
    return jnp.moveaxis(blocks.reshape(groups, kh * kw, ci // groups, co), 0, 1).reshape(shape)


def precondition(grad, eigen, damping: float, damping_kind: str = "tikhonov"):
    """``(Ā ⊗ Ḡ + γI)⁻¹ vec V`` (``"tikhonov"``) or the factored-damping inverse
    (``"factored"``) of one weight's gradient ``V`` (module docstring), from the
    eigendecompositions ``(Q_A, λ_A, Q_G, λ_G)``; ``V`` keeps its shape.

    Grouped convolutions (factors stacked over the groups, ``Q_A (G, r, r)``, ``λ_A (G, r)``,
    ``Q_G (G, o, o)``, ``λ_G (G, o)``): block diagonal over the groups, each group's block of
    ``V`` (:func:`_blocks`) preconditioned by its own pair, all groups in one batched einsum;
    the factored damping's ``π`` is per group."""
    qa, rotated, denominator, qg = _eigenbasis(grad, eigen, damping, damping_kind)
    p = jnp.einsum("gij,gjk,glk->gil", qa, rotated / denominator, qg)      # Q_A (·) Q_Gᵀ
    return _unblocks(p, grad.shape).astype(grad.dtype)


def curvature_form(v, eigen, damping: float, damping_kind: str = "tikhonov"):
    """``vec(V)ᵀ F̃ vec(V)`` with ``F̃`` the damped Kronecker curvature :func:`precondition`
    inverts (``Ā ⊗ Ḡ + γI``, or the factored form; per group for grouped convolutions):
    ``Σ (Q_Aᵀ V Q_G)² ⊙ D`` in the eigenbases (a scalar, float32 or wider)."""
    _, rotated, denominator, _ = _eigenbasis(v, eigen, damping, damping_kind)
    return jnp.sum(jnp.square(rotated) * denominator)


def _eigenbasis(grad, eigen, damping, damping_kind):
    """``(Q_A, Q_Aᵀ V Q_G, D, Q_G)`` per group (a group axis of 1 for one pair): ``V``'s
    blocks rotated into the eigenbases and the damped eigenvalues ``D`` of ``F̃``."""
    qa, la, qg, lg = eigen
    if qa.ndim == 2:                                   # one pair: a group axis of 1
        qa, la, qg, lg = qa[None], la[None], qg[None], lg[None]
    v = _blocks(grad, qa.shape[-1], qg.shape[-1], qa.shape[0])
    if damping_kind == "tikhonov":
        denominator = la[:, :, None] * lg[:, None, :] + damping
    else:
        tiny = jnp.finfo(la.dtype).tiny
        pi = jnp.sqrt(jnp.maximum(jnp.mean(la, -1), tiny) /
                      jnp.maximum(jnp.mean(lg, -1), tiny))[:, None]          # (groups, 1)
        root = jnp.sqrt(damping)
        denominator = (la + pi * root)[:, :, None] * (lg + root / pi)[:, None, :]
    rotated = jnp.einsum("gji,gjk,gkl->gil", qa, v, qg)                      # Q_Aᵀ V Q_G
    return qa, rotated, denominator, qg


def _check_factor_shapes(state_factors, fresh):
    """The factors this step's layers wrote have the shapes K-FAC's state was made with; a
    state from ``init(params)`` for a model with grouped convolutions does not (jbp message,
    docs/errors.md)."""
    held = jax.tree_util.tree_flatten_with_path(state_factors, is_leaf=_is_pair)[0]
    got = jax.tree.leaves(fresh, is_leaf=_is_pair)
    for (path, old), new in zip(held, got):
        old_shapes = None if old is None else tuple(tuple(o.shape) for o in old)
        new_shapes = None if new is None else tuple(tuple(f.shape) for f in new)
        if old_shapes != new_shapes:
            raise ValueError(
                f"optimizer: K-FAC's state holds factors of shapes {old_shapes} for "
                f"{jax.tree_util.keystr(path)}, but its layer writes {new_shapes} (a grouped "
                f"convolution writes one pair per group); make the state with "
                f"jbp.train.init_train_state(model, ...), or pass "
                f"init(params, factor_shapes=second_order.factor_shapes(...))")


def kfac(learning_rate: Union[float, optax.Schedule], *, damping: float = 1e-3,
         damping_kind: str = "tikhonov", momentum: float = 0.9, factor_decay: float = 0.95,
         refresh_every: int = 1, invert_every: int = 10,
         kl_clip: float = 1e-3) -> KFACTransformation:
    """K-FAC as an optax transformation (module docstring): ``update(grads, state, params, *,
    curvature)`` with ``curvature.kfac_factors`` a closure ``params -> jbp.quantities kfac``;
    ``init(params, factor_shapes=None)``: ``factor_shapes`` from :func:`factor_shapes` (the
    layers' own list, grouped convolutions included), or ``None``: every 2-D/4-D leaf with one
    pair (:func:`is_kfac_weight`).

    Args:
      learning_rate: ``η``, a float or an optax schedule of the step count.
      damping: ``γ > 0``; damping_kind: ``"tikhonov"`` or ``"factored"``.
      momentum: ``μ`` in ``[0, 1)``.
      factor_decay: ``β`` in ``[0, 1)`` of the running averages.
      refresh_every: ``k >= 1``, steps between factor refreshes.
      invert_every: ``m >= 1``, steps between eigendecompositions.
      kl_clip: ``κ > 0`` of the KL-clipping step rule.
    """
    _positive("damping", damping)
    _positive("kl_clip", kl_clip)
    _period("refresh_every", refresh_every)
    _period("invert_every", invert_every)
    if damping_kind not in DAMPING_KINDS:
        raise ValueError(f"damping_kind: expected one of {DAMPING_KINDS}, got {damping_kind!r}")
    for name, value in (("momentum", momentum), ("factor_decay", factor_decay)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected a number in [0, 1), got {value!r}")
    schedule = learning_rate if callable(learning_rate) else (lambda _count: learning_rate)

    def init(params, factor_shapes: Optional[dict] = None):
        def shapes_of(path, leaf):
            if factor_shapes is None:
                return _default_shapes(leaf)
            return factor_shapes.get(jax.tree_util.keystr(path))

        paths_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
        leaves = [leaf for _, leaf in paths_leaves]
        shape_list = [shapes_of(path, leaf) for path, leaf in paths_leaves]
        if not any(s is not None for s in shape_list):
            raise ValueError("optimizer: K-FAC preconditions the weights of dense and conv2d "
                             "layers, and this model has none (no 2-D or 4-D parameter); use a "
                             "first-order optimizer")

        def factors(leaf, pair):
            return None if pair is None else tuple(jnp.zeros(s, leaf.dtype) for s in pair)

        def eigen(leaf, pair):
            if pair is None:
                return None
            (a_shape, g_shape) = pair
            def eye(s):
                return jnp.broadcast_to(jnp.eye(s[-1], dtype=leaf.dtype), s)
            return (eye(a_shape), jnp.ones(a_shape[:-1], leaf.dtype),
                    eye(g_shape), jnp.ones(g_shape[:-1], leaf.dtype))

        structure = jax.tree.structure(params)
        return KFACState(
            jnp.zeros((), jnp.int32),
            jax.tree.unflatten(structure, [factors(l, p) for l, p in zip(leaves, shape_list)]),
            jax.tree.unflatten(structure, [eigen(l, p) for l, p in zip(leaves, shape_list)]),
            jax.tree.map(jnp.zeros_like, params))

    def update(grads, state, params=None, *, curvature: Optional[CurvatureInputs] = None,
               **_unused):
        if curvature is None or params is None or (curvature.kfac_factors is None
                                                   and curvature.refresh is not False):
            raise ValueError("curvature: K-FAC's update needs params and curvature="
                             "CurvatureInputs(kfac_factors=...); make_train_step passes them")
        count = state.count

        def refreshed():
            new = curvature.kfac_factors(params)
            _check_factor_shapes(state.factors, new)
            first = count == 0
            return jax.tree.map(
                lambda old, fresh: None if old is None else tuple(
                    jnp.where(first, f, factor_decay * o + (1.0 - factor_decay) * f).astype(
                        o.dtype) for o, f in zip(old, fresh)),
                state.factors, new, is_leaf=_is_pair)

        if curvature.refresh is None:          # K-FAC decides: the factors on refresh steps only
            factors = jax.lax.cond(count % refresh_every == 0, refreshed, lambda: state.factors)
        else:                                  # the caller decided (a program per case)
            factors = refreshed() if curvature.refresh else state.factors
        eigen = jax.lax.cond(count % invert_every == 0, lambda: _eigh(factors),
                             lambda: state.eigen)
        preconditioned = jax.tree.map(
            lambda g, e: g if e is None else precondition(g, e, damping, damping_kind),
            grads, eigen, is_leaf=lambda node: node is None or isinstance(node, tuple))
        eta = jnp.asarray(schedule(count), jnp.float32)
        # KL-clipping of the step actually taken, momentum included: ν bounds η² mᵀ F̃ m ≤ κ
        # (F̃ the damped K-FAC curvature, the identity for the first-order leaves); with μ = 0,
        # m = P and mᵀ F̃ P = ⟨P, g⟩ (Ba, Grosse & Martens 2017's rule exactly)
        velocity = jax.tree.map(lambda m, p: (momentum * m + p).astype(m.dtype),
                                state.momentum, preconditioned)
        quadratic = sum(
            (jnp.vdot(m, m).real if e is None else
             curvature_form(m, e, damping, damping_kind)).astype(jnp.float32)
            for m, e in zip(jax.tree.leaves(velocity),
                            jax.tree.leaves(eigen, is_leaf=_is_pair)))
        nu = jnp.minimum(1.0, jnp.sqrt(kl_clip / jnp.maximum(eta * eta * quadratic,
                                                              jnp.finfo(jnp.float32).tiny)))
        velocity = jax.tree.map(lambda m: (nu.astype(m.dtype) * m).astype(m.dtype), velocity)
        updates = jax.tree.map(lambda m: (-eta.astype(m.dtype) * m).astype(m.dtype), velocity)
        return updates, KFACState(count + 1, factors, eigen, velocity)

    transformation = KFACTransformation(init, update)
    transformation.refresh_every = refresh_every
    return transformation


# --- Gauss-Newton ----------------------------------------------------------------------------

class GaussNewtonState(NamedTuple):
    count: jax.Array          # int32: updates applied
    damping: jax.Array        # λ (the parameters' dtype), adapted by Levenberg–Marquardt


def _vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def ggn_operator(logits_fn: Callable, loss_of_logits: Callable, params) -> Callable:
    """``v ↦ G v = Jᵀ H_L J v`` at ``params`` (module docstring: reverse mode only, so it goes
    through the hand-written rules), for ``G`` of ``loss_of_logits(logits_fn(θ))``.
    The forward, the VJPs and their transposes are formed once; the returned function is
    linear and cheap to call repeatedly (inside a CG loop)."""
    logits, transpose_j = jax.vjp(logits_fn, params)              # u -> Jᵀ u
    _, j_of = jax.vjp(lambda u: transpose_j(u)[0], jnp.zeros_like(logits))   # v -> J v
    _, hessian_l = jax.vjp(jax.grad(loss_of_logits), logits)      # w -> H_L w (symmetric)

    def product(v):
        (jv,) = j_of(v)
        (hjv,) = hessian_l(jv)
        return transpose_j(hjv)[0]
    return product


def conjugate_gradient(matvec: Callable, b, iters: int, damping):
    """``iters`` CG iterations for ``(M + λI) x = b`` from ``x = 0`` (M symmetric PSD); a
    residual that reaches 0 stops changing ``x`` (no division by zero)."""
    def apply(v):
        return jax.tree.map(lambda mv, vv: mv + damping.astype(vv.dtype) * vv, matvec(v), v)

    x = jax.tree.map(jnp.zeros_like, b)
    r = b
    p = b
    rr = _vdot(r, r)

    def body(_, carry):
        x, r, p, rr = carry
        ap = apply(p)
        pap = _vdot(p, ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x = jax.tree.map(lambda a, b: a + alpha.astype(a.dtype) * b, x, p)
        r = jax.tree.map(lambda a, b: a - alpha.astype(a.dtype) * b, r, ap)
        new_rr = _vdot(r, r)
        beta = jnp.where(rr > 0, new_rr / jnp.where(rr > 0, rr, 1.0), 0.0)
        p = jax.tree.map(lambda a, b: a + beta.astype(a.dtype) * b, r, p)
        return x, r, p, new_rr

    x, *_ = jax.lax.fori_loop(0, iters, body, (x, r, p, rr))
    return x


def gauss_newton(learning_rate: Union[float, optax.Schedule] = 1.0, *, damping: float = 1e-3,
                 cg_iters: int = 10, min_damping: float = 1e-6,
                 max_damping: float = 1e6, adapt_damping: bool = True,
                 sub_batch: Optional[int] = None) -> GaussNewtonTransformation:
    """Damped Gauss-Newton / Hessian-free as an optax transformation (module docstring):
    ``update(grads, state, params, *, curvature)`` with ``curvature.logits`` and
    ``curvature.loss_of_logits`` closures on the sub-batch.

    Args:
      learning_rate: a float or schedule times the CG solution ``p``.
      damping: the initial ``λ > 0``; cg_iters: CG iterations per step, ``>= 1``.
      min_damping, max_damping: the range Levenberg–Marquardt keeps ``λ`` in.
      adapt_damping: ``False`` keeps ``λ`` fixed.
      sub_batch: the train step's Gauss-Newton sub-batch (its first ``sub_batch`` examples;
        ``None``: all).
    """
    _positive("damping", damping)
    _period("cg_iters", cg_iters)
    _positive("min_damping", min_damping)
    if sub_batch is not None:
        _period("sub_batch", sub_batch)
    if not min_damping <= damping <= max_damping:
        raise ValueError(f"damping: expected within [min_damping, max_damping] = "
                         f"[{min_damping}, {max_damping}], got {damping}")
    schedule = learning_rate if callable(learning_rate) else (lambda _count: learning_rate)

    def init(params):
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return GaussNewtonState(jnp.zeros((), jnp.int32), jnp.asarray(damping, dtype))

    def update(grads, state, params=None, *, curvature: Optional[CurvatureInputs] = None,
               **_unused):
        if curvature is None or curvature.logits is None or params is None:
            raise ValueError("curvature: Gauss-Newton's update needs params and curvature="
                             "CurvatureInputs(logits=..., loss_of_logits=...); make_train_step "
                             "passes them")
        lam = state.damping
        ggn = ggn_operator(curvature.logits, curvature.loss_of_logits, params)
        minus_g = jax.tree.map(jnp.negative, grads)
        p = conjugate_gradient(ggn, minus_g, cg_iters, lam)
        eta = jnp.asarray(schedule(state.count), lam.dtype)
        updates = jax.tree.map(lambda v: (eta.astype(v.dtype) * v).astype(v.dtype), p)
        if adapt_damping:
            def loss_at(theta):
                return curvature.loss_of_logits(curvature.logits(theta))
            before = loss_at(params)
            after = loss_at(optax.apply_updates(params, updates))
            predicted = (_vdot(grads, updates) + 0.5 * _vdot(updates, ggn(updates)))
            rho = jnp.where(predicted < 0, (after - before) / jnp.where(predicted < 0,
                                                                           predicted, -1.0),
                            0.0)
            lam = jnp.where(rho < 0.25, lam * 1.5, jnp.where(rho > 0.75, lam * (2.0 / 3.0), lam))
            lam = jnp.clip(lam, min_damping, max_damping).astype(state.damping.dtype)
        return updates, GaussNewtonState(state.count + 1, lam)

    transformation = GaussNewtonTransformation(init, update)
    transformation.sub_batch = sub_batch
    return transformation

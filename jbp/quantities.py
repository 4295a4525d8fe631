"""More out of one backward pass: per-example gradients and norms, gradient variance, the GGN
diagonal and K-FAC factors, from jbp's hand-written rules.

    out = jbp.quantities.compute(model.apply, params, state, x, labels,
                                 loss="softmax_cross_entropy",
                                 quantities=("batch_l2", "variance", "diag_ggn"))
    out["batch_l2"]["fc1"]["w"]        # (N,): ‖∇_W ℓ_n / N‖² of every example

For the loss ``L = (1/N) Σ_n ℓ_n`` (``reduction="sum"``: ``L = Σ_n ℓ_n``, and every ``/N`` below
is dropped), ``g_n = ∇_θ ℓ_n / N`` and ``z`` the model's output (EQUATIONS.md, "Per-example
quantities"), each entry has the structure of ``params``:

===================  ===============================================================  =========
``batch_grad``       ``g_n`` for every example                                        ``(N, *p)``
``batch_l2``         ``‖g_n‖²`` per example and parameter array                       ``(N,)``
``sum_grad_squared`` ``Σ_n g_n²``                                                     ``p``
``variance``         ``(1/N) Σ_n (∇ℓ_n)² − ((1/N) Σ_n ∇ℓ_n)²``                         ``p``
``diag_ggn``         diag of ``G = (1/N) Σ_n J_nᵀ (∇²_z ℓ_n) J_n``, exact                 ``p``
``diag_ggn_mc``      the same from ``mc_samples`` samples of the predictive distribution  ``p``
``kfac``             ``(A, G)`` per dense/conv weight (``None`` for other parameters);
                     grouped convolutions: one pair per group, stacked (leading axis G)
===================  ===============================================================  =========

plus ``"loss"`` and ``"grad"`` (``Σ_n g_n``).

How (the design): every parameterised layer (dense, conv2d, conv_transpose2d, batch_norm in
evaluation mode)
declares, beside its rule, a ``quantities`` function (``jbp._rule.manual_rule(...,
quantities=...)``) that computes these from the ``a_n`` its rule keeps and the ``δ_n`` its
backward receives. They leave the backward as cotangents of zero *probes* that travel with the
parameters (``jbp._probes``): :func:`compute` wraps each parameter array as
``Probed(value, {name: zeros})`` and differentiates with respect to the wrapped tree, so
everything is one forward and one backward under ``jax.jit`` (the model code is untouched).

- ``batch_grad``, ``batch_l2``, ``sum_grad_squared``, ``variance``: one ``jax.grad`` of the
  loss; ``δ`` carries the ``1/N``. Dense ``batch_l2`` is ``‖a_n‖²‖δ_n‖²`` and never forms a
  per-example gradient; conv picks Gram matrices or per-example gradients, whichever holds
  fewer values (``jbp.layers.conv``).
- ``diag_ggn``: ``∇²_z ℓ_n = S_n S_nᵀ`` with ``C`` columns (softmax cross-entropy:
  ``S = diag(√p) − p √pᵀ``; mean squared error: ``√(2/C) I``, sum: ``√2 I``); one forward
  (``jax.vjp``), then the backward of every column at once (``jax.vmap`` of the VJP over the
  ``C`` columns), each rule writing ``Σ_n (J_nᵀ s_{n,c})²`` for its parameters; summed over
  ``c``, times ``1/N``.
- ``diag_ggn_mc``: the same with ``M = mc_samples`` columns ``s = ∇_z ℓ_n(ŷ)`` at labels ``ŷ``
  drawn from the model's predictive distribution (cross-entropy: ``p − onehot(ŷ)``; MSE:
  ``√(2/C) ε``, ``ε ~ N(0, I)``), ``E[s sᵀ] = ∇²_z ℓ_n``, averaged over ``M``; needs ``key``.
- ``kfac``: the rules' ``Σ a aᵀ`` and ``(1/T) Σ δ δᵀ`` over the exact factor's columns:
  ``A = (1/N) Σ_{n,t} a aᵀ`` and ``G = (1/N) Σ_n (1/T) Σ_{t,c} δ δᵀ`` (KFC for convolutions, Grosse
  & Martens 2016); with ``reduction="sum"`` ``G`` drops its ``1/N``, ``A`` stays a mean. For one
  example ``kron(A, G)`` is the GGN block of ``W`` flattened row-major (dense ``(in, out)``;
  conv with a 1×1 output ``(KH·KW·C_in, C_out)``) exactly.

Batch norm in training mode couples the examples: per-example quantities through it are an
error (run with ``train=False``). A parameter used by two layers would add the two layers'
``batch_l2`` instead of forming one norm; jbp's models use each parameter once. With
``mesh=`` the examples are split over the devices (:func:`compute`). Inside a ``shard_map`` of
the caller's own with parameters cast to varying over the mesh axis (``lax.pcast(...,
to="varying")``), the probes vary as their parameters do, so each device gets its shard's
quantities (K-FAC's data-parallel step averages them, ``jbp.train.step``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from jbp import _probes
from jbp._probes import Probed
from jbp.policy import LayerPolicy

#: Every quantity :func:`compute` knows.
QUANTITIES = ("batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn",
              "diag_ggn_mc", "kfac")
#: The losses whose Hessian factor (``diag_ggn``, ``diag_ggn_mc``, ``kfac``) is written here.
GGN_LOSSES = ("softmax_cross_entropy", "mse")
#: The losses :func:`compute` accepts (each a mean of equal per-example terms).
LOSSES = ("softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy")
REDUCTIONS = ("mean", "sum")

_FIRST_PASS = ("batch_grad", "batch_l2", "sum_grad_squared", "variance")
_CURVATURE = ("diag_ggn", "diag_ggn_mc", "kfac")


def check(quantities, loss, reduction, key, mc_samples) -> tuple:
    """The requested names, validated (jbp messages, docs/errors.md)."""
    if isinstance(quantities, str) or not isinstance(quantities, (tuple, list)) or \
            not quantities:
        raise TypeError(f"quantities: expected a non-empty tuple of names from {QUANTITIES}, "
                        f"got {quantities!r}")
    for name in quantities:
        if name not in QUANTITIES:
            raise ValueError(f"quantities: unknown quantity {name!r}; known: "
                             f"{', '.join(QUANTITIES)}")
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES} (by name), got {loss!r}")
    curvature = [q for q in quantities if q in _CURVATURE]
    if curvature and loss not in GGN_LOSSES:
        raise ValueError(f"loss: {curvature[0]!r} needs a factor of the loss Hessian, written "
                         f"for {GGN_LOSSES}; not defined for {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if "diag_ggn_mc" in quantities:
        if key is None:
            raise ValueError("key: 'diag_ggn_mc' samples from the predictive distribution; pass "
                             "key=jax.random.key(...)")
        if not isinstance(mc_samples, int) or isinstance(mc_samples, bool) or mc_samples < 1:
            raise ValueError(f"mc_samples: expected a positive int, got {mc_samples!r}")
    return tuple(dict.fromkeys(quantities))


def compute(apply: Callable, params, state, x, labels, *,
            loss: str = "softmax_cross_entropy", quantities: Sequence[str],
            reduction: str = "mean", key: Optional[jax.Array] = None, mc_samples: int = 1,
            train: bool = False, mesh=None) -> dict:
    """The ``quantities`` of the loss of ``apply(params, state, x)`` against ``labels``
    (module docstring), from one forward and one backward (plus the batched curvature
    columns), jit-compiled.

    Args:
      apply: a model's ``apply(params, state, x, *, train, layers)`` (``jbp.models``).
      params, state: its parameters and state (batch-norm running statistics).
      x: the batch, ``(N, ...)``; labels: what ``loss`` takes (class indices for
        cross-entropy, targets of the logits' shape for ``mse``).
      loss: the name of a jbp loss, :data:`LOSSES`.
      quantities: names from :data:`QUANTITIES`.
      reduction: ``"mean"`` (``L = (1/N) Σ ℓ_n``) or ``"sum"``.
      key, mc_samples: the PRNG key and sample count of ``diag_ggn_mc``.
      train: the model's mode; ``True`` through batch norm is an error (module docstring).
      mesh: a ``jax.sharding.Mesh`` with a ``"data"`` axis (``jbp.parallel.data_mesh()``): the
        examples are split over its devices (``jax.shard_map``; N divisible by their number),
        parameters and state replicated; per-example results come back sharded over the
        examples, sums (gradient, ``sum_grad_squared``, ``variance``, the GGN, K-FAC) summed
        over the devices by the rules themselves (``jbp._rule``). ``None``: one device.

    Returns:
      ``{"loss": L, "grad": ∇L, name: tree with params' structure, ...}``.
    """
    names = check(quantities, loss, reduction, key, mc_samples)
    if mesh is not None:
        _check_mesh(mesh, x)
    fn = _compiled(apply, names, loss, reduction, mc_samples if key is not None else 0,
                   bool(train), mesh)
    return fn(params, state, x, labels, key)


def _check_mesh(mesh, x):
    from jbp.parallel import DATA_AXIS, check_data_mesh  # noqa: PLC0415
    devices = check_data_mesh(mesh, "per-example quantities split the examples")
    if x.shape[0] % devices:
        raise ValueError(f"x: {x.shape[0]} examples do not split evenly over the mesh's "
                         f"{devices} devices along {DATA_AXIS!r}")


@functools.lru_cache(maxsize=32)
def _compiled(apply, names, loss, reduction, mc_samples, train, mesh=None):
    local = functools.partial(_compute, apply, names, loss, reduction, mc_samples, train)
    if mesh is None:
        return jax.jit(local)
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415
    from jbp.parallel import DATA_AXIS  # noqa: PLC0415
    # per-example results sharded over the examples, the rest replicated
    out_specs = {name: P(DATA_AXIS) if name in ("batch_grad", "batch_l2") else P()
                 for name in ("loss", "grad") + names}
    return jax.jit(jax.shard_map(
        functools.partial(local, axis=DATA_AXIS), mesh=mesh,
        in_specs=(P(), P(), P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=out_specs))


def _loss_value(loss, logits, labels, reduction):
    fn = getattr(LayerPolicy(), loss)
    return fn(logits, labels) if reduction == "mean" else fn(logits, labels, reduction="sum")


def _is_weight(leaf) -> bool:
    """Dense (in, out) and conv (KH, KW, C_in, C_out) weights get K-FAC probes."""
    return leaf.ndim in (2, 4)


def _probe(leaf, names, n, path=None, kfac_shape=None):
    shapes = {"batch_grad": (n, *leaf.shape), "batch_l2": (n,),
              "sum_grad_squared": leaf.shape}
    probes = {name: jnp.zeros(shapes[name], leaf.dtype) for name in names if name in shapes}
    if "kfac" in names and (kfac_shape is not None or _is_weight(leaf)):
        if kfac_shape is None:          # dense (in, out) or conv2d with groups = 1
            rows = leaf.shape[0] if leaf.ndim == 2 else \
                leaf.shape[0] * leaf.shape[1] * leaf.shape[2]
            kfac_shape = ((rows, rows), (leaf.shape[-1],) * 2)
        probes["kfac"] = tuple(jnp.zeros(shape, leaf.dtype) for shape in kfac_shape)
    if probes:
        # inside a caller's shard_map (K-FAC's data-parallel step): probes vary over the axes
        # their parameter varies over, so that the rules' cotangents have the probes' types
        from jbp._rule import _varying_axes  # noqa: PLC0415
        axes = tuple(sorted(_varying_axes(leaf) or (), key=str))
        if axes:
            probes = jax.tree.map(lambda z: jax.lax.pcast(z, axes, to="varying"), probes)
    return Probed(leaf, probes, path) if probes else leaf


def _wrap(params, names, n, kfac_shapes=None):
    """``params`` with every array wrapped as :class:`Probed` (its path kept to name it);
    ``kfac_shapes``: the factor shapes the layers noted (:func:`_kfac_shapes`)."""
    def wrap(path, leaf):
        key = jax.tree_util.keystr(path)
        return _probe(leaf, names, n, key, (kfac_shapes or {}).get(key))
    return jax.tree_util.tree_map_with_path(wrap, params)


def _kfac_shapes(forward, params, n) -> dict:
    """``{path: (A shape, G shape)}`` from the layers themselves: the forward traced alone
    (``jax.eval_shape``, nothing computed) with default-shaped ``kfac`` probes while the layers
    note their factors' shapes (a grouped convolution: one pair per group; ``jbp._probes``)."""
    with _probes.noting_kfac_shapes() as noted:
        jax.eval_shape(forward, _wrap(params, ("kfac",), n))
    return dict(noted)


def _vary(probed, axis):
    """Under ``shard_map``: the per-example probes (``batch_grad``, ``batch_l2``) marked as
    varying over ``axis``, so that each device keeps its own rows (``jbp._rule``); the others
    stay replicated and their cotangents are summed over the devices."""
    if axis is None:
        return probed
    from jbp._rule import make_varying  # noqa: PLC0415

    def vary(node):
        if not _is_probed(node):
            return node
        probes = {k: make_varying(v, frozenset({axis})) if k in ("batch_grad", "batch_l2")
                  else v for k, v in node.probes.items()}
        return Probed(node.value, probes, node.path)
    return jax.tree.map(vary, probed, is_leaf=_is_probed)


def _is_probed(node) -> bool:
    return isinstance(node, Probed)


def _field(tree, name, default=None):
    """The cotangent of probe ``name`` at every parameter (``default`` where there is none)."""
    return jax.tree.map(lambda node: node.probes.get(name, default) if _is_probed(node)
                        else default, tree, is_leaf=_is_probed)


def _values(tree):
    return jax.tree.map(lambda node: node.value if _is_probed(node) else node, tree,
                        is_leaf=_is_probed)


def _hessian_columns(loss, logits, reduction):
    """``S`` with ``∇²_z ℓ_n = S_n S_nᵀ``, as columns shaped like the logits: (D, N, ...) for
    logits (N, C) (D = C) or per pixel (N, ..., C) (D = P·C, P pixels; ``ℓ_n`` the pixels' mean,
    or sum with ``reduction="sum"``, so its Hessian is block diagonal over the pixels, each block
    times 1/P)."""
    n, c = logits.shape[0], logits.shape[-1]
    pixels = math.prod(logits.shape[1:-1])
    per_pixel = 1.0 / pixels if reduction == "mean" else 1.0
    if loss == "softmax_cross_entropy":
        z = logits.reshape(n, pixels, c).astype(jnp.promote_types(logits.dtype, jnp.float32))
        p = jax.nn.softmax(z, axis=-1)
        sqrt_p = jnp.sqrt(p)
        # per pixel S[i, k] = δ_ik √p_k − p_i √p_k; column (q, k) is S[:, k] at pixel q, 0 elsewhere
        s = (jnp.eye(c, dtype=p.dtype) - p[..., :, None]) * sqrt_p[..., None, :] * \
            jnp.sqrt(per_pixel)
        cols = jnp.einsum("qp,npik->qknpi", jnp.eye(pixels, dtype=p.dtype), s)
        return cols.reshape(pixels * c, *logits.shape).astype(logits.dtype)
    d = pixels * c        # mse: ℓ_n the mean (sum) of D squared errors, Hessian (2/D) I (2 I)
    scale = jnp.sqrt(2.0 / d) if reduction == "mean" else jnp.sqrt(2.0)
    eye = scale * jnp.eye(d, dtype=logits.dtype)[:, None, :]
    return jnp.broadcast_to(eye, (d, n, d)).reshape(d, *logits.shape)


def _sampled_columns(loss, logits, reduction, key, m):
    """M columns s with ``E[s sᵀ] = ∇²_z ℓ_n``: shape (M, *logits.shape); per pixel a label
    drawn for every pixel independently (the blocks between pixels average to 0)."""
    c = logits.shape[-1]
    pixels = math.prod(logits.shape[1:-1])
    if loss == "softmax_cross_entropy":
        scale = jnp.sqrt(1.0 / pixels) if reduction == "mean" else 1.0
        p = jax.nn.softmax(logits, axis=-1)
        drawn = jax.random.categorical(key, logits, axis=-1, shape=(m, *logits.shape[:-1]))
        return scale * (p[None] - jax.nn.one_hot(drawn, c, dtype=logits.dtype))
    scale = jnp.sqrt(2.0 / (pixels * c)) if reduction == "mean" else jnp.sqrt(2.0)
    return scale * jax.random.normal(key, (m, *logits.shape), logits.dtype)


def _compute(apply, names, loss, reduction, mc_samples, train, params, state, x, labels, key,
             axis=None):
    """One device's part (``axis``: the mesh axis the examples are split over, or None)."""
    n = x.shape[0] if axis is None else x.shape[0] * jax.lax.axis_size(axis)   # global N
    policy = LayerPolicy()
    scale = 1.0 / n if reduction == "mean" else 1.0      # the 1/N of the loss
    out = {}

    first = tuple(q for q in ("batch_grad", "batch_l2", "sum_grad_squared") if q in names)
    if "variance" in names and "sum_grad_squared" not in first:
        first += ("sum_grad_squared",)

    def objective(probed):
        logits, _ = apply(probed, state, x, train=train, layers=policy)
        value = _loss_value(loss, logits, labels, reduction)
        if axis is None:
            return value
        # the global loss: the mean of the devices' means (equal shards) or the sum of sums
        return jax.lax.pmean(value, axis) if reduction == "mean" else jax.lax.psum(value, axis)

    loss_value, cts = jax.value_and_grad(objective)(_vary(_wrap(params, first, x.shape[0]),
                                                          axis))
    out["loss"], out["grad"] = loss_value, _values(cts)
    for name in first:
        if name in names:
            out[name] = _field(cts, name)
    if "variance" in names:
        # ∇ℓ_n = r g_n (r = N for a mean, 1 for a sum):  (1/N) Σ (r g_n)² − ((1/N) Σ r g_n)²
        r = float(n) if reduction == "mean" else 1.0
        out["variance"] = jax.tree.map(
            lambda sgs, grad: r * r * sgs / n - jnp.square(r * grad / n),
            _field(cts, "sum_grad_squared"), out["grad"])

    curvature = [q for q in names if q in _CURVATURE]
    if curvature:
        probe_names = (("sum_grad_squared",) if ("diag_ggn" in names or "diag_ggn_mc" in names)
                       else ()) + (("kfac",) if "kfac" in names else ())

        def logits_of(probed):
            return apply(probed, state, x, train=train, layers=policy)[0]

        kfac_shapes = _kfac_shapes(logits_of, params, x.shape[0]) if "kfac" in names else None
        logits, backward = jax.vjp(logits_of, _wrap(params, probe_names, x.shape[0],
                                                     kfac_shapes))
        if "diag_ggn" in names or "kfac" in names:
            (exact,) = jax.vmap(backward)(_hessian_columns(loss, logits, reduction))
            if "diag_ggn" in names:
                out["diag_ggn"] = jax.tree.map(lambda v: scale * jnp.sum(v, axis=0),
                                               _field(exact, "sum_grad_squared"))
            if "kfac" in names:
                out["kfac"] = jax.tree.map(
                    lambda ag: None if ag is None else (ag[0][0] / n, scale * jnp.sum(ag[1], 0)),
                    _field(exact, "kfac"), is_leaf=lambda v: v is None or isinstance(v, tuple))
        if "diag_ggn_mc" in names:
            if axis is not None:            # every device samples for its own examples
                key = jax.random.fold_in(key, jax.lax.axis_index(axis))
            (sampled,) = jax.vmap(backward)(
                _sampled_columns(loss, logits, reduction, key, mc_samples))
            out["diag_ggn_mc"] = jax.tree.map(lambda v: scale * jnp.mean(v, axis=0),
                                              _field(sampled, "sum_grad_squared"))
    return out

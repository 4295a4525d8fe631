"""The train step: one jit-compiled, pure function from (state, batch) to (state, metrics).

    state = init_train_state(model, optimizer, key, input_shape, num_classes)
    step = make_train_step(model.apply, optimizer, "softmax_cross_entropy", grad="manual")
    for x, y in batches:
        state, metrics = step(state, x, y)          # donated: the old state's buffers are reused

``grad="manual"`` differentiates through jbp's hand-written rules, ``grad="autodiff"`` through the
same forward with JAX's; the state pytrees are identical, so a run can switch between them.
Optimisers come from optax (:mod:`jbp.train.optim`); nothing here is a hand-written optimiser.

Data parallel (``mesh=``, a ``jax.sharding.Mesh`` with an axis ``"data"``): the step's body runs
under ``jax.shard_map`` over that axis, so every layer sees its device's shard of the batch and
picks its CPU formulation from the per-device shape. The loss is the mean over the global batch
(``pmean`` of the shards' means, the shards being equal), so the gradient of every replicated
parameter is the ``psum`` of the shards' contributions (JAX inserts it for autodiff,
``jbp._rule`` for the manual rules), and batch norm is synchronised (the step runs the model
with ``LayerPolicy(axis_name="data")``).
Parameters, optimiser state and batch-norm statistics stay replicated. docs/scaling.md.

Random layers (dropout, stochastic depth): a model whose ``apply`` takes ``key=`` gets
``fold_in(state.rng, state.step)`` each step — a resumed run draws the same keys — and, data
parallel, that key folded once more with the device's index along ``"data"``
(``lax.axis_index``), so each device draws its own masks for its own examples instead of every
device repeating device 0's. Models without random layers take no key and get none.

Precision (``precision="bf16"``): float32 master parameters and optimiser state; the step casts
parameters and images to bfloat16 for the forward and backward (batch norm keeps its statistics
in float32, as it does for any half-precision input), computes the loss in float32 from float32
logits, and hands float32 gradients to the optimiser.

Second-order optimisers (``kfac``, ``gauss_newton``, :mod:`jbp.train.second_order`): an
optimiser with a ``curvature`` attribute gets ``update(..., curvature=CurvatureInputs(...))``,
closures over this step's batch that it calls inside the same compiled step (K-FAC's factors
from ``jbp.quantities`` in evaluation mode, Gauss-Newton's logits and loss on a sub-batch).
Data parallel, K-FAC's step is two compiled programs, one that refreshes (and all-reduces) the
factors and one that does not, chosen on the host from the optimiser's count
(:func:`_kfac_data_parallel`); its ``programs`` attribute holds both.

DP-SGD (``dp=(clip_norm, noise_multiplier)``, config ``train.dp``): the gradient is the clipped,
noised one of :mod:`jbp.train.privacy` (per-example norms from the rules' probes, a second
backward with per-example scaled δ); one device, a loss by name.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jbp.models import Model
from jbp.train import privacy, second_order
from jbp.policy import LayerPolicy, resolve
from jbp.parallel import DATA_AXIS, check_data_mesh

#: ``make_train_step(precision=...)`` values: the dtype of the forward and backward passes.
PRECISIONS = {"f32": jnp.float32, "bf16": jnp.bfloat16}


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree)."""

    params: Any          # model parameters
    model_state: Any     # batch-norm running statistics
    opt_state: Any       # the optax optimiser's state
    step: jax.Array      # int32 scalar: steps taken
    # The run's PRNG key, for random layers (dropout, stochastic depth): a step draws its key
    # as fold_in(rng, step) (and the device index, data parallel), so the field never changes
    # and a resumed run draws the same keys.
    rng: jax.Array


def init_train_state(model: Model, optimizer: optax.GradientTransformation, key: jax.Array,
                     input_shape: Sequence[int], num_classes: int, *, dtype=None) -> TrainState:
    """``dtype``: cast the floating parameters and model state (e.g. to float64, which needs
    ``jax_enable_x64``) before the optimiser's state is made from them."""
    init_key, rng = jax.random.split(key)
    params, model_state = model.init(init_key, tuple(input_shape), num_classes)
    if dtype is not None:
        params, model_state = _cast_floats((params, model_state), dtype)
    return TrainState(params, model_state,
                      init_optimizer(model, optimizer, params, model_state, input_shape),
                      jnp.zeros((), jnp.int32), rng)


def init_optimizer(model: Model, optimizer: optax.GradientTransformation, params, model_state,
                   input_shape: Sequence[int]):
    """``optimizer.init(params)``; for K-FAC ``init(params, factor_shapes=...)`` with the
    factor shapes the model's layers state (a grouped convolution: one pair per group,
    :func:`jbp.train.second_order.factor_shapes`), which the parameters alone do not tell."""
    if "kfac_factors" in getattr(optimizer, "curvature", ()):
        return optimizer.init(params, factor_shapes=second_order.factor_shapes(
            model.apply, params, model_state, input_shape))
    return optimizer.init(params)


# --- steps ------------------------------------------------------------------------------------

def _loss_fn(loss: Union[str, Callable], layers: LayerPolicy) -> Callable:
    """A loss by name is taken from the same layer policy as the model's layers."""
    return getattr(layers, loss) if isinstance(loss, str) else loss


def make_loss(apply: Callable, loss: Union[str, Callable] = "softmax_cross_entropy", *,
              grad: Optional[str] = None, layers: Optional[LayerPolicy] = None,
              precision: str = "f32") -> Callable:
    """``loss(params, model_state, x, y, key=None) -> (loss, (logits, new_model_state))``,
    train mode; ``key`` reaches ``apply`` (its random layers) when given.

    ``grad``: ``"manual"`` (the default: jbp's hand-written rules) or ``"autodiff"``, short for
    ``layers=LayerPolicy(grad)``; ``layers``: the :class:`jbp.LayerPolicy` the model runs with,
    its residual policy and batch norm's mesh axis included.

    ``precision="bf16"`` casts floating parameters and ``x`` to bfloat16 before the model and
    its logits to float32 before the loss (module docstring); ``"f32"`` leaves dtypes alone.
    """
    layers = resolve(grad, layers)
    loss_fn = _loss_fn(loss, layers)
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {tuple(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]

    def objective(params, model_state, x, y, key=None):
        if dtype != jnp.float32:
            params, x = _cast_floats(params, dtype), _cast_floats(x, dtype)
        random = {} if key is None else {"key": key}    # models with dropout/stochastic depth
        logits, new_state = apply(params, model_state, x, train=True, layers=layers, **random)
        if dtype != jnp.float32:
            logits = logits.astype(jnp.float32)
        return loss_fn(logits, y), (logits, new_state)

    return objective


def takes_key(apply: Callable) -> bool:
    """Whether a model's ``apply`` draws random masks: it has a ``key`` parameter."""
    try:
        return "key" in inspect.signature(apply).parameters
    except (TypeError, ValueError):      # a callable without a signature: no key
        return False


def _class_labels(logits, y) -> bool:
    """Whether ``y`` holds class indices (integers, one axis fewer than the logits), so that an
    accuracy means something; a regression or multi-label target (mse, sigmoid) does not."""
    return jnp.issubdtype(y.dtype, jnp.integer) and y.ndim == logits.ndim - 1


def _cast_floats(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, tree)


def _data_parallel(step: Callable, mesh, donate: bool) -> Callable:
    """``step`` under ``shard_map`` over ``mesh``'s ``"data"`` axis, jit-compiled (module doc)."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: PLC0415
    n = check_data_mesh(mesh, "a data-parallel step shards the batch")
    sharded = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                            out_specs=(P(), P()))
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P(DATA_AXIS))
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)

    def place(tree, sharding):
        if explicit:
            return jax.reshard(tree, sharding)
        return jax.lax.with_sharding_constraint(tree, sharding)

    def data_parallel_step(state: TrainState, x, y):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y: batch sizes differ ({x.shape[0]} vs {y.shape[0]})")
        if x.shape[0] % n:
            raise ValueError(f"x: a batch of {x.shape[0]} does not divide over the mesh's "
                             f"{n} devices on axis {DATA_AXIS!r}; use a batch size that is a "
                             f"multiple of {n}")
        return sharded(place(state, replicated), place(x, batch), place(y, batch))

    return jax.jit(data_parallel_step, donate_argnums=(0,) if donate else (),
                   out_shardings=(replicated, replicated))


def make_train_step(apply: Callable, optimizer: optax.GradientTransformation,
                    loss: Union[str, Callable] = "softmax_cross_entropy", *,
                    grad: Optional[str] = None, layers: Optional[LayerPolicy] = None,
                    donate: bool = True,
                    check_finite: bool = True,
                    mesh=None, precision: str = "f32", dp=None) -> Callable:
    """A jit-compiled ``step(state, x, y) -> (state, metrics)``.

    ``dp``: ``None``, or DP-SGD's ``(clip_norm, noise_multiplier)`` (or an object with those
    attributes, ``jbp.config.DPConfig``): the step applies :func:`jbp.train.privacy.
    clipped_gradient` (module docstring), and ``metrics`` add ``clipped_fraction`` and
    ``per_example_norms`` (N,).

    ``mesh``: a ``jax.sharding.Mesh`` with an axis ``"data"`` makes the step data parallel over
    it (module docstring): ``x`` and ``y`` sharded along their first axis (whose size must divide
    by the axis size), everything else replicated, results equal to the one-device step on the
    same global batch. ``precision``: ``"f32"`` or ``"bf16"`` (module docstring).

    ``metrics`` (device arrays): ``loss``, ``accuracy`` (of this batch; only when ``y`` holds
    class indices, i.e. integers with one axis fewer than the logits), ``grad_norm`` (global
    L2 norm of the gradient before clipping), ``leaf_norms`` (the gradient norm of every
    parameter leaf, in :func:`leaf_names` order) and ``finite``.

    With ``check_finite`` (the default) a step whose loss or gradient is NaN/Inf is *not*
    applied: the returned state is the input state (step count included), ``finite`` is False and
    ``leaf_finite`` tells which parameter leaves had non-finite gradients. The check runs inside
    the compiled step; reading ``finite`` costs the caller one scalar transfer. With ``donate``
    the input state's buffers are reused for the output (do not touch the old state after).
    """
    axis = None if mesh is None else DATA_AXIS
    layers = resolve(grad, layers)
    if layers.axis_name is not None and layers.axis_name != axis:
        raise ValueError(f"layers.axis_name={layers.axis_name!r}: the train step sets batch "
                         f"norm's mesh axis itself ({DATA_AXIS!r} with mesh=, none without); "
                         f"leave it None")
    if axis is not None:
        layers = dataclasses.replace(layers, axis_name=axis)
    objective = make_loss(apply, loss, layers=layers, precision=precision)
    if dp is not None:
        clip_norm, noise = (dp if isinstance(dp, tuple)
                            else (getattr(dp, "clip_norm", None),
                                  getattr(dp, "noise_multiplier", None)))
        privacy.check(clip_norm, noise)
        if not isinstance(loss, str) or precision != "f32":
            raise ValueError("train.dp: DP-SGD needs a loss by name and precision='f32'")
        per_element = functools.partial(_loss_fn(loss, layers), reduction="none")

        def per_example_loss(logits, y):
            """ℓ_n: the mean over an example's elements (mse, BCE), so that mean_n ℓ_n = L."""
            values = per_element(logits, y)
            return jnp.mean(values.reshape(values.shape[0], -1), axis=1)

    def gradients(state: TrainState, x, y):
        """(loss, (logits, model_state), grads, extra metrics)."""
        if dp is None:
            key = None
            if random:                   # this step's key; data parallel: this device's own
                key = jax.random.fold_in(state.rng, state.step)
                if axis is not None:
                    key = jax.random.fold_in(key, jax.lax.axis_index(axis))
            (loss_value, aux), grads = jax.value_and_grad(global_objective, has_aux=True)(
                state.params, state.model_state, x, y, key)
            return loss_value, aux, grads, {}
        key = jax.random.fold_in(state.rng, state.step)
        loss_value, logits, model_state, grads, stats = privacy.clipped_gradient(
            apply, per_example_loss, layers, state.params, state.model_state, x, y,
            clip_norm=clip_norm, noise_multiplier=noise, key=key, axis=axis)
        return loss_value, (logits, model_state), grads, stats

    def global_objective(params, model_state, x, y, key):
        loss_value, aux = objective(params, model_state, x, y, key)
        return (loss_value if axis is None else jax.lax.pmean(loss_value, axis)), aux

    random = takes_key(apply)
    needs = getattr(optimizer, "curvature", ())
    if needs:
        _check_second_order(optimizer, loss, mesh, dp)

    def curvature_inputs(state: TrainState, x, y, refresh):
        """The closures a second-order optimiser calls (jbp.train.second_order): K-FAC's
        factors from an evaluation-mode pass of this batch (batch norm: running statistics),
        Gauss-Newton's logits and loss on the first ``sub_batch`` examples, training mode.
        ``refresh``: ``None`` (K-FAC decides under ``lax.cond``) or the host's decision (the
        data-parallel programs, :func:`_kfac_data_parallel`)."""
        from jbp import quantities  # noqa: PLC0415  (jbp.quantities imports the layers)
        sub = optimizer.sub_batch or x.shape[0]
        xs, ys = x[:sub], y[:sub]
        key = jax.random.fold_in(state.rng, state.step) if random else None
        kw = {} if key is None else {"key": key}
        def kfac_factors(params):
            """Data parallel: this device's shard's factors, averaged over the mesh (the shards
            are equal, and both factors are means over the examples); only the refresh
            program calls it (a collective inside lax.cond crashed XLA's CPU runtime,
            docs/second_order.md)."""
            if axis is not None:          # the probes must vary as the device's shard does
                params = jax.tree.map(lambda a: jax.lax.pcast(a, (axis,), to="varying"),
                                      params)
            factors = quantities.compute(apply, params, state.model_state, x, y, loss=loss,
                                         quantities=("kfac",), train=False)["kfac"]
            return factors if axis is None else jax.lax.pmean(factors, axis)

        return second_order.CurvatureInputs(
            kfac_factors=kfac_factors, refresh=refresh,
            logits=lambda params: apply(params, state.model_state, xs, train=True,
                                        layers=layers, **kw)[0].astype(jnp.float32),
            loss_of_logits=lambda z: _loss_fn(loss, layers)(z, ys))

    def step(state: TrainState, x, y, refresh=None):
        loss_value, (logits, model_state), grads, extra = gradients(state, x, y)
        more = {"curvature": curvature_inputs(state, x, y, refresh)} if needs else {}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, **more)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params, model_state, opt_state, state.step + 1, state.rng)
        leaves = jax.tree.leaves(grads)
        metrics = {"loss": loss_value,
                   "grad_norm": optax.tree.norm(grads),
                   "leaf_norms": jnp.stack([jnp.sqrt(jnp.sum(jnp.square(g))) for g in leaves]),
                   **extra}
        if _class_labels(logits, y):
            accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
            metrics["accuracy"] = accuracy if axis is None else jax.lax.pmean(accuracy, axis)
        if check_finite:
            leaf_finite = jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves])
            finite = jnp.isfinite(loss_value) & jnp.all(leaf_finite)
            new_state = jax.lax.cond(finite, lambda: new_state, lambda: state)
            metrics.update(finite=finite, leaf_finite=leaf_finite)
        else:
            metrics["finite"] = jnp.asarray(True)
        return new_state, metrics

    if mesh is not None:
        if "kfac_factors" in needs:
            return _kfac_data_parallel(step, mesh, donate, optimizer)
        return _data_parallel(step, mesh, donate)
    return jax.jit(step, donate_argnums=(0,) if donate else ())


def _kfac_data_parallel(step: Callable, mesh, donate: bool, optimizer) -> Callable:
    """K-FAC's data-parallel step: two compiled programs, chosen on the host.

    ``programs["refresh"]`` computes this step's factors on every device and averages them over
    the mesh (one all-reduce of the factors), ``programs["plain"]`` neither computes nor reduces
    factors (it reuses K-FAC's running averages). The choice is K-FAC's own rule, ``count %
    refresh_every == 0`` with ``count`` read from the optimiser state (one scalar transfer per
    step, a sync ``fit`` makes anyway), so the collective never sits inside ``lax.cond`` (which
    crashed XLA's CPU runtime, docs/second_order.md) and runs once per refresh, not per step.
    A state from a checkpoint resumes on the same schedule, the count being part of it."""
    from jbp import parallel  # noqa: PLC0415
    programs = {"refresh": _data_parallel(functools.partial(step, refresh=True), mesh, donate),
                "plain": _data_parallel(functools.partial(step, refresh=False), mesh, donate)}
    every = optimizer.refresh_every

    def kfac_data_parallel_step(state: TrainState, x, y):
        count = kfac_count(state.opt_state)
        if isinstance(count, jax.core.Tracer):
            raise ValueError("optimizer: K-FAC's data-parallel step chooses its refresh program "
                             "on the host from the optimiser's count; call it outside jax.jit "
                             "(it is compiled already)")
        refresh = int(parallel.local_view(count)) % every == 0
        return programs["refresh" if refresh else "plain"](state, x, y)

    kfac_data_parallel_step.programs = programs
    return kfac_data_parallel_step


def kfac_count(opt_state):
    """The ``count`` of the :class:`jbp.train.second_order.KFACState` inside ``opt_state``
    (a chain's state holds it among others)."""
    def is_state(node):
        return isinstance(node, second_order.KFACState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if len(found) != 1:
        raise ValueError(f"opt_state: expected one K-FAC state inside, found {len(found)}")
    return found[0].count


def _check_second_order(optimizer, loss, mesh, dp) -> None:
    """What ``kfac``/``gauss_newton`` cannot run with yet: jbp messages, not wrong results."""
    name = type(optimizer).__name__
    if mesh is not None and "logits" in optimizer.curvature:
        raise ValueError(f"optimizer: {name} does not run data parallel yet (its GGN products "
                         f"are not written for shard_map); set train.data_parallel='off'")
    if dp is not None:
        raise ValueError(f"optimizer: {name} cannot be combined with train.dp (DP-SGD)")
    if "kfac_factors" in optimizer.curvature and loss not in ("softmax_cross_entropy", "mse"):
        raise ValueError(f"loss: K-FAC's factors need a loss by name with a written Hessian "
                         f"factor, 'softmax_cross_entropy' or 'mse'; got {loss!r}")
    if not isinstance(loss, (str,)) and "logits" in optimizer.curvature:
        raise ValueError("loss: Gauss-Newton needs a loss by name (a jbp loss)")


def leaf_names(tree) -> list:
    """``keystr`` paths of a pytree's leaves, e.g. ``"['conv1']['w']"``."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def make_grad_fn(apply: Callable, loss: Union[str, Callable] = "softmax_cross_entropy", *,
                 grad: Optional[str] = None,
                 layers: Optional[LayerPolicy] = None) -> Callable:
    """A jit-compiled ``(params, model_state, x, y) -> (loss, grads)`` (train-mode forward)."""
    objective = make_loss(apply, loss, grad=grad, layers=layers)

    def grads(params, model_state, x, y):
        (loss_value, _), g = jax.value_and_grad(objective, has_aux=True)(params, model_state, x, y)
        return loss_value, g

    return jax.jit(grads)


def make_eval_step(apply: Callable, loss: Union[str, Callable] = "softmax_cross_entropy", *,
                   grad: Optional[str] = None,
                   layers: Optional[LayerPolicy] = None) -> Callable:
    """A jit-compiled ``eval_step(state, x, y) -> {"loss_sum", "correct", "labelled", "count",
    "bad_labels"}`` (eval mode); ``correct`` and ``labelled`` (the labels counted: one per
    example, or one per pixel) only when ``y`` holds class indices; with a class per pixel
    (``y`` of shape ``(N, H, W)``) also ``confusion``, the ``(K, K)`` counts of pixels of true
    class ``i`` predicted as ``j`` (labels outside ``[0, K)`` not counted).

    Sums, not means, so that batches of any size (the last partial one) add up exactly.
    ``bad_labels`` counts integer labels outside ``[0, K)``, which the compiled step cannot
    raise for (their loss is NaN, and they never count as correct); :func:`evaluate` raises.
    """
    layers = resolve(grad, layers)
    loss_fn = _loss_fn(loss, layers)

    def eval_step(state: TrainState, x, y):
        logits, _ = apply(state.params, state.model_state, x, train=False, layers=layers)
        n = x.shape[0]
        bad = ((y < 0) | (y >= logits.shape[-1])) if jnp.issubdtype(y.dtype, jnp.integer) \
            else jnp.zeros((), bool)
        out = {"loss_sum": loss_fn(logits, y) * n, "count": jnp.asarray(n, jnp.int32),
               "bad_labels": jnp.sum(bad, dtype=jnp.int32)}
        if _class_labels(logits, y):
            predicted = jnp.argmax(logits, -1)
            out["correct"] = jnp.sum(predicted == y)
            out["labelled"] = jnp.asarray(y.size, jnp.int32)
            if y.ndim > 1:
                out["confusion"] = confusion_matrix(y, predicted, logits.shape[-1])
        return out

    return jax.jit(eval_step)


def confusion_matrix(y, predicted, k: int):
    """C[i, j] = #{pixels of true class i predicted as j} (int32, (K, K)); labels outside
    [0, K) (an ignored void label) are not counted."""
    valid = (y >= 0) & (y < k)
    cell = jnp.where(valid, y * k + predicted, k * k).reshape(-1)
    return jnp.bincount(cell, length=k * k + 1)[:k * k].reshape(k, k).astype(jnp.int32)


def segmentation_scores(confusion) -> dict:
    """Pixel accuracy, per-class IoU and mIoU from a summed confusion matrix C:
    ``IoU_k = C[k,k] / (Σ_j C[k,j] + Σ_i C[i,k] − C[k,k])`` (``None`` for a class neither
    present nor predicted), mIoU their mean over the classes that have one."""
    c = np.asarray(confusion, np.float64)
    hits = np.diag(c)
    union = c.sum(0) + c.sum(1) - hits
    iou = [float(h / u) if u else None for h, u in zip(hits, union)]
    present = [v for v in iou if v is not None]
    return {"pixel_accuracy": float(hits.sum() / max(c.sum(), 1)), "iou": iou,
            "miou": float(np.mean(present)) if present else None}


def evaluate(eval_step: Callable, state: TrainState, batches) -> dict:
    """Mean loss and accuracy (``None`` unless the labels are class indices) over an iterable of
    (x, y) batches; with a class per pixel also ``pixel_accuracy``, ``iou`` (per class) and
    ``miou`` (:func:`segmentation_scores`).

    Raises ``ValueError`` naming the batch if one holds labels outside ``[0, K)``: an accuracy
    over them would be meaningless (they can never be right) and the loss is NaN.
    """
    loss_sum, correct, count, labelled, confusion = 0.0, 0, 0, 0, None
    for i, (x, y) in enumerate(batches):
        out = eval_step(state, x, y)
        if int(out.get("bad_labels", 0)):
            raise ValueError(f"labels: evaluation batch {i} has {int(out['bad_labels'])} "
                             f"label(s) outside [0, num_classes); check the data's labels "
                             f"against the model's num_classes")
        loss_sum += float(out["loss_sum"])
        correct = correct + int(out["correct"]) if "correct" in out else None
        labelled += int(out.get("labelled", out["count"]))
        if "confusion" in out:
            batch = np.asarray(out["confusion"], np.int64)
            confusion = batch if confusion is None else confusion + batch
        count += int(out["count"])
    if count == 0:
        raise ValueError("evaluate: no batches")
    result = {"loss": loss_sum / count,
              "accuracy": None if correct is None else correct / labelled, "count": count}
    if confusion is not None:
        result.update(segmentation_scores(confusion), confusion=confusion.tolist())
    return result


def tree_size(tree) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))

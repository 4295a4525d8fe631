"""Optimisers and learning-rate schedules: optax, chosen by name from two tables.

``OPTIMIZERS`` and ``SCHEDULES`` (the values a config's ``optim.optimizer`` and
``optim.schedule`` accept) are the keys of those tables, so a new entry is one line.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import optax

from jbp.train import second_order


def _with_warmup(base: optax.Schedule, lr: float, warmup_steps: int) -> optax.Schedule:
    """A linear warm-up from 0 to ``lr`` over ``warmup_steps``, then ``base``."""
    if not warmup_steps:
        return base
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), base],
                                [warmup_steps])


#: name -> (lr, total_steps, warmup_steps, boundaries, decay) -> schedule.
_SCHEDULES = {
    "constant": lambda lr, total, warmup, boundaries, decay: _with_warmup(
        optax.constant_schedule(lr), lr, warmup),
    # cosine has its own warm-up: linear from 0, then cosine to 0 at total_steps
    "cosine": lambda lr, total, warmup, boundaries, decay: optax.warmup_cosine_decay_schedule(
        0.0 if warmup else lr, lr, warmup, max(total, warmup + 1), 0.0),
    "step": lambda lr, total, warmup, boundaries, decay: _with_warmup(
        optax.piecewise_constant_schedule(lr, {int(b * total): decay for b in boundaries}),
        lr, warmup),
}
SCHEDULES = tuple(_SCHEDULES)


def make_schedule(name: str, lr: float, total_steps: int, *, warmup_steps: int = 0,
                  boundaries: Sequence[float] = (0.5, 0.75), decay: float = 0.1) -> optax.Schedule:
    """Learning-rate schedule.

    constant; cosine (linear warm-up over ``warmup_steps``, then cosine to 0 at ``total_steps``);
    step (multiply by ``decay`` at each fraction of ``total_steps`` in ``boundaries``). Any
    ``warmup_steps`` > 0 starts with a linear warm-up from 0.
    """
    if name not in _SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {name!r}")
    return _SCHEDULES[name](lr, total_steps, warmup_steps, boundaries, decay)


def _decay_mask(params):
    """Weight decay on weights (ndim > 1), not on biases or batch-norm γ/β."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


#: name -> (schedule, momentum, b1, b2, weight_decay) -> the optimiser proper.
_OPTIMIZERS = {
    "sgd": lambda lr, momentum, b1, b2, wd: optax.sgd(lr),
    "momentum": lambda lr, momentum, b1, b2, wd: optax.sgd(lr, momentum=momentum,
                                                           nesterov=False),
    "nesterov": lambda lr, momentum, b1, b2, wd: optax.sgd(lr, momentum=momentum,
                                                           nesterov=True),
    "adam": lambda lr, momentum, b1, b2, wd: optax.adam(lr, b1=b1, b2=b2),
    "adamw": lambda lr, momentum, b1, b2, wd: optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd,
                                                          mask=_decay_mask),
}
#: second-order optimisers (jbp.train.second_order): name -> (schedule, momentum, options).
_SECOND_ORDER = {
    "kfac": lambda lr, momentum, o: second_order.kfac(
        lr, momentum=momentum, **{k: o[k] for k in _KFAC_OPTIONS if k in o}),
    "gauss_newton": lambda lr, momentum, o: second_order.gauss_newton(
        lr, **{k: o[k] for k in _GN_OPTIONS if k in o}),
}
_KFAC_OPTIONS = ("damping", "damping_kind", "factor_decay", "refresh_every", "invert_every",
                 "kl_clip")
_GN_OPTIONS = ("damping", "cg_iters")
OPTIMIZERS = tuple(_OPTIMIZERS) + tuple(_SECOND_ORDER)
_DECOUPLED_DECAY = ("adamw",)       # weight decay inside the optimiser, not added to the gradient


def make_optimizer(name: str, schedule: Union[float, optax.Schedule], *, momentum: float = 0.9,
                   weight_decay: float = 0.0, clip_norm: Optional[float] = None,
                   b1: float = 0.9, b2: float = 0.999,
                   second_order_options: Optional[dict] = None) -> optax.GradientTransformation:
    """An optax chain: [clip by global norm] -> [L2 weight decay] -> optimiser.

    ``kfac`` and ``gauss_newton`` (:mod:`jbp.train.second_order`) take their options from
    ``second_order_options`` (``damping``, ``refresh_every``, ..., ``sub_batch``); their chain
    stays a :class:`jbp.train.second_order.SecondOrder`, so that ``make_train_step`` hands them
    the curvature closures they need.

    ``sgd``, ``momentum``, ``nesterov`` and ``adam`` add ``weight_decay · w`` to the gradient
    (weights only, coupled: the optimiser then scales it); ``adamw`` applies optax's decoupled
    decay inside the optimiser instead.
    """
    if name not in _OPTIMIZERS and name not in _SECOND_ORDER:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {name!r}")
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if weight_decay and name not in _DECOUPLED_DECAY:
        parts.append(optax.add_decayed_weights(weight_decay, mask=_decay_mask))
    if name in _SECOND_ORDER:
        options = dict(second_order_options or {})
        core = _SECOND_ORDER[name](schedule, momentum, options)
        if not parts:
            chained = core
        else:
            def init(params, **kw):     # optax.chain's state, core.init's keywords passed on
                return tuple(p.init(params) for p in parts) + (core.init(params, **kw),)
            chained = type(core)(init, optax.chain(*parts, core).update)
            chained.__dict__.update(vars(core))          # refresh_every, sub_batch
        chained.sub_batch = options.get("sub_batch") or None
        return chained
    parts.append(_OPTIMIZERS[name](schedule, momentum, b1, b2, weight_decay))
    return optax.chain(*parts)


def optimizer_from_config(cfg, total_steps: int) -> optax.GradientTransformation:
    """The optax optimiser described by a ``jbp.config.OptimConfig``."""
    schedule = make_schedule(cfg.schedule, cfg.lr, total_steps, warmup_steps=cfg.warmup_steps,
                             boundaries=cfg.step_boundaries, decay=cfg.step_decay)
    options = {k: getattr(cfg, k) for k in SECOND_ORDER_KEYS}
    return make_optimizer(cfg.optimizer, schedule, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm,
                          second_order_options=options)


#: The ``optim.*`` keys only ``kfac`` and ``gauss_newton`` read.
SECOND_ORDER_KEYS = ("damping", "damping_kind", "factor_decay", "refresh_every",
                     "invert_every", "kl_clip", "cg_iters", "sub_batch")

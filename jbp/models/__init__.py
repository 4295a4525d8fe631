"""Whole CNNs built only from jbp layers, as plain ``init``/``apply`` functions over pytrees.

Every model is a :class:`Model`::

    init(key, input_shape, num_classes, **options) -> (params, state)
    apply(params, state, x, *, train, layers=LayerPolicy(), **options) -> (logits, new_state)

``x`` is NHWC float32 ``(N, *input_shape)``; ``state`` holds batch-norm running statistics (an
empty dict for models without batch norm). ``layers`` is the :class:`jbp.LayerPolicy` the model
takes every layer from: ``LayerPolicy("manual")`` (the default) runs the hand-written rules,
``LayerPolicy("autodiff")`` the identical forward through ``jbp.autodiff``; params and state are
the same pytrees for both, so one checkpoint serves either. ``Model.options`` names the config
options (``ModelConfig``) the model has besides ``name`` and ``num_classes``.
"""

from __future__ import annotations

from typing import Callable, FrozenSet, NamedTuple

from jbp.policy import GRAD_MODES, LayerPolicy  # noqa: F401  (GRAD_MODES: the config's)
from jbp import _residuals


class Model(NamedTuple):
    name: str
    init: Callable
    apply: Callable
    options: FrozenSet[str] = frozenset()   # of ModelConfig's: "shortcuts", "batch_norm", "remat"


from jbp.models import lenet5, resnet, seed_cnn  # noqa: E402  (they import Model's package)

#: Every model, by name.
REGISTRY = {m.name: m for m in (seed_cnn.MODEL, lenet5.MODEL, resnet.RESNET20_MODEL,
                                resnet.RESNET18_MODEL)}
MODELS = tuple(REGISTRY)

#: ``ModelConfig.remat`` and ``.residuals`` values.
REMAT = ("none", "blocks")
RESIDUALS = _residuals.POLICIES
#: The model options of ``ModelConfig``, with the value that means "not used".
OPTION_DEFAULTS = {"remat": "none", "shortcuts": True, "batch_norm": True}


def get_model(name: str) -> Model:
    if name not in REGISTRY:
        raise ValueError(f"model: unknown model {name!r}; available: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def from_config(cfg) -> Model:
    """The model a ``jbp.config.ModelConfig`` describes, its options bound in.

    ``remat="blocks"`` wraps every residual block in ``jax.checkpoint``; ``shortcuts=False`` /
    ``batch_norm=False`` build the plain networks of the gradient-flow study. A model takes only
    the options in its ``Model.options`` (the resnets all three). The residual policy
    (``cfg.residuals``) is the layers' business, not the model's: :class:`jbp.LayerPolicy`.
    """
    model = get_model(cfg.name)
    if getattr(cfg, "remat", "none") not in REMAT:
        raise ValueError(f"model.remat: expected one of {REMAT}, got {cfg.remat!r}")
    chosen = {k: getattr(cfg, k, default) for k, default in OPTION_DEFAULTS.items()}
    unavailable = [k for k, v in chosen.items() if v != OPTION_DEFAULTS[k]
                   and k not in model.options]
    if unavailable:
        raise ValueError(f"model.{unavailable[0]}: {cfg.name} does not have this option "
                         f"(its options: {', '.join(sorted(model.options)) or 'none'})")
    if not model.options:
        return model
    init_kw = {k: chosen[k] for k in ("shortcuts", "batch_norm") if k in model.options}
    apply_kw = {k: chosen[k] for k in ("shortcuts", "remat") if k in model.options}

    def init(key, input_shape=(28, 28, 1), num_classes=10):
        return model.init(key, input_shape, num_classes, **init_kw)

    def apply(params, state, x, *, train, layers=LayerPolicy()):
        return model.apply(params, state, x, train=train, layers=layers, **apply_kw)

    return Model(model.name, init, apply, model.options)

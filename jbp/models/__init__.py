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

import functools
from typing import Callable, FrozenSet, NamedTuple

from jbp import _residuals
from jbp.models import lenet5, mobilenet, resnet, seed_cnn, unet


class Model(NamedTuple):
    name: str
    init: Callable
    apply: Callable
    options: FrozenSet[str] = frozenset()   # of ModelConfig's: "shortcuts", "batch_norm", "remat",
    #                                         "decoder", "head_init"


#: Every model, by name.
REGISTRY = {m.name: m for m in (
    Model("seed_cnn", seed_cnn.init, seed_cnn.apply),
    Model("lenet5", lenet5.init, lenet5.apply),
    Model("resnet20", resnet.init_resnet20, resnet.apply_resnet20, resnet.OPTIONS),
    Model("resnet18", resnet.init_resnet18, resnet.apply_resnet18, resnet.OPTIONS),
    Model("mobilenet_v2", mobilenet.init_mobilenet_v2, mobilenet.apply_mobilenet_v2,
          mobilenet.OPTIONS),
    Model("efficientnet_b0", mobilenet.init_efficientnet_b0, mobilenet.apply_efficientnet_b0,
          mobilenet.OPTIONS),
    Model("unet", unet.init, unet.apply, unet.OPTIONS),
)}
MODELS = tuple(REGISTRY)

#: ``ModelConfig.remat`` and ``.residuals`` values.
REMAT = ("none", "blocks")
RESIDUALS = _residuals.POLICIES
#: The model options of ``ModelConfig``, with the value that means "not used", and which of
#: ``init`` and ``apply`` takes each.
OPTION_DEFAULTS = {"remat": "none", "shortcuts": True, "batch_norm": True,
                   "decoder": "transpose", "head_init": "torchvision"}
INIT_OPTIONS = ("shortcuts", "batch_norm", "decoder", "head_init")
APPLY_OPTIONS = ("shortcuts", "remat", "decoder")
#: ``ModelConfig.decoder`` values (the U-Net's upsampling).
DECODERS = unet.DECODERS
#: ``ModelConfig.head_init`` values (MobileNetV2's and EfficientNet-B0's classifier).
HEAD_INITS = mobilenet.HEAD_INITS


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
    init_kw = {k: chosen[k] for k in INIT_OPTIONS if k in model.options}
    apply_kw = {k: chosen[k] for k in APPLY_OPTIONS if k in model.options}
    return model._replace(init=functools.partial(model.init, **init_kw),
                          apply=functools.partial(model.apply, **apply_kw))

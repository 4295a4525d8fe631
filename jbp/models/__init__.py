"""Whole CNNs built only from jbp layers, as plain ``init``/``apply`` functions over pytrees.

Every model module defines::

    init(key, input_shape=(28, 28, 1), num_classes=10) -> (params, state)
    apply(params, state, x, *, train, grad="manual") -> (logits, new_state)

``x`` is NHWC float32 ``(N, *input_shape)``; ``state`` holds batch-norm running statistics (an
empty dict for models without batch norm). ``grad="manual"`` runs the hand-written rules
(``jbp``), ``grad="autodiff"`` the identical forward through ``jbp.autodiff``; params and state
are the same pytrees for both, so one checkpoint serves either.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Callable, NamedTuple

from jbp import _residuals

GRAD_MODES = ("manual", "autodiff")


def layers(grad) -> ModuleType:
    """The layer namespace for a gradient mode: ``jbp.manual`` or ``jbp.autodiff``.

    ``grad`` may also be a namespace object itself (anything with the layer functions as
    attributes), which is returned unchanged: that is how a residual policy
    (:func:`policy_layers`) or the X-ray's instrumented namespace (``jbp.xray``) reaches a
    model's forward without the model knowing.
    """
    import jbp  # noqa: PLC0415 (jbp imports this package lazily)
    if not isinstance(grad, str) and hasattr(grad, "conv2d"):
        return grad
    if grad == "manual":
        return jbp.manual
    if grad == "autodiff":
        return jbp.autodiff
    raise ValueError(f"grad: expected one of {GRAD_MODES}, got {grad!r}")


class Model(NamedTuple):
    name: str
    init: Callable
    apply: Callable


def get_model(name: str) -> Model:
    from jbp.models import lenet5, resnet, seed_cnn  # noqa: PLC0415
    registry = {
        "seed_cnn": Model("seed_cnn", seed_cnn.init, seed_cnn.apply),
        "lenet5": Model("lenet5", lenet5.init, lenet5.apply),
        "resnet20": Model("resnet20", resnet.init_resnet20, resnet.apply_resnet20),
        "resnet18": Model("resnet18", resnet.init_resnet18, resnet.apply_resnet18),
    }
    if name not in registry:
        raise ValueError(f"model: unknown model {name!r}; available: {', '.join(registry)}")
    return registry[name]


MODELS = ("seed_cnn", "lenet5", "resnet20", "resnet18")


# --- model options from a config: memory policies, plain (shortcut-free) networks ---------------

REMAT = ("none", "blocks")
RESIDUALS = _residuals.POLICIES


class _PolicyLayers:
    """``nn`` with ``residuals=policy`` bound into the rules that take it (conv2d, batch_norm,
    and relu, which then keeps a mask instead of its output)."""

    def __init__(self, nn, residuals):
        self._nn, self._residuals = nn, residuals

    def __getattr__(self, name):
        fn = getattr(self._nn, name)
        if name in ("conv2d", "batch_norm", "relu"):
            return functools.partial(fn, residuals=self._residuals)
        return fn


def policy_layers(grad, residuals: str = "exact"):
    """The layer namespace of ``grad`` whose convolution and batch-norm rules save their input
    for the backward as ``residuals`` (``"exact"``, ``"bf16"``, ``"int8"``; jbp.layers.conv)."""
    if residuals not in RESIDUALS:
        raise ValueError(f"residuals: expected one of {RESIDUALS}, got {residuals!r}")
    nn = layers(grad)
    return nn if residuals == "exact" else _PolicyLayers(nn, residuals)


def from_config(cfg) -> Model:
    """The model a ``jbp.config.ModelConfig`` describes, its options bound in.

    ``remat="blocks"`` wraps every residual block in ``jax.checkpoint`` (resnets only);
    ``residuals`` is the rules' residual policy (:func:`policy_layers`; manual gradients only:
    JAX's autodiff keeps its own residuals); ``shortcuts=False`` / ``batch_norm=False`` build the
    plain networks of the gradient-flow study (resnets only).
    """
    model = get_model(cfg.name)
    remat = getattr(cfg, "remat", "none")
    residuals = getattr(cfg, "residuals", "exact")
    shortcuts, bn = getattr(cfg, "shortcuts", True), getattr(cfg, "batch_norm", True)
    if remat not in REMAT:
        raise ValueError(f"model.remat: expected one of {REMAT}, got {remat!r}")
    if residuals not in RESIDUALS:
        raise ValueError(f"model.residuals: expected one of {RESIDUALS}, got {residuals!r}")
    resnet_only = {"remat": remat != "none", "shortcuts": not shortcuts, "batch_norm": not bn}
    if not cfg.name.startswith("resnet") and any(resnet_only.values()):
        bad = next(k for k, v in resnet_only.items() if v)
        raise ValueError(f"model.{bad}: only the resnets have this option, not {cfg.name}")
    init_kw = {} if not cfg.name.startswith("resnet") else {"shortcuts": shortcuts,
                                                           "batch_norm": bn}
    apply_kw = {"shortcuts": shortcuts, "remat": remat} if init_kw else {}
    if not init_kw and residuals == "exact":
        return model

    def init(key, input_shape=(28, 28, 1), num_classes=10):
        return model.init(key, input_shape, num_classes, **init_kw)

    def apply(params, state, x, *, train, grad="manual"):
        if residuals != "exact" and isinstance(grad, str):
            if grad != "manual":
                raise ValueError(f"model.residuals={residuals!r} is a policy of jbp's rules; "
                                 f"with grad={grad!r} JAX keeps its own residuals")
            grad = policy_layers(grad, residuals)
        return model.apply(params, state, x, train=train, grad=grad, **apply_kw)

    return Model(model.name, init, apply)

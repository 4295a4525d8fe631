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

from types import ModuleType
from typing import Callable, NamedTuple

GRAD_MODES = ("manual", "autodiff")


def layers(grad: str) -> ModuleType:
    """The layer namespace for a gradient mode: ``jbp.manual`` or ``jbp.autodiff``."""
    import jbp  # noqa: PLC0415 (jbp imports this package lazily)
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

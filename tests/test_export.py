"""GPU/TPU lowering without the hardware: every model's train step exports for ("cuda",) and
("tpu",) (``jax.export``), and the manual step's module holds exactly as many convolutions as
the autodiff step's: the CPU-only formulations of the convolution rule (chosen through
``lax.platform_dependent``) leave nothing behind on those platforms.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from jbp.models import MODELS, get_model
from jbp.train import init_train_state, make_optimizer, make_train_step

#: Outside the fast loop (``pytest -m 'not slow'``): lowering for other platforms. CI runs it.
pytestmark = pytest.mark.slow

SHAPES = {"seed_cnn": (28, 28, 1), "lenet5": (28, 28, 1), "resnet20": (32, 32, 3),
          "resnet18": (32, 32, 3), "mobilenet_v2": (32, 32, 3), "efficientnet_b0": (32, 32, 3),
          "unet": (16, 16, 1)}
BATCH = 4


def _export_text(model_name, grad, platform):
    model = get_model(model_name)
    opt = make_optimizer("momentum", 0.1)
    shape = SHAPES[model_name]
    state = jax.eval_shape(lambda: init_train_state(model, opt, jax.random.key(0), shape, 10))
    step = make_train_step(model.apply, opt, grad=grad, donate=False)
    x = jax.ShapeDtypeStruct((BATCH, *shape), jnp.float32)
    y = jax.ShapeDtypeStruct((BATCH, *shape[:2]) if model_name == "unet" else (BATCH,),
                             jnp.int32)                     # the U-Net: a class per pixel
    exported = jax.export.export(step, platforms=(platform,))(state, x, y)
    assert exported.platforms == (platform,)
    return exported.mlir_module()


def _count(text, op):
    return len(re.findall(rf"\b{re.escape(op)}\b", text))


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("model_name", MODELS)
def test_manual_step_exports_with_autodiffs_convolutions(model_name, platform):
    manual = _export_text(model_name, "manual", platform)
    autodiff = _export_text(model_name, "autodiff", platform)
    n_manual = _count(manual, "stablehlo.convolution")
    n_autodiff = _count(autodiff, "stablehlo.convolution")
    assert n_autodiff > 0
    assert n_manual == n_autodiff, (n_manual, n_autodiff)

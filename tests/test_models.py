"""Models: shapes, parameter counts by hand, and manual == autodiff gradients in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import LayerPolicy, gradcheck, train
from jbp.models import MODELS, get_model

SHAPES = {"seed_cnn": (6, 6, 1), "lenet5": (28, 28, 1), "resnet20": (12, 12, 3),
          "resnet18": (32, 32, 3), "mobilenet_v2": (32, 32, 3), "efficientnet_b0": (32, 32, 3),
          "unet": (12, 10, 1)}
# The inverted-residual networks' float64 compiles take minutes on two cores: outside the fast
# loop (tests/test_torch_weights.py checks them against torchvision, tests/test_mobilenet.py
# their random layers and memory policies); so is the U-Net's (a per-pixel loss).
_SLOW_MODELS = ("mobilenet_v2", "efficientnet_b0", "unet")
# Training mode of the inverted-residual networks is checked by
# tests/test_torch_weights.py::test_model_equals_torchvision_float64 instead: manual and autodiff
# gradients each against torchvision's to 1e-10, at 64x64. Here, at 32x32, a projection's
# batch-norm beta feeds only a convolution and the next training-mode batch norm: its exact
# gradient is 0, both sides return rounding noise (1e-12) and a relative comparison fails.
_TRAIN_CHECKED_ELSEWHERE = ("mobilenet_v2", "efficientnet_b0")
MODEL_MODES = [pytest.param(m, mode, id=f"{'train' if mode else 'eval'}-{m}",
                            marks=[pytest.mark.slow] if m in _SLOW_MODELS else [])
               for mode in (True, False) for m in MODELS
               if not (mode and m in _TRAIN_CHECKED_ELSEWHERE)]


def test_lenet5_parameter_count_by_hand():
    params, state = get_model("lenet5").init(jax.random.key(0), (28, 28, 1), 10)
    by_hand = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) \
        + (84 * 10 + 10)
    assert train.tree_size(params) == by_hand == 61706 and state == {}


def test_resnet18_parameter_count_matches_torchvision():
    """torchvision's resnet18() (1000 classes) has 11,689,512 parameters; BN γ/β included."""
    params, _ = get_model("resnet18").init(jax.random.key(0), (224, 224, 3), 1000)
    assert train.tree_size(params) == 11_689_512


def test_resnet20_parameter_count_by_hand():
    """3x3 convs without bias + BN (2 per channel) + 1x1 projections + fc, counted by hand."""
    conv = lambda cin, cout: 9 * cin * cout + 2 * cout          # noqa: E731
    total = conv(3, 16)
    cin = 16
    for cout in (16, 32, 64):
        for j in range(3):
            total += conv(cin, cout) + conv(cout, cout)
            if cin != cout:
                total += cin * cout + 2 * cout                  # 1x1 projection + BN
            cin = cout
    total += 64 * 10 + 10
    params, _ = get_model("resnet20").init(jax.random.key(0), (32, 32, 3), 10)
    assert train.tree_size(params) == total


@pytest.mark.parametrize("name, train_mode", MODEL_MODES)
def test_manual_gradients_match_autodiff_float64(name, train_mode):
    model = get_model(name)
    shape = SHAPES[name]
    params, state = model.init(jax.random.key(1), shape, 5)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    state = jax.tree.map(lambda s: s.astype(jnp.float64), state)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, *shape)))
    y = jnp.asarray(rng.integers(0, 5, (3, *shape[:2]) if name == "unet" else 3))
    if name == "resnet18":
        x = x[:2]
        y = y[:2]

    def loss(grad):
        def f(p):
            logits, new_state = model.apply(p, state, x, train=train_mode,
                                              layers=LayerPolicy(grad))
            ns = __import__("jbp").manual if grad == "manual" else __import__("jbp").autodiff
            return ns.softmax_cross_entropy(logits, y), new_state
        return f

    (lm, sm), gm = jax.jit(jax.value_and_grad(loss("manual"), has_aux=True))(params)
    (la, sa), ga = jax.jit(jax.value_and_grad(loss("autodiff"), has_aux=True))(params)
    assert float(lm) == pytest.approx(float(la), rel=1e-12)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(gm)[0]]
    result = gradcheck.compare("manual", "autodiff", jax.tree.leaves(gm), jax.tree.leaves(ga),
                               names, rtol=1e-9, atol=1e-12)
    assert result.ok, str(result)
    for a, b in zip(jax.tree.leaves(sm), jax.tree.leaves(sa)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


@pytest.mark.parametrize("name,shape", [("lenet5", (32, 32, 3)), ("resnet20", (28, 28, 1)),
                                        ("resnet20", (32, 32, 3)), ("seed_cnn", (2, 2, 1))])
def test_shapes(name, shape):
    model = get_model(name)
    params, state = model.init(jax.random.key(0), shape, 7)
    logits, new_state = model.apply(params, state, jnp.ones((2, *shape), jnp.float32),
                                    train=True)
    assert logits.shape == (2, 7)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match=r"model: unknown model 'vgg'"):
        get_model("vgg")
    model = get_model("lenet5")
    params, state = model.init(jax.random.key(0), (28, 28, 1), 10)
    with pytest.raises(ValueError, match=r"grad: expected one of \('manual', 'autodiff'\)"):
        LayerPolicy("forward")
    with pytest.raises(TypeError, match=r"layers: expected a jbp.LayerPolicy"):
        model.apply(params, state, jnp.ones((1, 28, 28, 1)), train=True, layers="autodiff")
    with pytest.raises(ValueError, match=r"x: expected a batch of NHWC images"):
        model.apply(params, state, jnp.ones((28, 28, 1), jnp.float32), train=True)
    with pytest.raises(TypeError, match=r"w: dtype float32 differs from x dtype float64"):
        model.apply(params, state, jnp.ones((1, 28, 28, 1), jnp.float64), train=True)

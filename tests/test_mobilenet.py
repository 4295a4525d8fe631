"""MobileNetV2 and EfficientNet-B0 (jbp/models/mobilenet.py) beyond the torchvision comparison
(tests/test_torch_weights.py): parameter counts, their random layers with a key (manual ==
autodiff with the same masks, and the masks really act), the memory policies and bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import config, gradcheck, models, train
from jbp.models import get_model, mobilenet
from jbp.policy import LayerPolicy


@pytest.mark.parametrize("name,count", [("mobilenet_v2", 3_504_872),
                                        ("efficientnet_b0", 5_288_548)])
def test_parameter_counts_are_torchvisions(name, count):
    """torchvision's documented ``num_params`` (its weights' meta) at 1000 classes."""
    params, _ = jax.eval_shape(lambda: get_model(name).init(jax.random.key(0),
                                                            (224, 224, 3), 1000))
    assert train.tree_size(params) == count


def test_stochastic_depth_schedule_and_se_widths():
    """torchvision's: block i of 16 gets 0.2·i/16 (those with a shortcut), SE width
    max(1, C_in // 4) of the block's input."""
    blocks = mobilenet.EFFICIENTNET_B0.blocks(0.2)
    assert len(blocks) == 16
    for i, b in enumerate(blocks):
        assert b.drop_rate == (pytest.approx(0.2 * i / 16) if b.shortcut else 0.0)
    assert [b.drop_rate > 0 for b in blocks].count(True) == 9
    params, _ = jax.eval_shape(lambda: get_model("efficientnet_b0").init(
        jax.random.key(0), (32, 32, 3), 10))
    for b, p in zip(blocks, params["blocks"]):
        assert p["se"]["fc1"]["w"].shape == (b.hidden, max(1, b.cin // 4))


def test_bad_arguments():
    model = get_model("efficientnet_b0")
    with pytest.raises(ValueError, match=r"input_shape: efficientnet_b0 needs images of at "
                                         r"least 32×32"):
        model.init(jax.random.key(0), (28, 28, 1), 10)
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), (32, 32, 1), 10))
    with pytest.raises(ValueError, match=r"stochastic_depth: expected a rate in \[0, 1\)"):
        model.apply(params, state, jnp.zeros((2, 32, 32, 1)), train=True, stochastic_depth=1.0)
    with pytest.raises(ValueError, match=r"x: efficientnet_b0 needs images of at least"):
        model.apply(params, state, jnp.zeros((2, 28, 28, 1)), train=True)
    with pytest.raises(TypeError, match=r"key: expected a PRNG key"):
        model.apply(params, state, jnp.zeros((2, 32, 32, 1)), train=True, key=jnp.zeros(3))


@pytest.mark.slow
def test_random_layers_manual_equals_autodiff_and_act():
    """EfficientNet-B0's blocks (tests/_tiny_nets.py: every kind of block B0 has, at a tiny
    size; B0's own gradients are tests/test_models.py's and tests/test_torch_weights.py's) in
    float64, training mode with a key (dropout 0.5, stochastic depth 0.6 so that some of batch
    4's branches drop): the hand-written rules' gradients equal autodiff's (same masks: both draw
    them from the key outside the rules), and differ from the key-less (mask-free) gradients, so
    the masks act."""
    from _tiny_nets import TINY_EFFICIENTNET as model  # noqa: PLC0415
    params, state = model.init(jax.random.key(0), (32, 32, 3), 5)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)))
    y = jnp.array([0, 1, 2, 3])
    key = jax.random.key(3)

    def grads(grad, key, stochastic_depth=0.6):
        ns = jbp if grad == "manual" else jbp.autodiff

        def loss(p):
            kw = {} if key is None else {"key": key}
            logits, _ = model.apply(p, state, x, train=True, layers=LayerPolicy(grad),
                                    dropout=0.5, stochastic_depth=stochastic_depth, **kw)
            return ns.softmax_cross_entropy(logits, y)
        return jax.grad(loss)(params)

    manual, autodiff, unmasked, undropped = jax.jit(lambda: (
        grads("manual", key), grads("autodiff", key), grads("manual", None),
        grads("manual", key, stochastic_depth=0.0)))()
    names = train.leaf_names(manual)
    result = gradcheck.compare("manual", "autodiff", jax.tree.leaves(manual),
                               jax.tree.leaves(autodiff), names, rtol=1e-9, atol=1e-12)
    assert result.ok, str(result)
    fc = np.asarray(manual["fc"]["w"])
    assert np.max(np.abs(fc - np.asarray(unmasked["fc"]["w"]))) > 1e-3 * np.max(np.abs(fc))
    # stochastic depth acts: the one block with a shortcut (rate 0.6 · 2/4) drops a branch of
    # the batch, which changes its own gradient against the same step without stochastic depth
    branch = np.asarray(manual["blocks"][2]["project"]["w"])
    assert np.max(np.abs(branch - np.asarray(undropped["blocks"][2]["project"]["w"]))) \
        > 1e-3 * np.max(np.abs(branch))


@pytest.mark.slow
def test_memory_policies_and_bf16_train_step():
    """MobileNetV2 under ``model.remat = "blocks"`` with ``residuals = "int8"``, and a bf16
    step: the remat'd int8 gradient is the plain one to the int8 residuals' error (cosine), and
    a bf16 train step's loss is the float32 step's to 5% (bf16 keeps 8 significant bits,
    2^-9 relative per rounding, over 52 convolution/batch-norm layers). 64×64 images: at 32×32
    the last stages normalise 4 values per channel at 1×1, where batch norm divides differences
    by √ε and amplifies rounding (tests/test_torch_weights.py measures it), and float32 itself
    is no reference there."""
    cfg = config.ModelConfig(name="mobilenet_v2", remat="blocks", residuals="int8")
    plain, policy = get_model("mobilenet_v2"), models.from_config(cfg)
    opt = optax.sgd(0.01)
    state = train.init_train_state(plain, opt, jax.random.key(0), (64, 64, 1), 10)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 64, 64, 1)), jnp.float32)
    y = jnp.array([0, 1, 2, 3])
    _, g_plain = train.make_grad_fn(plain.apply)(state.params, state.model_state, x, y)
    _, g_policy = train.make_grad_fn(policy.apply, layers=LayerPolicy(residuals="int8"))(
        state.params, state.model_state, x, y)
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_plain)])
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g_policy)])
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99
    assert not np.array_equal(a, b)                  # the int8 residuals did change something
    f32 = train.make_train_step(plain.apply, opt, donate=False)
    bf16 = train.make_train_step(plain.apply, opt, donate=False, precision="bf16")
    _, m32 = f32(state, x, y)
    _, m16 = bf16(state, x, y)
    assert bool(m16["finite"])
    assert abs(float(m16["loss"]) - float(m32["loss"])) < 0.05 * abs(float(m32["loss"]))


def test_head_init_zeros_changes_the_classifier_only():
    """``model.head_init = "zeros"``: the classifier's W starts at 0 (uniform predictions); every
    other leaf is torchvision's init of the same key (the four-block EfficientNet of
    tests/_tiny_nets.py, built by the same ``_init``; the config reaches B0's init). torchvision's
    EfficientNet classifier is U(±1/√num_classes): at 10 classes its largest |W| is near 1/√10."""
    from _tiny_nets import SPEC  # noqa: PLC0415
    cfg = config.from_dict({"model": {"name": "efficientnet_b0", "head_init": "zeros"}})
    assert models.from_config(cfg.model).init.keywords == {"head_init": "zeros"}
    got, _ = mobilenet._init(SPEC, jax.random.key(0), (32, 32, 1), 10, "zeros")
    want, _ = mobilenet._init(SPEC, jax.random.key(0), (32, 32, 1), 10)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert not np.any(np.asarray(got["fc"]["w"]))
    assert 0.9 / np.sqrt(10) < float(np.max(np.abs(want["fc"]["w"]))) <= 1 / np.sqrt(10)
    del got["fc"], want["fc"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(config.ConfigError, match=r"model.head_init"):
        config.from_dict({"model": {"name": "efficientnet_b0", "head_init": "ones"}})
    with pytest.raises(ValueError, match=r"model.head_init: resnet20 does not have this option"):
        models.from_config(config.from_dict({"model": {"name": "resnet20",
                                                       "head_init": "zeros"}}).model)


def test_parameters_are_float32_under_x64():
    """The suite runs with jax_enable_x64: every initial parameter and statistic is float32
    all the same (a float64 leaf would meet float32 images in the first layer)."""
    for name in ("mobilenet_v2", "efficientnet_b0"):
        tree = jax.eval_shape(lambda: get_model(name).init(jax.random.key(0), (32, 32, 3), 10))
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}, name


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_mnist_configs_pad_to_32(name):
    """configs/<name>_mnist.toml: the shipped MNIST with a 2-pixel zero border, 32×32 (the
    nets' smallest input), the original pixels unchanged inside it."""
    import os  # noqa: PLC0415

    from jbp import data  # noqa: PLC0415
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = config.load(os.path.join(root, "configs", f"{name}_mnist.toml"),
                      ["data.train_limit=5", "data.test_limit=5"])
    assert cfg.model.name == name and cfg.data.pad == 2
    train_set, test_set = data.load_dataset(cfg.data, 10)
    plain, _ = data.load_dataset(config.from_dict({"data": {"train_limit": 5}}).data, 10)
    assert train_set.x.shape[1:] == test_set.x.shape[1:] == (32, 32, 1)
    np.testing.assert_array_equal(train_set.x[:, 2:30, 2:30], plain.x)
    assert not train_set.x[:, :2].any() and not train_set.x[:, 30:].any()
    assert not train_set.x[:, :, :2].any() and not train_set.x[:, :, 30:].any()

"""jbp.torch_weights and the torchvision architectures: torchvision's own models with random
weights, batch norm's affine parameters and running statistics randomised too, against jbp's
models loaded through ``from_torch``, in float64: train-mode logits and loss, every parameter's
gradient from the hand-written rules and from autodiff, the updated running statistics, and
the eval-mode logits after that update, each to 1e-10 of its largest entry (a gradient that is
zero but for rounding to 1e-10 of the model's largest gradient entry). Batch 2 of 64×64
images, one compiled program per model (marked slow). The conversion's round trip and its
errors are checked without compiling anything.

Why 64×64 and not 32×32: at 32×32 the last stages run at 1×1, so training-mode batch norm
normalises M = 2 values per channel, ``x̂ = (a − b)/√((a − b)² + 4ε)``, which divides a
difference by √ε ≈ 3e-3 layer after layer. The network is then ill-conditioned: torchvision
itself, given the input perturbed by 1e-15 relative, moves its MobileNetV2 logits by 2e-8
relative (EfficientNet-B0 2e-8, ResNet-18 1e-11), so no two float64 implementations can agree to
1e-10 there. At 64×64 (2×2 at the end, M = 8) the same perturbation moves them by ≤ 2e-13.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import torch_weights
from jbp.models import get_model
from jbp.policy import LayerPolicy
from jbp.testing import torchvision_loader

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 5
RTOL = 1e-10


def _torchvision():
    pytest.importorskip("torch")
    try:
        return torchvision_loader.torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed (the [torch] extra)")


def _torch_model(name):
    tv = _torchvision()
    import torch  # noqa: PLC0415
    kwargs = {"resnet18": {}, "mobilenet_v2": {"dropout": 0.0},
              "efficientnet_b0": {"dropout": 0.0, "stochastic_depth_prob": 0.0}}[name]
    torch.manual_seed(0)
    model = getattr(tv.models, name)(num_classes=NUM_CLASSES, **kwargs).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen,
                                                     dtype=torch.float64))
                module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen,
                                                    dtype=torch.float64))
                module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape,
                                                            generator=gen, dtype=torch.float64))
                module.running_var.copy_(0.5 + 1.5 * torch.rand(
                    module.running_var.shape, generator=gen, dtype=torch.float64))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and \
                    module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen,
                                                    dtype=torch.float64))
    return model


def _close(name, got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    scale = max(float(np.max(np.abs(want))), 1e-300)
    err = float(np.max(np.abs(got - want))) / scale
    assert err <= RTOL, f"{name}: max |jbp − torch| / max |torch| = {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("name", torch_weights.MODELS)
def test_model_equals_torchvision_float64(name):
    import torch  # noqa: PLC0415
    model = _torch_model(name)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 64, 64, 3))
    y = np.array([1, 3])

    # torchvision, train mode: logits, loss, gradients, updated running statistics; then eval.
    model.train()
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=False)
    logits_t = model(xt)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.tensor(y))
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in model.named_parameters()}
    stats_t = {k: v.numpy().copy() for k, v in model.state_dict().items()
               if k.endswith(("running_mean", "running_var"))}
    model.eval()
    with torch.no_grad():
        eval_t = model(xt).numpy()

    params, state = torch_weights.from_torch(name, state_dict, dtype=jnp.float64)
    apply = get_model(name).apply
    xj, yj = jnp.asarray(x), jnp.asarray(y)

    def run(grad):
        ns = jbp if grad == "manual" else jbp.autodiff

        def loss(p):
            logits, new_state = apply(p, state, xj, train=True, layers=LayerPolicy(grad))
            return ns.softmax_cross_entropy(logits, yj), (logits, new_state)
        (value, (logits, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return value, logits, grads, new_state

    @jax.jit
    def everything():                       # one compiled program per model
        manual, autodiff = run("manual"), run("autodiff")
        eval_logits, _ = apply(params, manual[3], xj, train=False)
        return manual, autodiff, eval_logits

    manual, autodiff, eval_j = everything()
    for label, (value, logits, grads, new_state) in (("manual", manual), ("autodiff", autodiff)):
        _close(f"{label} logits", logits, logits_t.detach().numpy())
        _close(f"{label} loss", value, loss_t.item())
        as_torch = torch_weights.to_torch(name, grads, new_state)
        assert set(grads_t) <= set(as_torch)
        largest = max(float(np.max(np.abs(g))) for g in grads_t.values())
        bad = []
        for key, want in grads_t.items():
            got = as_torch[key]
            if np.max(np.abs(want)) <= RTOL * largest:
                # Zero but for rounding: a batch norm's β (or a bias) that feeds, through a
                # convolution, the next training-mode batch norm only, which subtracts the
                # batch mean and with it any constant shift: ∂L/∂β = 0 exactly. Both sides must
                # be zero to 1e-10 of the model's largest gradient entry.
                err = float(np.max(np.abs(got))) / largest
            else:
                err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            if not err <= RTOL:
                bad.append(f"{key} {err:.2e}")
        assert not bad, f"{label} gradients off by more than {RTOL}: {bad}"
        for key, want in stats_t.items():
            _close(f"{label} {key}", as_torch[key], want)
    _close("eval logits", eval_j, eval_t)


@pytest.mark.parametrize("name", torch_weights.MODELS)
def test_round_trip_and_torchvision_loads_it(name):
    import torch  # noqa: PLC0415
    model = _torch_model(name)
    state_dict = model.state_dict()
    assert list(state_dict) == torch_weights.torch_keys(name)      # the same names, in order
    params, state = torch_weights.from_torch(name, state_dict, dtype=jnp.float64)
    back = torch_weights.to_torch(name, params, state)
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    other = _torch_model(name)
    other.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    # numpy input (a safetensors file) converts the same
    params_np, _ = torch_weights.from_torch(name, {k: v.numpy() for k, v in state_dict.items()},
                                            dtype=jnp.float64)
    for a, b in zip(jax.tree.leaves(params_np), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    want = jax.eval_shape(lambda: get_model(name).init(jax.random.key(0), (32, 32, 3),
                                                       NUM_CLASSES))
    assert jax.tree.structure(want) == jax.tree.structure((params, state))


def test_conversion_errors_name_the_key():
    model = _torch_model("mobilenet_v2")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    missing = dict(sd)
    del missing["features.3.conv.1.0.weight"]
    with pytest.raises(ValueError, match=r"missing key 'features.3.conv.1.0.weight'"):
        torch_weights.from_torch("mobilenet_v2", missing)
    extra = {**sd, "features.99.weight": np.zeros(3)}
    with pytest.raises(ValueError, match=r"unexpected key 'features.99.weight' for mobilenet_v2"):
        torch_weights.from_torch("mobilenet_v2", extra)
    bad = {**sd, "features.2.conv.2.weight": np.zeros((24, 95, 1, 1))}
    with pytest.raises(ValueError, match=r"state_dict\['features.2.conv.2.weight'\]: has shape "
                                         r"\(24, 95, 1, 1\), mobilenet_v2 expects \(24, 96, 1, 1\)"):
        torch_weights.from_torch("mobilenet_v2", bad)
    with pytest.raises(ValueError, match=r"looks like a state_dict of mobilenet_v2, not "
                                         r"efficientnet_b0"):
        torch_weights.from_torch("efficientnet_b0", sd)
    with pytest.raises(ValueError, match=r"model_name: expected one of"):
        torch_weights.from_torch("vgg16", sd)


def test_convert_script_writes_weights_that_init_from_loads(tmp_path):
    """scripts/convert_torch_weights.py on a .pth and a .safetensors file of torchvision's
    MobileNetV2: the jbp checkpoint it writes restores (``model.init_from``'s loader) to exactly
    ``from_torch`` of the same state_dict, in float32."""
    import importlib.util  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    from jbp import checkpoint  # noqa: PLC0415
    spec = importlib.util.spec_from_file_location(
        "convert_torch_weights", ROOT / "scripts" / "convert_torch_weights.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = _torch_model("mobilenet_v2").float()
    sd = model.state_dict()
    want, want_state = torch_weights.from_torch("mobilenet_v2", sd)
    torch.save(sd, tmp_path / "m.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    like = jax.eval_shape(lambda: get_model("mobilenet_v2").init(jax.random.key(0), (32, 32, 3),
                                                                  NUM_CLASSES))
    for name in ("m.pth", "m.safetensors"):
        path = script.main(["mobilenet_v2", str(tmp_path / name), str(tmp_path / name[2:])])
        params, state = checkpoint.restore_weights(path, *like)
        for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((want, want_state))):
            np.testing.assert_array_equal(a, b)
    other = jax.eval_shape(lambda: get_model("mobilenet_v2").init(jax.random.key(0),
                                                                   (32, 32, 3), 10))
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf .params\['fc'\]\['b'\] has shape "
                                                         r"\(5,\), the model's has \(10,\)"):
        checkpoint.restore_weights(path, *other)


def test_fit_starts_from_init_from(tmp_path):
    """``model.init_from``: a run starts from the checkpoint's weights, not its seed's. LeNet-5
    (cheap to compile), weights of another seed, one step at a learning rate of 1e-12: the
    run's checkpoint holds those weights (to float32 rounding), not the seed's."""
    from jbp import checkpoint, config, train  # noqa: PLC0415
    model = get_model("lenet5")
    params, state = model.init(jax.random.key(123), (28, 28, 1), 10)
    path = checkpoint.save(str(tmp_path / "w"), checkpoint.Weights(params, state, 0))
    cfg = config.from_dict({"model": {"name": "lenet5", "init_from": path},
                            "data": {"train_limit": 64, "test_limit": 64},
                            "optim": {"lr": 1e-12, "optimizer": "sgd"},
                            "train": {"epochs": 1, "batch_size": 32, "data_parallel": "off"}})
    train.fit(cfg, str(tmp_path / "run"), max_steps=1, verbose=False)
    ckpt = checkpoint.checkpoint_paths(str(tmp_path / "run"))[-1]
    trained, _ = checkpoint.restore_weights(ckpt, params, state)
    seed_params, _ = model.init(jax.random.split(jax.random.key(0))[0], (28, 28, 1), 10)
    for a, b, c in zip(jax.tree.leaves(trained), jax.tree.leaves(params),
                       jax.tree.leaves(seed_params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
        if np.ndim(a) > 1:                       # the weights (both inits' biases are zeros)
            assert not np.allclose(a, c)
    with pytest.raises(config.ConfigError, match=r"model.init_from: no such file"):
        config.from_dict({"model": {"init_from": str(tmp_path / "none.npz")}})


def test_init_fresh_gives_a_new_head(tmp_path):
    """``model.init_fresh``: fine-tuning a checkpoint of 5 classes into a model of 10, the named
    head starts from the run's own initialisation and every other leaf from the checkpoint.
    LeNet-5 (its head is ``fc3``), one step at a learning rate of 1e-12."""
    from jbp import checkpoint, config, train  # noqa: PLC0415
    model = get_model("lenet5")
    params, state = model.init(jax.random.key(123), (28, 28, 1), 5)
    path = checkpoint.save(str(tmp_path / "w"), checkpoint.Weights(params, state, 0))
    run = {"model": {"name": "lenet5", "init_from": path, "init_fresh": ["fc3"]},
           "data": {"train_limit": 64, "test_limit": 64},
           "optim": {"lr": 1e-12, "optimizer": "sgd"},
           "train": {"epochs": 1, "batch_size": 32, "data_parallel": "off"}}
    train.fit(config.from_dict(run), str(tmp_path / "run"), max_steps=1, verbose=False)
    seed_params, seed_state = model.init(jax.random.split(jax.random.key(0))[0], (28, 28, 1), 10)
    ckpt = checkpoint.checkpoint_paths(str(tmp_path / "run"))[-1]
    trained, _ = checkpoint.restore_weights(ckpt, seed_params, seed_state)
    for name in params:
        want = seed_params[name] if name == "fc3" else params[name]
        for a, b in zip(jax.tree.leaves(trained[name]), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    assert trained["fc3"]["w"].shape == (84, 10)
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf .params\['fc3'\]\['b'\] has "
                                                         r"shape \(5,\).*model.init_fresh"):
        checkpoint.restore_weights(path, seed_params, seed_state)
    with pytest.raises(checkpoint.CheckpointError, match=r"model.init_fresh: 'head' is not a "
                                                         r"top-level parameter"):
        checkpoint.restore_weights(path, seed_params, seed_state, fresh=("head",))
    with pytest.raises(config.ConfigError, match=r"model.init_fresh: .*init_from, which is not"):
        config.from_dict({"model": {"init_fresh": ["fc3"]}})


def test_batch_norm_entry_of_the_wrong_length_is_named():
    model = _torch_model("resnet18")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    sd["layer1.0.bn2.running_var"] = np.ones(65)
    with pytest.raises(ValueError, match=r"state_dict\['layer1.0.bn2.running_var'\]: has shape "
                                         r"\(65,\), resnet18 expects \(64,\)"):
        torch_weights.from_torch("resnet18", sd)

"""DP-SGD (jbp.train.privacy): the clipped gradient from the rules' norms and a second backward
against clipping the vmap(grad) per-example gradients of the autodiff twin, in float64; the noise's
scale; ε against hand-computed RDP bounds of the Gaussian mechanism; config and messages."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import config
from jbp.policy import LayerPolicy
from jbp.train import TrainState, make_train_step, privacy


def init(key):
    k = jax.random.split(key, 4)
    return {"conv": {"w": jax.random.normal(k[0], (3, 3, 2, 3)) / 3, "b": jnp.zeros(3)},
            "fc": {"w": jax.random.normal(k[1], (48, 4)) / 5,
                   "b": jax.random.normal(k[2], (4,)) / 5}}


def apply(params, state, x, *, train, layers=LayerPolicy()):
    h = layers.relu(layers.conv2d(x, params["conv"]["w"], params["conv"]["b"], stride=2))
    return layers.dense(layers.flatten(h), params["fc"]["w"], params["fc"]["b"]), state


def _setup(n=6):
    params = init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (n, 8, 8, 2), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (n,), 0, 4)
    return params, x, y


def _vmap_clipped_mean(params, x, y, clip):
    def ell(p, xn, yn):
        logits, _ = apply(p, {}, xn[None], train=True, layers=LayerPolicy("autodiff"))
        return jbp.autodiff.softmax_cross_entropy(logits, yn[None])
    grads = jax.vmap(jax.grad(ell), (None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(x.shape[0], -1) ** 2, 1)
                         for g in jax.tree.leaves(grads)))
    c = jnp.minimum(1.0, clip / norms)
    return jax.tree.map(lambda g: jnp.tensordot(c, g, 1) / x.shape[0], grads), norms


def _step_gradient(params, x, y, dp):
    """The gradient the DP train step hands to SGD(lr=1): params − new params."""
    state = TrainState(params, {}, optax.sgd(1.0).init(params), jnp.zeros((), jnp.int32),
                       jax.random.key(3))
    step = make_train_step(apply, optax.sgd(1.0), dp=dp, donate=False)
    new, metrics = step(state, x, y)
    return jax.tree.map(lambda a, b: a - b, params, new.params), metrics


def test_clipped_noiseless_gradient_equals_the_vmap_route():
    params, x, y = _setup()
    _, norms = _vmap_clipped_mean(params, x, y, 1.0)
    clip = float(jnp.median(norms))                    # some examples clipped, some not
    want, norms = _vmap_clipped_mean(params, x, y, clip)
    got, metrics = _step_gradient(params, x, y, (clip, 0.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), got, want)
    np.testing.assert_allclose(metrics["per_example_norms"], norms, rtol=1e-10)
    assert 0 < float(metrics["clipped_fraction"]) < 1

    noisy, _ = _step_gradient(params, x, y, (clip, 2.0))
    # (noisy − clipped) · N / (σ C) are independent standard normals, one per parameter
    z = np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(noisy),
                                                       jax.tree.leaves(want))]) * 6 / (2.0 * clip)
    assert z.size > 150 and abs(np.mean(z)) < 0.3 and 0.8 < np.std(z) < 1.2


def test_epsilon_of_the_gaussian_mechanism_between_hand_computed_bounds():
    """q = 1 (every example in every step): T steps of the Gaussian mechanism have RDP
    T·α/(2σ²) at order α. The classic conversion ε = min_α T α/(2σ²) + log(1/δ)/(α − 1) is an
    upper bound on the accountant's; its sharper conversion (Balle et al. 2020, used by
    dp-accounting) minimised over all α ≥ 1 a lower bound (the accountant minimises over a
    grid of orders)."""
    sigma, steps, delta = 4.0, 50, 1e-5
    alphas = np.linspace(1.01, 400, 200000)
    rdp = steps * alphas / (2 * sigma ** 2)
    classic = np.min(rdp + np.log(1 / delta) / (alphas - 1))
    sharper = np.min(rdp + np.log((alphas - 1) / alphas)
                     - (np.log(delta) + np.log(alphas)) / (alphas - 1))
    eps = privacy.epsilon(steps, 100, 100, sigma, delta)
    assert sharper * (1 - 1e-6) <= eps <= classic
    assert privacy.epsilon(steps, 1, 100, sigma) < eps                    # subsampling helps
    assert privacy.epsilon(steps, 1, 100, 2 * sigma) < privacy.epsilon(steps, 1, 100, sigma)
    assert privacy.epsilon(10, 1, 100, 0.0) == math.inf


def test_dp_config_and_messages():
    raw = {"train": {"dp": {"clip_norm": 1.0, "noise_multiplier": 1.1}}}
    cfg = config.from_dict(raw)
    assert cfg.train.dp == config.DPConfig(1.0, 1.1)
    import tomllib
    assert config.from_dict(tomllib.loads(config.to_toml(cfg))) == cfg
    with pytest.raises(config.ConfigError, match="train.dp.clip_norm: expected > 0"):
        config.from_dict({"train": {"dp": {"clip_norm": 0.0, "noise_multiplier": 1.0}}})
    with pytest.raises(config.ConfigError, match="train.dp.noise_multiplier: expected >= 0"):
        config.from_dict({"train": {"dp": {"clip_norm": 1.0, "noise_multiplier": -1.0}}})
    with pytest.raises(config.ConfigError, match="train.dp: missing key 'noise_multiplier'"):
        config.from_dict({"train": {"dp": {"clip_norm": 1.0}}})
    with pytest.raises(ValueError, match="train.dp.clip_norm: expected a finite number"):
        make_train_step(apply, optax.sgd(1.0), dp=(float("nan"), 1.0))


@pytest.mark.slow
def test_clipped_gradient_of_mse_is_per_example():
    """With a loss of several elements per example (mse), clipping acts on each example's
    gradient (the mean of its elements' losses), as the vmap route does."""
    params, x, _ = _setup(4)
    y = jax.random.normal(jax.random.key(4), (4, 4), jnp.float64)

    def ell(p, xn, yn):
        logits, _ = apply(p, {}, xn[None], train=True, layers=LayerPolicy("autodiff"))
        return jbp.autodiff.mse(logits, yn[None])
    grads = jax.vmap(jax.grad(ell), (None, 0, 0))(params, x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(4, -1) ** 2, 1) for g in jax.tree.leaves(grads)))
    clip = float(jnp.median(norms))
    c = jnp.minimum(1.0, clip / norms)
    want = jax.tree.map(lambda g: jnp.tensordot(c, g, 1) / 4, grads)
    state = TrainState(params, {}, optax.sgd(1.0).init(params), jnp.zeros((), jnp.int32),
                       jax.random.key(3))
    step = make_train_step(apply, optax.sgd(1.0), "mse", dp=(clip, 0.0), donate=False)
    new, _ = step(state, x, y)
    got = jax.tree.map(lambda a, b: a - b, params, new.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13), got, want)

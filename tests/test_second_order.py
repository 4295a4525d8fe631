"""jbp.train.second_order against independent dense computations in float64: the K-FAC update
against ``(A ⊗ G + γI)⁻¹ g`` (and the factored damping) solved densely with numpy; the GGN-vector
product through the rules against ``Jᵀ H J v`` of ``jax.jacrev``/``jax.hessian`` of the autodiff
twin; the damped Gauss-Newton step on softmax regression against the damped Newton step of the
dense Hessian; a K-FAC run resumed from a checkpoint against an uninterrupted one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jbp import checkpoint, config, train
from jbp import quantities as Q
from jbp.policy import LayerPolicy
from jbp.train import second_order as SO

AUTODIFF = LayerPolicy("autodiff")


def small_init(key):
    """5×5×1 -> conv 3×3 SAME (2 ch) -> relu -> flatten (50) -> dense 3."""
    k = jax.random.split(key, 4)
    return {"conv": {"w": jax.random.normal(k[0], (3, 3, 1, 2)) / 3,
                     "b": jax.random.normal(k[1], (2,)) / 3},
            "fc": {"w": jax.random.normal(k[2], (50, 3)) / 5,
                   "b": jax.random.normal(k[3], (3,)) / 5}}


def small_apply(params, state, x, *, train, layers=LayerPolicy()):
    h = layers.relu(layers.conv2d(x, params["conv"]["w"], params["conv"]["b"], padding="SAME"))
    return layers.dense(layers.flatten(h), params["fc"]["w"], params["fc"]["b"]), state


@pytest.fixture(scope="module")
def problem():
    kx, kp = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (4, 5, 5, 1), jnp.float64)
    y = jnp.array([0, 2, 1, 2])
    params = small_init(kp)
    return params, x, y


def _dense_preconditioner(a, g, damping, kind):
    a, g = np.asarray(a), np.asarray(g)
    if kind == "tikhonov":
        return np.kron(a, g) + damping * np.eye(a.shape[0] * g.shape[0])
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    return np.kron(a + pi * np.sqrt(damping) * np.eye(a.shape[0]),
                   g + np.sqrt(damping) / pi * np.eye(g.shape[0]))


@pytest.mark.parametrize("kind", SO.DAMPING_KINDS)
def test_kfac_update_is_the_dense_damped_kronecker_inverse(problem, kind):
    params, x, y = problem
    out = Q.compute(small_apply, params, {}, x, y, quantities=("kfac",))
    grads, factors = out["grad"], out["kfac"]
    damping = 0.05
    opt = SO.kfac(1.0, damping=damping, damping_kind=kind, momentum=0.0, kl_clip=1e30)
    state = opt.init(params)
    updates, state = opt.update(grads, state, params,
                                curvature=SO.CurvatureInputs(kfac_factors=lambda p: factors))
    for layer in ("conv", "fc"):
        a, g = factors[layer]["w"]
        w_grad = np.asarray(grads[layer]["w"])
        want = -np.linalg.solve(_dense_preconditioner(a, g, damping, kind), w_grad.reshape(-1))
        np.testing.assert_allclose(np.asarray(updates[layer]["w"]).reshape(-1), want,
                                   rtol=1e-9, atol=1e-12)
        # biases: the first-order fallback, −η g
        np.testing.assert_allclose(updates[layer]["b"], -grads[layer]["b"], rtol=1e-12)
    # the state holds the factors of this (first) refresh and their eigendecompositions
    np.testing.assert_allclose(state.factors["fc"]["w"][0], factors["fc"]["w"][0], rtol=1e-12)
    assert int(state.count) == 1


def test_kfac_running_average_refresh_and_inversion_periods(problem):
    """Factors refreshed every 2 steps as β·old + (1−β)·new, eigendecompositions every 3, the
    KL-clipped step: ‖update‖ shrinks to √κ/η·… exactly when η²⟨P, g⟩ > κ."""
    params, x, y = problem
    out = Q.compute(small_apply, params, {}, x, y, quantities=("kfac",))
    grads, factors = out["grad"], out["kfac"]
    twice = jax.tree.map(lambda t: 2.0 * t, factors)
    beta = 0.8
    opt = SO.kfac(1.0, damping=0.1, momentum=0.0, factor_decay=beta, refresh_every=2,
                  invert_every=3, kl_clip=1e30)
    state = opt.init(params)
    seen = []
    for fresh in (factors, twice, twice, twice):
        _, state = opt.update(grads, state, params,
                              curvature=SO.CurvatureInputs(kfac_factors=lambda p, f=fresh: f))
        seen.append(state)
    a0 = np.asarray(factors["fc"]["w"][0])
    np.testing.assert_allclose(seen[0].factors["fc"]["w"][0], a0, rtol=1e-12)       # count 0
    np.testing.assert_allclose(seen[1].factors["fc"]["w"][0], a0, rtol=1e-12)       # 1: kept
    np.testing.assert_allclose(seen[2].factors["fc"]["w"][0],                        # 2: refresh
                               beta * a0 + (1 - beta) * 2 * a0, rtol=1e-12)
    eig_a = np.linalg.eigvalsh(a0)
    np.testing.assert_allclose(np.sort(seen[2].eigen["fc"]["w"][1]),                 # from count 0
                               np.clip(eig_a, 0, None), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.sort(seen[3].eigen["fc"]["w"][1]),                 # count 3
                               np.clip(np.linalg.eigvalsh(beta * a0 + (1 - beta) * 2 * a0), 0,
                                       None), rtol=1e-9, atol=1e-12)
    # KL clipping: with κ small the update is ν·P, ν = √(κ / (η² ⟨P, g⟩))
    kappa, eta = 1e-6, 0.5
    unclipped = SO.kfac(eta, damping=0.1, momentum=0.0, kl_clip=1e30)
    clipped = SO.kfac(eta, damping=0.1, momentum=0.0, kl_clip=kappa)
    inputs = SO.CurvatureInputs(kfac_factors=lambda p: factors)
    u_free, _ = unclipped.update(grads, unclipped.init(params), params, curvature=inputs)
    u_clip, _ = clipped.update(grads, clipped.init(params), params, curvature=inputs)
    flat_free, flat_clip = ravel_pytree(u_free)[0], ravel_pytree(u_clip)[0]
    inner = float(jnp.vdot(-flat_free / eta, ravel_pytree(grads)[0]))
    nu = np.sqrt(kappa / (eta ** 2 * inner))
    assert nu < 1
    np.testing.assert_allclose(flat_clip, nu * flat_free, rtol=1e-5)   # ν in float32


def test_kfac_kl_clip_bounds_the_step_with_its_momentum(problem):
    """KL-clipping of the step taken, momentum included: two steps on the same gradient and
    factors, P = (A ⊗ G + γI)⁻¹ g solved densely (biases: P = g); by hand, step 1 is ν₁P with
    ν₁ = min(1, √(κ/(η² q))), q = Σ Pᵀ F̃ P = Σ ⟨P, g⟩, and step 2 is ν₂(μν₁ + 1)P with
    ν₂ = min(1, √(κ/(η² (μν₁ + 1)² q))), so that η² mᵀ F̃ m = κ when clipped (a momentum sum
    clipped only per term would be (μν₁ + 1)·ν₁·P)."""
    params, x, y = problem
    out = Q.compute(small_apply, params, {}, x, y, quantities=("kfac",))
    grads, factors = out["grad"], out["kfac"]
    damping, eta, mu = 0.05, 0.5, 0.9
    p_dense = {}
    for layer in ("conv", "fc"):
        a, g = factors[layer]["w"]
        w_grad = np.asarray(grads[layer]["w"])
        p_dense[layer] = {"w": np.linalg.solve(_dense_preconditioner(a, g, damping, "tikhonov"),
                                               w_grad.reshape(-1)).reshape(w_grad.shape),
                          "b": np.asarray(grads[layer]["b"])}
    q = sum(float(np.vdot(p_dense[k][n], np.asarray(grads[k][n])))
            for k in p_dense for n in ("w", "b"))
    kappa = 0.1 * eta ** 2 * q                      # ν₁ = √0.1: clipped from the first step
    opt = SO.kfac(eta, damping=damping, momentum=mu, kl_clip=kappa)
    inputs = SO.CurvatureInputs(kfac_factors=lambda p: factors)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, curvature=inputs))
    first, state = update(grads, opt.init(params), params)
    second, _ = update(grads, state, params)
    nu1 = min(1.0, np.sqrt(kappa / (eta ** 2 * q)))
    nu2 = min(1.0, np.sqrt(kappa / (eta ** 2 * (mu * nu1 + 1) ** 2 * q)))
    for k in p_dense:
        for n in ("w", "b"):
            # ν in float32; atol for the exact zeros (fc inputs that ReLU zeroes in every example)
            np.testing.assert_allclose(first[k][n], -eta * nu1 * p_dense[k][n], rtol=1e-5,
                                       atol=1e-12)
            np.testing.assert_allclose(second[k][n], -eta * nu2 * (mu * nu1 + 1) * p_dense[k][n],
                                       rtol=1e-5, atol=1e-12)


def test_ggn_vector_product_is_jt_h_j_v_of_the_autodiff_twin(problem):
    params, x, y = problem
    v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                     params)
    ggn = SO.ggn_operator(lambda p: small_apply(p, {}, x, train=True)[0],
                          lambda z: LayerPolicy().softmax_cross_entropy(z, y), params)
    got = ravel_pytree(ggn(v))[0]

    flat, unravel = ravel_pytree(params)
    logits = lambda f: small_apply(unravel(f), {}, x, train=True, layers=AUTODIFF)[0].reshape(-1)
    jac = jax.jacrev(logits)(flat)                                       # (N·C, P)
    hess = jax.hessian(lambda z: AUTODIFF.softmax_cross_entropy(z.reshape(4, 3), y))(
        logits(flat))                                                    # (N·C, N·C)
    want = jac.T @ hess @ jac @ ravel_pytree(v)[0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_gauss_newton_step_on_softmax_regression_is_the_damped_newton_step():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (8, 5), jnp.float64)
    y = jnp.array([0, 1, 2, 1, 0, 2, 2, 1])
    params = {"w": jax.random.normal(kw, (5, 3), jnp.float64) / 2, "b": jnp.zeros(3)}
    damping = 1e-2

    def loss(p, layers=LayerPolicy()):
        return layers.softmax_cross_entropy(layers.dense(x, p["w"], p["b"]), y)

    opt = SO.gauss_newton(1.0, damping=damping, cg_iters=40, adapt_damping=False)
    grads = jax.grad(loss)(params)
    inputs = SO.CurvatureInputs(logits=lambda p: LayerPolicy().dense(x, p["w"], p["b"]),
                                loss_of_logits=lambda z: LayerPolicy().softmax_cross_entropy(
                                    z, y))
    updates, state = jax.jit(lambda g, s, p: opt.update(g, s, p, curvature=inputs))(
        grads, opt.init(params), params)

    flat, unravel = ravel_pytree(params)
    twin = lambda f: loss(unravel(f), AUTODIFF)
    hess, grad = jax.hessian(twin)(flat), jax.grad(twin)(flat)
    newton = -np.linalg.solve(np.asarray(hess) + damping * np.eye(flat.size), np.asarray(grad))
    np.testing.assert_allclose(ravel_pytree(updates)[0], newton, rtol=1e-8, atol=1e-12)
    assert int(state.count) == 1 and float(state.damping) == pytest.approx(damping)


def test_levenberg_marquardt_raises_damping_after_a_bad_step():
    """A step the quadratic model overpredicts (ρ < 1/4: here the loss rises) multiplies λ by
    3/2; a good one (ρ > 3/4) by 2/3."""
    x = jnp.array([[1.0], [2.0]], jnp.float64)

    def run(lr):
        opt = SO.gauss_newton(lr, damping=1e-3, cg_iters=5)
        params = {"w": jnp.array([[0.5, -0.5]])}
        y = jnp.array([0, 1])
        inputs = SO.CurvatureInputs(
            logits=lambda p: x @ p["w"],
            loss_of_logits=lambda z: LayerPolicy().softmax_cross_entropy(z, y))
        grads = jax.grad(lambda p: inputs.loss_of_logits(inputs.logits(p)))(params)
        _, state = opt.update(grads, opt.init(params), params, curvature=inputs)
        return float(state.damping)

    assert run(1e-3) == pytest.approx(1e-3 * 2 / 3, rel=1e-5)   # a tiny step: ρ ≈ 1
    assert run(50.0) == pytest.approx(1e-3 * 1.5, rel=1e-5)     # far beyond: the loss rises


@pytest.mark.slow            # three short training runs
def test_kfac_run_resumes_bit_identically(tmp_path):
    cfg = config.load("configs/lenet_mnist.toml", [
        "data.train_limit=192", "data.test_limit=100", "train.epochs=2", "train.batch_size=32",
        "optim.optimizer=kfac", "optim.lr=0.02", "optim.refresh_every=2",
        "optim.invert_every=3", "optim.warmup_steps=0", "train.checkpoint_every=100"])
    straight = train.fit(cfg, str(tmp_path / "straight"), verbose=False)
    stopped = train.fit(cfg, str(tmp_path / "resumed"), max_steps=5, verbose=False)
    resumed = train.fit(cfg, str(tmp_path / "resumed"), resume=True, verbose=False)
    assert stopped["steps"] == 5 and straight["steps"] == resumed["steps"] == 12
    _, a = checkpoint.read(checkpoint.checkpoint_paths(str(tmp_path / "straight"))[-1])
    manifest, b = checkpoint.read(checkpoint.checkpoint_paths(str(tmp_path / "resumed"))[-1])
    assert any("factors" in leaf["path"] for leaf in manifest["leaves"])   # K-FAC state saved
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_config_keys_reach_the_optimizer_and_config_toml():
    """optim.* second-order keys: recorded in config.toml for kfac/gauss_newton only, read back
    equal, and built into the transformation make_train_step recognises."""
    cfg = config.from_dict({"optim": {"optimizer": "kfac", "damping": 0.02, "invert_every": 7}})
    text = config.to_toml(cfg)
    assert "damping = 0.02" in text and "invert_every = 7" in text
    import tomllib
    assert config.from_dict(tomllib.loads(text)) == cfg
    assert "damping" not in config.to_toml(config.from_dict({}))
    opt = train.optimizer_from_config(cfg.optim, total_steps=10)
    assert isinstance(opt, SO.KFACTransformation) and opt.curvature == ("kfac_factors",)
    gn = train.optimizer_from_config(config.from_dict(
        {"optim": {"optimizer": "gauss_newton", "sub_batch": 16, "weight_decay": 1e-4}}).optim,
        total_steps=10)
    assert isinstance(gn, SO.GaussNewtonTransformation) and gn.sub_batch == 16


@pytest.mark.slow            # two host devices in a subprocess
def test_kfac_data_parallel_step_equals_the_one_device_step():
    """Factors averaged over the mesh on refresh steps only: the sharded K-FAC step on 2
    devices equals the one-device step on the global batch (float64), LeNet-5 and a small conv
    net with batch norm (factors from the evaluation-mode pass, the gradient from synchronised
    BN), with refresh_every = 2 (both programs run); in the compiled HLO the plain program
    all-reduces exactly what a momentum-SGD step does, the refresh program that plus the
    factors' elements."""
    import json
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(root / "tests" / "_kfac_mesh_check.py")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    for name in ("lenet5", "bn_net"):
        assert max(result[name]) < 1e-10, (name, result[name])
        assert result[name + "_moved"] > 1e-4          # the steps did change the parameters
    moved = result["all_reduced"]
    assert moved["plain"] == moved["sgd"], moved
    assert moved["refresh"] == moved["sgd"] + moved["factors"], moved


# --- grouped and depthwise convolutions ------------------------------------------------------

def grouped_init(key):
    """4×4×4 -> conv 3×3 groups=2 (4 ch) -> relu -> depthwise 3×3 (groups=4) -> relu ->
    conv_transpose 2×2 groups=2 (4 ch, 5×5) -> flatten (100) -> dense 3."""
    k = jax.random.split(key, 5)
    return {"grouped": {"w": jax.random.normal(k[0], (3, 3, 2, 4)) / 3,
                        "b": jax.random.normal(k[1], (4,)) / 3},
            "depthwise": {"w": jax.random.normal(k[2], (3, 3, 1, 4)) / 3},
            "transpose": {"w": jax.random.normal(k[3], (2, 2, 4, 2)) / 2},
            "fc": {"w": jax.random.normal(k[4], (100, 3)) / 10}}


def grouped_apply(params, state, x, *, train, layers=LayerPolicy()):
    h = layers.relu(layers.conv2d(x, params["grouped"]["w"], params["grouped"]["b"],
                                  padding="SAME", groups=2))
    h = layers.relu(layers.conv2d(h, params["depthwise"]["w"], padding="SAME", groups=4))
    h = layers.conv_transpose2d(h, params["transpose"]["w"], groups=2)
    return layers.dense(layers.flatten(h), params["fc"]["w"]), state


def _group_blocks(w, groups, layout):
    """numpy: the (rows, cols) matrix of each group, sliced by hand from the kernel."""
    w = np.asarray(w)
    if layout == "conv":            # (KH, KW, C_in/G, C_out): group g's output channels
        o = w.shape[-1] // groups
        return [w[..., g * o:(g + 1) * o].reshape(-1, o) for g in range(groups)]
    c = w.shape[2] // groups        # transpose (KH, KW, C_in, C_out/G): its input channels
    return [w[:, :, g * c:(g + 1) * c, :].reshape(-1, w.shape[3]) for g in range(groups)]


@pytest.mark.parametrize("kind", SO.DAMPING_KINDS)
def test_kfac_grouped_convs_are_preconditioned_block_diagonally_per_group(kind):
    """Grouped conv2d, depthwise conv2d and grouped conv_transpose2d: each group's block of the
    gradient, sliced from the kernel by hand, against ``(A_g ⊗ G_g + γI)⁻¹`` (or the factored
    form) built densely per group with numpy; a state made without the layers' factor shapes
    is a jbp error, not a wrong preconditioner."""
    kx, kp = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (3, 4, 4, 4), jnp.float64)
    y = jnp.array([0, 2, 1])
    params = jax.tree.map(lambda a: a.astype(jnp.float64), grouped_init(kp))
    out = Q.compute(grouped_apply, params, {}, x, y, quantities=("kfac",))
    grads, factors = out["grad"], out["kfac"]
    assert factors["depthwise"]["w"][0].shape == (4, 9, 9)            # one pair per group
    assert factors["depthwise"]["w"][1].shape == (4, 1, 1)
    damping = 0.05
    opt = SO.kfac(1.0, damping=damping, damping_kind=kind, momentum=0.0, kl_clip=1e30)
    shapes = SO.factor_shapes(grouped_apply, params, {}, (4, 4, 4))
    state = opt.init(params, factor_shapes=shapes)
    inputs = SO.CurvatureInputs(kfac_factors=lambda p: factors)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, curvature=inputs))   # one compile
    updates, _ = update(grads, state, params)
    for name, groups, layout in (("grouped", 2, "conv"), ("depthwise", 4, "conv"),
                                 ("transpose", 2, "transpose"), ("fc", 1, "conv")):
        a, g = (np.asarray(f) for f in factors[name]["w"])
        if groups == 1:
            a, g = a[None], g[None]
        blocks_grad = _group_blocks(grads[name]["w"], groups, layout)
        blocks_update = _group_blocks(updates[name]["w"], groups, layout)
        for i in range(groups):
            want = -np.linalg.solve(_dense_preconditioner(a[i], g[i], damping, kind),
                                    blocks_grad[i].reshape(-1))
            np.testing.assert_allclose(blocks_update[i].reshape(-1), want, rtol=1e-9,
                                       atol=1e-12, err_msg=f"{name} group {i}")
    np.testing.assert_allclose(updates["grouped"]["b"], -grads["grouped"]["b"], rtol=1e-12)
    with pytest.raises(ValueError, match=r"optimizer: K-FAC's state holds factors .*"
                                         r"\['depthwise'\]\['w'\]"):
        jax.eval_shape(update, grads, opt.init(params), params)


@pytest.mark.slow            # a K-FAC step of a batch-norm + SE net, and its factors again
def test_kfac_trains_a_tiny_inverted_residual_net():
    """A two-block MobileNet/EfficientNet-like net from jbp.models.mobilenet's own blocks
    (expansion, depthwise with groups = hidden width, squeeze-and-excitation dense layers,
    batch norm): one jit-compiled K-FAC train step from init_train_state, finite loss, every
    weight moved, the depthwise factors held per group."""
    from jbp.models import Model, mobilenet as M
    spec = M.Spec("tiny", "silu", ((1, 3, 1, 4, 1), (2, 3, 2, 6, 1)), se=True, stem_width=4,
                  head_width=8, min_size=8)
    model = Model("tiny_mbconv", lambda key, shape, classes: M._init(spec, key, shape, classes),
                  lambda p, s, x, *, train, layers=LayerPolicy(): M._apply(
                      spec, p, s, x, train, layers, None, 0.0, 0.0, "none"))
    opt = train.make_optimizer("kfac", 0.05, second_order_options={"damping": 1e-2})
    state = train.init_train_state(model, opt, jax.random.key(0), (8, 8, 3), 5)
    depthwise = state.opt_state.factors["blocks"][1]["depthwise"]["w"]
    assert depthwise[0].shape == (8, 9, 9) and depthwise[1].shape == (8, 1, 1)
    step = train.make_train_step(model.apply, opt, donate=False)
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3), jnp.float32)
    new, metrics = step(state, x, jnp.array([0, 1, 2, 3]))
    assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    for before, after in zip(jax.tree.leaves(state.params), jax.tree.leaves(new.params)):
        assert float(jnp.max(jnp.abs(after - before))) > 0
    # the per-group factors of this step are the ones jbp.quantities writes (evaluation mode)
    want = Q.compute(model.apply, state.params, state.model_state, x, jnp.array([0, 1, 2, 3]),
                     quantities=("kfac",))["kfac"]["blocks"][1]["depthwise"]["w"]
    np.testing.assert_allclose(new.opt_state.factors["blocks"][1]["depthwise"]["w"][0],
                               want[0], rtol=1e-5, atol=1e-7)

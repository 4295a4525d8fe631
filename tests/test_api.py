"""The public API contract: names, namespaces, identical signatures, documented equations."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp.testing.grid import CASES


@pytest.mark.parametrize("name", jbp.LAYERS)
def test_namespaces(name):
    manual = getattr(jbp, name)
    assert getattr(jbp.manual, name) is manual
    twin = getattr(jbp.autodiff, name)
    assert twin is not manual
    assert inspect.signature(twin) == inspect.signature(manual)


@pytest.mark.parametrize("name", jbp.LAYERS)
def test_docstrings_state_equation_and_residuals(name):
    doc = getattr(jbp, name).__doc__
    assert doc and "Backward" in doc, f"jbp.{name} docstring must state its backward equation"
    assert "Residuals" in doc, f"jbp.{name} docstring must state its saved residuals"


def test_every_layer_is_in_the_grid():
    assert {c.layer for c in CASES} == set(jbp.LAYERS)


def test_autodiff_twin_has_no_custom_rule():
    x = jnp.ones((1, 5, 5, 2))
    w = jnp.ones((3, 3, 2, 2))
    for name in ("conv2d", "max_pool", "batch_norm"):
        case = next(c for c in CASES if c.layer == name)
        args = case.args(jnp.float32)
        manual = str(jax.make_jaxpr(case.fn(jbp))(*args))
        auto = str(jax.make_jaxpr(case.fn(jbp.autodiff))(*args))
        assert "custom_vjp_call" in manual, name
        assert "custom_vjp" not in auto and "custom_jvp" not in auto, name


def test_batch_norm_running_stats_update_and_no_gradient():
    """Running stats: m·old + (1 − m)·batch with the unbiased variance; zero gradient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3, 2, 5)))
    old_mean, old_var = jnp.asarray(rng.standard_normal(5)), jnp.asarray(rng.uniform(1, 2, 5))
    g, b = jnp.ones(5), jnp.zeros(5)
    _, (mean, var) = jbp.batch_norm(x, g, b, old_mean, old_var, train=True, momentum=0.8)
    xs = np.asarray(x).reshape(-1, 5)
    np.testing.assert_allclose(mean, 0.8 * np.asarray(old_mean) + 0.2 * xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, 0.8 * np.asarray(old_var) + 0.2 * xs.var(0, ddof=1),
                               rtol=1e-12)
    _, (m2, v2) = jbp.batch_norm(x, g, b, old_mean, old_var, train=False)
    assert m2 is old_mean or np.array_equal(m2, old_mean)
    for ns in (jbp, jbp.autodiff):
        for train in (True, False):
            def f(rm, rv):
                y, (nm, nv) = ns.batch_norm(x, g, b, rm, rv, train=train)
                return jnp.sum(y ** 2) + jnp.sum(nm) + jnp.sum(nv)
            d_mean, d_var = jax.grad(f, (0, 1))(old_mean, old_var)
            assert not np.any(d_mean) and not np.any(d_var)


def test_dropout_is_identity_in_eval_and_inverted_in_train():
    x = jnp.ones((1000,))
    key = jax.random.key(0)
    assert jbp.dropout(x, 0.5, key, train=False) is x
    y = np.asarray(jbp.dropout(x, 0.25, key, train=True))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75)
    assert 0.65 < kept.mean() < 0.85
    g = np.asarray(jax.grad(lambda x: jnp.sum(jbp.dropout(x, 0.25, key, train=True)))(x))
    np.testing.assert_array_equal(g, y)     # same mask, same scale: ∂y/∂x = m / (1 − p)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float64],
                         ids=["float32", "bfloat16", "float64"])
def test_losses_stable_for_huge_logits(dtype):
    """Logits of ±1e4: finite losses and gradients, equal to the limits worked out by hand."""
    z = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0]], dtype)
    labels = jnp.array([0, 0])
    loss, grad = jax.value_and_grad(jbp.softmax_cross_entropy)(z, labels)
    # Example 0 is right with certainty (loss 0); example 1 is wrong by 2e4 nats.
    rtol = 1e-2 if dtype == jnp.bfloat16 else 1e-6
    assert loss.dtype == dtype and grad.dtype == dtype
    np.testing.assert_allclose(np.float64(loss), (0 + 2e4) / 2, rtol=rtol)
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               np.array([[0, 0, 0], [-1, 1, 0]]) / 2, atol=1e-6)
    t = jnp.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype)   # every confident guess wrong
    loss, grad = jax.value_and_grad(jbp.sigmoid_binary_cross_entropy)(z, t)
    # softplus(z) − z y per element: 1e4, 1e4, log 2 | 1e4, 1e4, log 2; mean over 6.
    np.testing.assert_allclose(np.float64(loss), (4e4 + 2 * np.log(2)) / 6, rtol=rtol)
    # (σ(z) − y)/6 with σ(±1e4) = 1, 0 and σ(0) = 1/2.
    np.testing.assert_allclose(np.asarray(grad, np.float64),
                               (np.array([[1, 0, .5], [0, 1, .5]]) - np.asarray(t, np.float64))
                               / 6, atol=2e-3 if dtype == jnp.bfloat16 else 1e-7)


def test_out_of_range_labels_are_rejected():
    with pytest.raises(ValueError, match=r"labels: class indices must lie in \[0, 3\) for "
                                         r"logits with K=3 classes, found 7"):
        jbp.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([7, 0]))
    with pytest.raises(ValueError, match=r"found -1"):
        jbp.autodiff.softmax_cross_entropy(jnp.zeros((2, 3)), jnp.array([0, -1]))


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
def test_readme_snippets_run(tmp_path, monkeypatch):
    """The README's "Using it" code blocks run as printed (the whole run shortened to one epoch
    of 1,024 images, into a temporary directory; the step-at-a-time epoch to the first 10,000
    images); the gradient comparison passes."""
    import contextlib
    import io
    import os
    import re
    root = os.path.join(os.path.dirname(__file__), "..")
    readme = open(os.path.join(root, "README.md")).read()
    section = readme[readme.index("## Using it"):readme.index("## Models")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3 and "train.fit(cfg" in blocks[0]
    short = blocks[0].replace('"runs/mine"', repr(str(tmp_path / "mine"))).replace(
        '"train.epochs=2"', '"train.epochs=1", "data.train_limit=1024"')
    assert short != blocks[0]
    # The step-at-a-time block's epoch kept at the 10,000 images it had before MNIST grew to 60,000.
    step_block = blocks[1].replace("train_set, test_set = data.load_mnist()\n",
                                   "train_set, test_set = data.load_mnist()\n"
                                   "train_set = data.subset(train_set, 10000)\n")
    assert step_block != blocks[1]
    monkeypatch.chdir(root)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for code in [short, step_block] + blocks[2:]:
            exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue()
    assert os.path.isfile(tmp_path / "mine" / "summary.json")
    assert "'accuracy'" in printed and "vs autodiff" in printed and "FAIL" not in printed
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", printed).group(1))
    assert accuracy > 0.9          # one epoch of Adam on 10,000 images


def test_a_layer_is_declared_once(monkeypatch):
    """@layer makes the hand-written function, its autodiff twin and the table entry from one
    body: the twin runs the rule's plain forward (JAX's derivative), the signature drops the
    rule parameters, and a policy binds only the options the layer declares."""
    from jbp import _registry, _rule
    monkeypatch.setattr(_registry, "REGISTRY", dict(_registry.REGISTRY))
    rule = _rule.manual_rule("double", lambda x, s: 2 * x, lambda x, s: (2 * x, None),
                             lambda s, res, g: (3 * g,), num_args=2)   # a wrong rule, on purpose

    @_registry.layer(rule, options=("residuals",))
    def double_for_test(rule, x, *, residuals="exact"):
        """Backward 3δ (wrong on purpose). Residuals: none."""
        return rule(x, residuals)

    entry = _registry.layers()["double_for_test"]
    assert entry.manual is double_for_test and entry.options == {"residuals"}
    assert list(inspect.signature(double_for_test).parameters) == ["x", "residuals"]
    x = jnp.ones(3)
    assert float(jax.grad(lambda x: jnp.sum(entry.manual(x)))(x)[0]) == 3.0     # the rule
    assert float(jax.grad(lambda x: jnp.sum(entry.autodiff(x)))(x)[0]) == 2.0   # JAX's
    bound = jbp.LayerPolicy("manual", residuals="int8").double_for_test
    assert bound.keywords == {"residuals": "int8"}


def test_layer_policy_binds_each_option_where_declared():
    policy = jbp.LayerPolicy("manual", residuals="bf16", axis_name="data")
    assert policy.conv2d.keywords == {"residuals": "bf16"}
    assert policy.batch_norm.keywords == {"residuals": "bf16", "axis_name": "data"}
    assert policy.dense is jbp.dense and jbp.LayerPolicy("autodiff").dense is jbp.autodiff.dense
    assert jbp.LayerPolicy().conv2d is jbp.conv2d            # defaults bind nothing
    with pytest.raises(AttributeError, match="no layer 'conv3d'"):
        jbp.LayerPolicy().conv3d
    with pytest.raises(ValueError, match="residuals"):
        jbp.LayerPolicy("manual", residuals="fp8")
    assert hash(policy) == hash(jbp.LayerPolicy("manual", "bf16", "data"))   # a static argument
    import dataclasses
    from jbp import _registry
    fields = {f.name for f in dataclasses.fields(jbp.LayerPolicy)}
    assert set(_registry.OPTIONS) == fields - {"grad"}      # every option a layer may declare


def test_train_functions_take_grad_or_a_policy_not_both_at_odds():
    from jbp import models, train
    apply = models.get_model("lenet5").apply
    train.make_loss(apply, grad="autodiff")
    train.make_loss(apply, layers=jbp.LayerPolicy("autodiff"), grad="autodiff")
    with pytest.raises(ValueError, match="disagree"):
        train.make_loss(apply, grad="manual", layers=jbp.LayerPolicy("autodiff"))
    with pytest.raises(TypeError, match="layers: expected a jbp.LayerPolicy"):
        train.make_loss(apply, layers="autodiff")
    with pytest.raises(ValueError, match="axis_name"):
        train.make_train_step(apply, train.make_optimizer("sgd", 0.1),
                              layers=jbp.LayerPolicy(axis_name="data"))


def test_a_layer_name_is_declared_once(monkeypatch):
    from jbp import _registry
    monkeypatch.setattr(_registry, "REGISTRY", dict(_registry.REGISTRY))
    with pytest.raises(ValueError, match="'relu' is declared twice"):
        @_registry.layer(_registry.REGISTRY["relu"].manual)
        def relu(rule, x):
            return rule(x)

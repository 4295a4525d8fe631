"""Out-of-range integer labels inside jax.jit: NaN for that example, never a silent zero.

Eagerly they raise (docs/errors.md); traced, no exception is possible, so the example's target row
is NaN: the loss and the gradient are NaN, the train step's finite check skips the update, and
evaluate() raises naming the batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jbp
from jbp import autodiff, train
from jbp.models import get_model

LOGITS = np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [0.0, 0.0, 4.0]], np.float32)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("ns", [jbp, autodiff], ids=["manual", "autodiff"])
@pytest.mark.parametrize("bad", [3, -1, 1000])
def test_out_of_range_label_poisons_its_example(ns, bad):
    labels = np.array([0, bad, 2], np.int32)
    loss, grad = jax.jit(jax.value_and_grad(ns.softmax_cross_entropy))(LOGITS, labels)
    assert np.isnan(float(loss))
    grad = np.asarray(grad)
    assert np.all(np.isnan(grad[1]))                  # the bad example's δ row
    # The other rows keep the hand-computed δ = (ŷ − y)/N (the NaN sits in the bad row only).
    want = (_softmax(LOGITS) - np.eye(3, dtype=np.float32)[[0, 0, 2]]) / 3
    np.testing.assert_allclose(grad[[0, 2]], want[[0, 2]], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ns", [jbp, autodiff], ids=["manual", "autodiff"])
def test_valid_labels_under_jit_are_unchanged(ns):
    labels = np.array([0, 1, 2], np.int32)
    loss, grad = jax.jit(jax.value_and_grad(ns.softmax_cross_entropy))(LOGITS, labels)
    p = _softmax(LOGITS.astype(np.float64))
    want_loss = -np.mean(np.log(p[np.arange(3), labels]))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), (p - np.eye(3)) / 3, rtol=1e-5, atol=1e-7)
    eager = ns.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.asarray(labels))
    np.testing.assert_allclose(float(eager), float(loss), rtol=1e-6)   # jit fuses: ≤ 1 ulp


def test_manual_and_autodiff_agree_bitwise_on_valid_labels_with_smoothing():
    labels = np.array([2, 0, 1], np.int32)
    f = jax.jit(jax.grad(lambda z: jbp.softmax_cross_entropy(z, labels, label_smoothing=0.1)))
    g = jax.jit(jax.grad(lambda z: autodiff.softmax_cross_entropy(z, labels,
                                                                  label_smoothing=0.1)))
    np.testing.assert_array_equal(np.asarray(f(LOGITS)), np.asarray(g(LOGITS)))


def test_eager_labels_still_raise():
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 3\)"):
        jbp.softmax_cross_entropy(jnp.asarray(LOGITS), jnp.array([0, 3, 1]))


@pytest.fixture(scope="module")
def seed_cnn():
    model = get_model("seed_cnn")
    opt = optax.sgd(0.1)
    state = train.init_train_state(model, opt, jax.random.key(0), (6, 6, 1), 3)
    x = np.random.default_rng(0).standard_normal((4, 6, 6, 1)).astype(np.float32)
    return model, opt, state, x


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_train_step_stops_on_an_out_of_range_label(seed_cnn, grad):
    model, opt, state, x = seed_cnn
    step = train.make_train_step(model.apply, opt, grad=grad, donate=False)
    good, metrics = step(state, x, np.array([0, 1, 2, 0]))
    assert bool(metrics["finite"]) and int(good.step) == 1
    after, metrics = step(state, x, np.array([0, 1, 3, 0]))      # K = 3: label 3 is invalid
    assert not bool(metrics["finite"]) and np.isnan(float(metrics["loss"]))
    assert int(after.step) == 0                                   # not applied
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_raises_naming_the_batch(seed_cnn):
    model, _, state, x = seed_cnn
    eval_step = train.make_eval_step(model.apply)
    out = eval_step(state, x, np.array([0, 1, 2, -1]))
    assert int(out["bad_labels"]) == 1 and np.isnan(float(out["loss_sum"]))
    ok = train.evaluate(eval_step, state, [(x, np.array([0, 1, 2, 0]))])
    assert ok["count"] == 4 and np.isfinite(ok["loss"])
    with pytest.raises(ValueError, match=r"evaluation batch 1 has 2 label\(s\) outside"):
        train.evaluate(eval_step, state, [(x, np.array([0, 1, 2, 0])),
                                          (x, np.array([5, 1, 7, 0]))])


@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_the_check_leaves_compiled_gradients_bit_identical(grad):
    """LeNet-5's gradient with the public loss (label check included) equals, bit for bit, the
    one from the bare rule on one-hot targets: the check costs no change in rounding."""
    from jbp import LayerPolicy
    from jbp.losses import cross_entropy
    model = get_model("lenet5")
    with jax.enable_x64(False):
        params, state = model.init(jax.random.key(0), (28, 28, 1), 10)
    x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1), jnp.float32)
    y = jnp.arange(16) % 10
    bare = cross_entropy._ce_rule if grad == "manual" else cross_entropy._ce_rule.forward

    def objective(loss_fn):
        def f(p):
            logits, _ = model.apply(p, state, x, train=True, layers=LayerPolicy(grad))
            return loss_fn(logits, y)
        return jax.jit(jax.grad(f))

    public = objective(LayerPolicy(grad).softmax_cross_entropy)(params)
    reference = objective(lambda z, labels: bare(z, jax.nn.one_hot(labels, 10, dtype=z.dtype)))(
        params)
    for a, b in zip(jax.tree.leaves(public), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

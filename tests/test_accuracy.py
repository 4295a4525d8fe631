"""The float32 verdict (jbp.accuracy): manual and autodiff gradients, each against float64.

It must pass on every convolution backend for the models jbp ships, whatever the CPU, and it
must fail for a rule that is wrong by more than float32 rounding can explain, at the shipped
FACTOR and ULPS. Small batches: the shape is not what these tests are about.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import accuracy, conv, data
from jbp._conv_kernels import onednn
from jbp.models import get_model

BACKENDS = ["xla", "onednn"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "onednn" and not onednn.describe().startswith("onednn"):
        pytest.skip(f"oneDNN is not available here: {onednn.describe()}")
    onednn.set_conv_backend(request.param)
    yield request.param
    onednn.set_conv_backend(None)


def _mnist_batch(n):
    train_set, _ = data.load_mnist()
    x, y = next(data.batches(train_set, n, seed=0, mean=(data.MNIST_MEAN,),
                             std=(data.MNIST_STD,)))
    return jnp.asarray(x), jnp.asarray(y)


def _check(name, x, y):
    model = get_model(name)
    params, state = model.init(jax.random.key(0), x.shape[1:], 10)
    return accuracy.check_model(model.apply, params, state, x, y)[0]


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_verdict_passes_on_mnist(name, backend):
    check = _check(name, *_mnist_batch(32))
    assert check.ok, str(check)
    # Each side really was measured: float32 is not float64, and the bound is the formula.
    assert max(r.autodiff_error for r in check.rows) > 0
    for r in check.rows:
        assert r.bound == pytest.approx(accuracy.FACTOR * r.autodiff_error
                                        + accuracy.ULPS * 2.0 ** -23)


def test_verdict_passes_on_resnet18(backend):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    check = _check("resnet18", x, jnp.asarray([3, 7]))
    assert check.ok, str(check)


def _break_weight_grad(monkeypatch, damage):
    """Every convolution's hand-written ∂L/∂W goes through ``damage`` (autodiff's does not)."""
    real = conv._on_cpu_if_chosen

    def wrong(equation, *args, **kwargs):
        out = real(equation, *args, **kwargs)
        return damage(out) if equation == "weight_grad" else out

    monkeypatch.setattr(conv, "_on_cpu_if_chosen", wrong)


def test_weight_grad_off_by_1e3_fails(monkeypatch, backend):
    """∂L/∂W · (1 + 1e-3): a thousandth is ~8000 ulps, far past float32 rounding (LeNet-5's
    autodiff errors are ~1e-7). Only the conv kernels' rows fail."""
    _break_weight_grad(monkeypatch, lambda dw: dw * (1 + 1e-3))
    check = _check("lenet5", *_mnist_batch(32))
    failed = {r.name for r in check.rows if not r.ok}
    assert failed == {"['conv1']['w']", "['conv2']['w']"}, str(check)
    for r in check.rows:
        if not r.ok:
            assert r.error == pytest.approx(1e-3, rel=0.05)


def test_one_tap_dropped_fails_on_resnet20(monkeypatch):
    """The top-left tap of every ∂L/∂W set to 0: ResNet-20's 3×3 kernels fail, whatever batch
    norm's cancellation does to autodiff's own error."""
    _break_weight_grad(monkeypatch, lambda dw: dw.at[0, 0].set(0) if dw.shape[0] > 1 else dw)
    check = _check("resnet20", *_mnist_batch(32))
    assert not check.ok
    kernels = [r for r in check.rows if r.name.endswith("['w']") and "proj" not in r.name
               and "fc" not in r.name]
    assert len(kernels) == 19 and all(not r.ok for r in kernels), str(check)


def _tiny_apply(params, state, x, *, train, grad):
    from jbp.models import layers
    nn = layers(grad)
    h = nn.relu(nn.dense(x, params["w1"]))
    return nn.dense(h, params["w2"]), state


def test_reference_takes_the_float32_branch_of_a_relu():
    """z = 1 + 1e-8 − 1 is 0 in float32 (ReLU off) and 1e-8 in float64 (ReLU on). The float32
    run records "off"; its float64 reference must differentiate that branch (∂L/∂w1 = 0), not
    float64's own (which would make the exact float32 gradient look wrong)."""
    params = {"w1": jnp.ones((3, 1), jnp.float32), "w2": jnp.asarray([[1.0, -1.0]], jnp.float32)}
    x = jnp.asarray([[1.0, 1e-8, -1.0]], jnp.float32)
    y = jnp.asarray([0])
    _, grads, branches = accuracy.gradients(_tiny_apply, params, {}, x, y)
    assert not bool(branches[0][0, 0])
    ref = accuracy.reference(_tiny_apply, params, {}, x, y, branches)
    np.testing.assert_array_equal(np.asarray(ref["w1"]), 0.0)
    np.testing.assert_array_equal(np.asarray(grads["w1"]), 0.0)
    flipped = accuracy.reference(_tiny_apply, params, {}, x, y, [~branches[0]])
    assert float(jnp.abs(flipped["w1"]).max()) > 0.1     # float64's own branch: nonzero


def test_reference_replays_max_pool_and_equals_float64_autodiff():
    """Away from kinks the replayed forward is the model: LeNet-5's pinned float64 gradient is
    jax.grad of its float64 autodiff forward (max pool replayed by index, ReLU by mask)."""
    import jbp.autodiff
    model = get_model("lenet5")
    x, y = _mnist_batch(4)
    params, state = model.init(jax.random.key(1), (28, 28, 1), 10)
    _, _, branches = accuracy.gradients(model.apply, params, state, x, y)
    assert len(branches) == 6 and branches[1].dtype.kind == "i"   # 4 ReLUs, 2 max pools
    pinned = accuracy.reference(model.apply, params, state, x, y, branches)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

        def loss(p):
            logits, _ = model.apply(p, state, jnp.asarray(x, jnp.float64), train=True,
                                    grad="autodiff")
            return jbp.autodiff.softmax_cross_entropy(logits, y)
        plain = jax.grad(loss)(p64)
    for a, b in zip(jax.tree.leaves(pinned), jax.tree.leaves(plain)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)


def test_judge_by_hand():
    """Two leaves, errors computed by hand: 8·1e-3 + 16·2⁻²³ bounds the first."""
    ref = [np.array([1.0, -2.0]), np.array([4.0])]
    auto = [np.array([1.0, -2.002]), np.array([4.0])]           # e = 0.002 / 2 = 1e-3, and 0
    good = [np.array([1.0, -2.01]), np.array([4.0 * (1 + 2 ** -20)])]   # 5e-3; 2⁻²⁰ < 16·2⁻²³
    bad = [np.array([1.02, -2.0]), np.array([4.0 * (1 + 2 ** -18)])]    # 1e-2 > 8.0019e-3
    check = accuracy.judge(good, auto, ref, ["a", "b"])
    assert check.ok and check.rows[0].error == pytest.approx(5e-3)
    assert check.rows[0].bound == pytest.approx(8e-3 + 16 * 2 ** -23)
    check = accuracy.judge(bad, auto, ref, ["a", "b"])
    assert [r.ok for r in check.rows] == [False, False]
    assert "FAIL" in str(check) and "autodiff err" in str(check)

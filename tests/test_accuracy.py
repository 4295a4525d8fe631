"""The float32 verdict (jbp.accuracy): manual and autodiff gradients, each against float64.

It must pass on every convolution backend for the models jbp ships, whatever the CPU, and it
must fail for a rule that is wrong by more than float32 rounding can explain, at the shipped
FACTOR and ULPS. Small batches: the shape is not what these tests are about.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp import LayerPolicy, accuracy, data
from jbp.layers import conv
from jbp._conv_kernels import onednn
from jbp.models import get_model

#: Outside the fast loop (``pytest -m 'not slow'``): float64 references of whole models. CI runs it.
pytestmark = pytest.mark.slow

BACKENDS = ["xla", "onednn"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "onednn" and not onednn.describe().startswith("onednn"):
        pytest.skip(f"oneDNN is not available here: {onednn.describe()}")
    onednn.set_conv_backend(request.param)
    yield request.param
    onednn.set_conv_backend(None)


def _mnist_batch(n):
    train_set = data.subset(data.load_mnist()[0], 10000)   # the batches of the 10,000-image subset
    x, y = next(data.batches(train_set, n, seed=0, mean=(data.MNIST_MEAN,),
                             std=(data.MNIST_STD,)))
    return jnp.asarray(x), jnp.asarray(y)


_AUTODIFF = {}


def _check(name, x, y):
    """The verdict on ``name`` at (x, y); autodiff's side is computed once per model and batch
    (it does not depend on the backend or on a broken manual rule), and the float64 reference
    is one compiled program per model (jbp.accuracy)."""
    model = get_model(name)
    params, state = model.init(jax.random.key(0), x.shape[1:], 10)
    key = (name, x.shape)
    if key not in _AUTODIFF:
        _AUTODIFF[key] = accuracy.side(model.apply, params, state, x, y, grad="autodiff")
    return accuracy.check_model(model.apply, params, state, x, y, autodiff=_AUTODIFF[key])[0]


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
    """64×64 inputs, batch 4: the last stage is 2×2, so its batch norm averages 16 values (at
    32×32 and batch 2 it would average 2, and both float32 errors would be noise)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 64, 64, 3)), jnp.float32)
    check = _check("resnet18", x, jnp.asarray([3, 7, 1, 0]))
    assert check.ok, str(check)


def _break_weight_grad(monkeypatch, damage):
    """Every convolution's hand-written ∂L/∂W goes through ``damage`` (autodiff's does not)."""
    real = conv.dispatch

    def wrong(equation, *args, **kwargs):
        out = real(equation, *args, **kwargs)
        return damage(out) if equation == "weight_grad" else out

    monkeypatch.setattr(conv, "dispatch", wrong)


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


def _tiny_apply(params, state, x, *, train, layers):
    nn = layers
    h = nn.relu(nn.dense(x, params["w1"]))
    return nn.dense(h, params["w2"]), state


def test_reference_takes_the_branch_the_float32_run_recorded():
    """z = x·w₁ with x·w₁ = 1 − 1 + 1e-8 in exact arithmetic: float32 rounds it to 0 or to
    1e-8 depending on the order of the sum (ReLU off or on), float64 to 1e-8 (on). Whatever
    branch the float32 run took, its reference differentiates that one (∂L/∂w₁ = 0 iff off),
    and replaying the other branch gives the other gradient."""
    params = {"w1": jnp.ones((3, 1), jnp.float32), "w2": jnp.asarray([[1.0, -1.0]], jnp.float32)}
    x = jnp.asarray([[1.0, 1e-8, -1.0]], jnp.float32)
    y = jnp.asarray([0])
    _, grads, branches = accuracy.gradients(_tiny_apply, params, {}, x, y)
    on = bool(branches[0][0, 0])
    ref = accuracy.reference(_tiny_apply, params, {}, x, y, branches)
    other = accuracy.reference(_tiny_apply, params, {}, x, y, [~branches[0]])
    assert (float(jnp.abs(ref["w1"]).max()) > 0.1) == on
    assert (float(jnp.abs(other["w1"]).max()) > 0.1) == (not on)
    assert (float(jnp.abs(grads["w1"]).max()) > 0.1) == on      # the float32 run itself


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
                                    layers=LayerPolicy("autodiff"))
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


def test_versus_autodiff_float32_fails_a_wrong_rule():
    """gradcheck's float32 check judges by float64 too: a conv whose gradient is 1e-3 off
    (the whole function scaled, so its VJP is) fails; the true rule passes."""
    import jbp
    from jbp import autodiff, gradcheck
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
    right = gradcheck.versus_autodiff(jbp.conv2d, autodiff.conv2d, (x, w), names=["x", "w"])
    assert right.ok and right.float64 is not None and right.float64.ok, str(right)
    wrong = gradcheck.versus_autodiff(lambda x, w: jbp.conv2d(x, w) * (1 + 1e-3),
                                      autodiff.conv2d, (x, w), names=["x", "w"])
    assert not wrong.ok and [r.ok for r in wrong.float64.rows] == [False, False], str(wrong)

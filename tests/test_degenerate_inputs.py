"""Degenerate and odd inputs for every public layer: each either gives PyTorch's answer (values
and gradients, float64) or raises jbp's own ValueError/TypeError naming the argument — never an
error from inside XLA. The rows that raise are also rows of docs/errors.md."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp

torch = pytest.importorskip("torch", reason="PyTorch not installed: pip install -e '.[torch]'")
F = torch.nn.functional


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def _nchw(a):
    return a.permute(0, 3, 1, 2) if a.ndim == 4 else a


def _nhwc(a):
    return a.permute(0, 2, 3, 1) if a.ndim == 4 else a


# (id, jbp function of float64 arrays, the same function in PyTorch on NHWC tensors, inputs)
MATCH = [
    ("conv2d empty batch", lambda x, w: jbp.conv2d(x, w, padding=1),
     lambda x, w: _nhwc(F.conv2d(_nchw(x), w.permute(3, 2, 0, 1), padding=1)),
     (_r(0, 5, 5, 3), _r(3, 3, 3, 4))),
    ("conv2d kernel larger than the input, padded", lambda x, w: jbp.conv2d(x, w, padding=2),
     lambda x, w: _nhwc(F.conv2d(_nchw(x), w.permute(3, 2, 0, 1), padding=2)),
     (_r(2, 2, 3, 3), _r(5, 5, 3, 4))),
    ("conv2d 1x1 input", lambda x, w: jbp.conv2d(x, w, padding=1, padding_mode="replicate"),
     lambda x, w: _nhwc(F.conv2d(F.pad(_nchw(x), (1, 1, 1, 1), mode="replicate"),
                                 w.permute(3, 2, 0, 1))),
     (_r(2, 1, 1, 3), _r(3, 3, 3, 2))),
    ("dense empty batch", jbp.dense, lambda x, w: F.linear(x, w.T), (_r(0, 5), _r(5, 3))),
    ("dense 1-d input", jbp.dense, lambda x, w: F.linear(x, w.T), (_r(5), _r(5, 3))),
    ("dense zero features", jbp.dense, lambda x, w: F.linear(x, w.T), (_r(4, 0), _r(0, 3))),
    ("flatten empty batch", jbp.flatten, lambda x: x.reshape(0, 12), (_r(0, 3, 4),)),
    ("relu 0-d", jbp.relu, F.relu, (_r(),)),
    ("relu empty", jbp.relu, F.relu, (_r(0, 3),)),
    ("leaky_relu 0-d", jbp.leaky_relu, F.leaky_relu, (_r(),)),
    ("sigmoid 0-d", jbp.sigmoid, torch.sigmoid, (_r(),)),
    ("tanh empty", jbp.tanh, torch.tanh, (_r(2, 0),)),
    ("softmax 0-d", jbp.softmax, lambda x: torch.softmax(x, 0), (_r(),)),
    ("softmax empty axis", jbp.softmax, lambda x: torch.softmax(x, -1), (_r(3, 0),)),
    ("softmax empty batch", jbp.softmax, lambda x: torch.softmax(x, -1), (_r(0, 3),)),
    ("log_softmax 0-d", jbp.log_softmax, lambda x: torch.log_softmax(x, 0), (_r(),)),
    ("log_softmax one class", jbp.log_softmax, lambda x: torch.log_softmax(x, -1), (_r(4, 1),)),
    ("max_pool window 1", lambda x: jbp.max_pool(x, 1),
     lambda x: _nhwc(F.max_pool2d(_nchw(x), 1)), (_r(2, 4, 4, 3),)),
    ("max_pool empty batch", lambda x: jbp.max_pool(x, 2),
     lambda x: _nhwc(F.max_pool2d(_nchw(x), 2)), (_r(0, 4, 4, 3),)),
    ("max_pool window = input", lambda x: jbp.max_pool(x, (3, 5)),
     lambda x: _nhwc(F.max_pool2d(_nchw(x), (3, 5))), (_r(2, 3, 5, 2),)),
    ("avg_pool ceil mode, one cell left", lambda x: jbp.avg_pool(x, 2, ceil_mode=True),
     lambda x: _nhwc(F.avg_pool2d(_nchw(x), 2, ceil_mode=True)), (_r(2, 5, 5, 3),)),
    ("global_avg_pool 1x1", jbp.global_avg_pool, lambda x: x.mean(dim=(1, 2)), (_r(2, 1, 1, 3),)),
    ("global_avg_pool empty batch", jbp.global_avg_pool, lambda x: x.mean(dim=(1, 2)),
     (_r(0, 4, 4, 3),)),
    ("adaptive_avg_pool larger than the input", lambda x: jbp.adaptive_avg_pool(x, (5, 3)),
     lambda x: _nhwc(F.adaptive_avg_pool2d(_nchw(x), (5, 3))), (_r(2, 2, 2, 3),)),
    ("pad 1x1 replicate", lambda x: jbp.pad(x, 2, "replicate"),
     lambda x: _nhwc(F.pad(_nchw(x), (2, 2, 2, 2), mode="replicate")), (_r(2, 1, 1, 3),)),
    ("pad zero", lambda x: jbp.pad(x, 0, "reflect"),
     lambda x: _nhwc(F.pad(_nchw(x), (0, 0, 0, 0), mode="reflect")), (_r(2, 3, 3, 1),)),
    ("batch_norm eval, empty batch",
     lambda x: jbp.batch_norm(x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3),
                              train=False)[0],
     lambda x: F.batch_norm(x.reshape(-1, 3), torch.zeros(3, dtype=torch.float64),
                            torch.ones(3, dtype=torch.float64), training=False).reshape(x.shape),
     (_r(0, 4, 4, 3),)),
    ("batch_norm two values per channel",
     lambda x: jbp.batch_norm(x, jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3),
                              train=True)[0],
     lambda x: F.batch_norm(x, None, None, training=True), (_r(2, 3),)),
    ("mse 0-d", jbp.mse, F.mse_loss, (_r(), _r(seed=1))),
    ("mse reduction none, empty", lambda a, b: jbp.mse(a, b, reduction="none"),
     lambda a, b: F.mse_loss(a, b, reduction="none"), (_r(3, 0), _r(3, 0))),
    ("bce 0-d", jbp.sigmoid_binary_cross_entropy, F.binary_cross_entropy_with_logits,
     (_r(), np.array(0.3))),
    ("cross-entropy one class", lambda z: jbp.softmax_cross_entropy(z, jnp.zeros(4, jnp.int32)),
     lambda z: F.cross_entropy(z, torch.zeros(4, dtype=torch.int64)), (_r(4, 1),)),
]


@pytest.mark.parametrize("name, fn, torch_fn, inputs", MATCH, ids=[m[0] for m in MATCH])
def test_matches_pytorch(name, fn, torch_fn, inputs):
    args = [jnp.asarray(a) for a in inputs]
    out, vjp = jax.vjp(fn, *args)
    cot = _r(*np.shape(out), seed=3)
    tensors = [torch.tensor(a, requires_grad=True) for a in inputs]
    t_out = torch_fn(*tensors)
    assert tuple(out.shape) == tuple(t_out.shape), (out.shape, t_out.shape)
    np.testing.assert_allclose(np.asarray(out), t_out.detach().numpy(), rtol=1e-12, atol=1e-12)
    if out.size == 0 or all(t.numel() == 0 for t in tensors):
        return
    t_out.backward(torch.tensor(cot))
    for got, t in zip(vjp(jnp.asarray(cot)), tensors):
        want = t.grad.numpy() if t.grad is not None else np.zeros(t.shape)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-12)


# (id, call, exception, the argument the message must start with)
X = np.zeros((2, 8, 8, 3))
RAISE = [
    ("conv2d of a Python float", lambda: jbp.conv2d(1.0, jnp.zeros((3, 3, 3, 4))), TypeError,
     "x"),
    ("conv2d of an integer image", lambda: jbp.conv2d(jnp.zeros((1, 4, 4, 3), jnp.int32),
                                                      jnp.zeros((3, 3, 3, 4))), TypeError, "x"),
    ("conv2d with no input channels", lambda: jbp.conv2d(jnp.zeros((2, 5, 5, 0)),
                                                         jnp.zeros((3, 3, 0, 4))), ValueError,
     "x"),
    ("conv2d empty spatial axis", lambda: jbp.conv2d(jnp.zeros((2, 0, 5, 3)),
                                                     jnp.zeros((3, 3, 3, 4))), ValueError, "w"),
    ("conv2d kernel larger than the input", lambda: jbp.conv2d(
        jnp.zeros((2, 2, 2, 3)), jnp.zeros((3, 3, 3, 4)), padding="VALID"), ValueError, "w"),
    ("dense of a scalar", lambda: jbp.dense(jnp.float64(1), jnp.zeros((1, 3))), ValueError, "x"),
    ("dense of a list", lambda: jbp.dense([[1.0, 2.0]], jnp.zeros((2, 3))), TypeError, "x"),
    ("flatten of a scalar", lambda: jbp.flatten(jnp.float64(1)), ValueError, "x"),
    ("relu of an int array", lambda: jbp.relu(jnp.arange(3)), TypeError, "x"),
    ("relu of a Python float", lambda: jbp.relu(2.0), TypeError, "x"),
    ("softmax axis out of range", lambda: jbp.softmax(jnp.zeros(3), axis=1), ValueError,
     "axis"),
    ("max_pool window larger than the input", lambda: jbp.max_pool(jnp.asarray(X), 9),
     ValueError, "window"),
    ("max_pool with a window of 0", lambda: jbp.max_pool(jnp.asarray(X), 0), ValueError,
     "window"),
    ("adaptive_avg_pool of an empty axis", lambda: jbp.adaptive_avg_pool(
        jnp.zeros((2, 0, 4, 3)), 2), ValueError, "x"),
    ("pad reflect wider than the input", lambda: jbp.pad(jnp.zeros((1, 1, 1, 1)), 1,
                                                         "reflect"), ValueError, "padding"),
    ("batch_norm train on an empty batch", lambda: jbp.batch_norm(
        jnp.zeros((0, 4, 4, 3)), jnp.ones(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3),
        train=True), ValueError, "x"),
    ("cross-entropy of an empty batch", lambda: jbp.softmax_cross_entropy(
        jnp.zeros((0, 3)), jnp.zeros((0,), jnp.int32)), ValueError, "logits"),
    ("cross-entropy with zero classes", lambda: jbp.softmax_cross_entropy(
        jnp.zeros((2, 0)), jnp.zeros((2,), jnp.int32)), ValueError, "labels"),
    ("mse of Python floats", lambda: jbp.mse(1.0, 2.0), TypeError, "pred"),
    ("mse mean of an empty array", lambda: jbp.mse(jnp.zeros(0), jnp.zeros(0)), ValueError,
     "pred"),
    ("dropout of an int array", lambda: jbp.dropout(jnp.arange(4), 0.5, jax.random.key(0),
                                                    train=True), TypeError, "x"),
]


@pytest.mark.parametrize("name, call, exception, argument", RAISE, ids=[r[0] for r in RAISE])
def test_raises_jbp_message(name, call, exception, argument):
    with pytest.raises(exception, match=rf"^{re.escape(argument)}: "):
        call()


# Shapes PyTorch refuses where the answer is an empty array all the same: jbp returns it (and
# its empty gradients). The test checks that PyTorch still refuses, so a change shows up here.
EMPTY_WHERE_TORCH_REFUSES = [
    ("conv2d zero output channels", lambda x, w: jbp.conv2d(x, w, padding=1),
     lambda x, w: F.conv2d(_nchw(x), w.permute(3, 2, 0, 1), padding=1),
     (_r(2, 5, 5, 3), _r(3, 3, 3, 0)), (2, 5, 5, 0)),
    ("avg_pool zero channels", lambda x: jbp.avg_pool(x, 2),
     lambda x: F.avg_pool2d(_nchw(x), 2), (_r(2, 4, 4, 0),), (2, 2, 2, 0)),
]


@pytest.mark.parametrize("name, fn, torch_fn, inputs, shape", EMPTY_WHERE_TORCH_REFUSES,
                         ids=[e[0] for e in EMPTY_WHERE_TORCH_REFUSES])
def test_empty_where_pytorch_refuses(name, fn, torch_fn, inputs, shape):
    with pytest.raises(RuntimeError):
        torch_fn(*[torch.tensor(a) for a in inputs])
    args = [jnp.asarray(a) for a in inputs]
    out, vjp = jax.vjp(fn, *args)
    assert out.shape == shape
    for got, a in zip(vjp(jnp.zeros(shape, out.dtype)), args):
        assert got.shape == a.shape and not np.any(np.asarray(got))

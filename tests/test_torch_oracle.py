"""PyTorch as an independent oracle for jbp's forwards and hand-written backwards.

Every case builds seeded random inputs with NumPy, runs the jbp layer forward and its
``jax.vjp`` with a random cotangent (gradients w.r.t. every differentiable input), runs the same
computation in ``torch.nn.functional`` with autograd (``out.backward(cotangent)``), converts the
layouts (NHWC <-> NCHW, HWIO <-> OIHW, (in, out) <-> (out, in)) and asserts that the forward
and every gradient agree in float64 to ``rtol=1e-10, atol=1e-12``.
"""

from __future__ import annotations

import zlib

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip(
    "torch", reason="PyTorch not installed: pip install -e '.[torch]' to run the PyTorch oracle "
                    "tests")
F = torch.nn.functional

import jbp  # noqa: E402

RTOL, ATOL = 1e-10, 1e-12

# Axis permutations from jbp's layout to PyTorch's (np.transpose order); None keeps the array.
NCHW = (0, 3, 1, 2)     # NHWC image -> NCHW
OIHW = (3, 2, 0, 1)     # HWIO kernel -> (C_out, C_in/groups, KH, KW)
OUT_IN = (1, 0)         # dense weight (in, out) -> torch linear weight (out, in)


def _to_torch_layout(a: np.ndarray, perm) -> np.ndarray:
    return a if perm is None else np.transpose(a, perm)


def _from_torch_layout(a: np.ndarray, perm) -> np.ndarray:
    return a if perm is None else np.transpose(a, np.argsort(perm))


def _rng(*key) -> np.random.Generator:
    """A generator seeded from the test case (stable across runs, unlike ``hash``)."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _close(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == np.float64, f"{what}: dtype {actual.dtype}, expected float64"
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL, err_msg=what)


def _compare(jbp_fn, torch_fn, inputs, layouts=None, out_layout=None, seed=0):
    """Check ``jbp_fn`` against ``torch_fn``, forward and VJP w.r.t. every input.

    Args:
      jbp_fn: callable on jnp arrays in jbp layout, returning one array.
      torch_fn: callable on torch tensors in torch layout, returning one tensor.
      inputs: float64 NumPy arrays in jbp layout; all are differentiated.
      layouts: per input, a permutation to the torch layout (or None).
      out_layout: permutation of the output to the torch layout (or None).
    Returns the torch input tensors (for checks of in-place state by the caller).
    """
    layouts = layouts or [None] * len(inputs)
    assert len(layouts) == len(inputs)

    out, vjp = jax.vjp(jbp_fn, *[jnp.asarray(a) for a in inputs])
    cot = np.random.default_rng(seed + 1000).standard_normal(np.shape(out))
    grads = vjp(jnp.asarray(cot))

    t_in = [torch.tensor(_to_torch_layout(a, p).copy(), dtype=torch.float64, requires_grad=True)
            for a, p in zip(inputs, layouts)]
    t_out = torch_fn(*t_in)
    t_out.backward(torch.tensor(_to_torch_layout(cot, out_layout).copy(), dtype=torch.float64))

    _close(out, _from_torch_layout(t_out.detach().numpy(), out_layout), "forward")
    for i, (g, t, p) in enumerate(zip(grads, t_in, layouts)):
        assert t.grad is not None, f"torch computed no gradient for input {i}"
        _close(g, _from_torch_layout(t.grad.numpy(), p), f"gradient w.r.t. input {i}")
    return t_in


def _normal(rng, *shape):
    return rng.standard_normal(shape)


def _same_pads(size, k_eff, stride):
    """TensorFlow/XLA "SAME": output ceil(size/stride), extra padding cell at the end."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k_eff - size, 0)
    return total // 2, total - total // 2


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# --- conv2d ------------------------------------------------------------------------------------

# (id, N, H, W, C_in, C_out, (KH, KW), stride, padding, dilation, groups)
CONV_CASES = [
    ("k3_s1_valid_7x9", 2, 7, 9, 3, 4, (3, 3), 1, "VALID", 1, 1),
    ("k3_s1_same_7x9", 2, 7, 9, 3, 4, (3, 3), 1, "SAME", 1, 1),
    ("k4x2_s1_same_asym", 2, 7, 6, 3, 4, (4, 2), 1, "SAME", 1, 1),
    ("k3_s2_same_asym_8x9", 2, 8, 9, 3, 4, (3, 3), 2, "SAME", 1, 1),
    ("k3_s2_same_7x9", 2, 7, 9, 2, 3, (3, 3), 2, "SAME", 1, 1),
    ("k3_s2_valid_7x9", 2, 7, 9, 3, 4, (3, 3), 2, "VALID", 1, 1),
    ("k2_s2_valid_leftover_7x9", 2, 7, 9, 3, 2, (2, 2), 2, "VALID", 1, 1),
    ("k3_s21_valid", 2, 7, 8, 3, 4, (3, 3), (2, 1), "VALID", 1, 1),
    ("k3_s21_same", 2, 7, 8, 3, 4, (3, 3), (2, 1), "SAME", 1, 1),
    ("k3_s1_pad1", 2, 7, 9, 3, 4, (3, 3), 1, 1, 1, 1),
    ("k3_s2_pad1_7x9", 2, 7, 9, 3, 4, (3, 3), 2, 1, 1, 1),
    ("k3_pad2_s2", 2, 6, 7, 2, 3, (3, 3), 2, 2, 1, 1),
    ("k3_explicit_pad", 2, 6, 7, 3, 4, (3, 3), 1, ((1, 0), (2, 1)), 1, 1),
    ("k5x3_s21_explicit_pad", 2, 8, 7, 2, 3, (5, 3), (2, 1), ((1, 0), (2, 1)), 1, 1),
    ("k3_dil2_valid", 2, 9, 9, 3, 4, (3, 3), 1, "VALID", 2, 1),
    ("k3_dil2_same", 2, 8, 9, 3, 4, (3, 3), 1, "SAME", 2, 1),
    ("k3_dil2_s2_pad1", 2, 9, 8, 2, 3, (3, 3), 2, 1, 2, 1),
    ("k3_dil21_s12_valid", 2, 8, 9, 2, 3, (3, 2), (1, 2), "VALID", (2, 1), 1),
    ("groups2", 2, 7, 8, 4, 6, (3, 3), 1, "SAME", 1, 2),
    ("groups2_s2_pad1_dil2", 2, 9, 8, 4, 6, (3, 3), 2, 1, 2, 2),
    ("groups3_explicit_pad", 2, 6, 7, 6, 3, (2, 3), (2, 1), ((1, 0), (2, 1)), 1, 3),
    ("depthwise", 2, 7, 8, 3, 3, (3, 3), 1, "SAME", 1, 3),
    ("depthwise_mult2_s2", 2, 7, 9, 3, 6, (3, 3), 2, "SAME", 1, 3),
    ("depthwise_valid_s21", 2, 7, 9, 4, 4, (3, 3), (2, 1), "VALID", 1, 4),
    ("1x1_s2_7x9", 2, 7, 9, 3, 5, (1, 1), 2, "VALID", 1, 1),
    ("1x1_s2_same_7x9", 2, 7, 9, 3, 5, (1, 1), 2, "SAME", 1, 1),
    ("1x1_s1", 3, 4, 5, 3, 2, (1, 1), 1, "VALID", 1, 1),
    # Thin layers: jbp's CPU forward runs over blocks of columns (the "columns" forms of
    # jbp._conv_kernels), and from batch 32 its weight gradient too.
    ("thin_k5_same_12x17", 2, 12, 17, 1, 6, (5, 5), 1, "SAME", 1, 1),
    ("thin_k3_pad1_n32", 32, 5, 13, 3, 16, (3, 3), 1, 1, 1, 1),
    ("thin_k5_valid_6to16_n32", 32, 9, 10, 6, 16, (5, 5), 1, "VALID", 1, 1),
]


def _explicit_conv_pads(padding, h, w, k_eff, stride):
    if padding == "VALID":
        return (0, 0), (0, 0)
    if padding == "SAME":
        return tuple(_same_pads(size, k, s) for size, k, s in zip((h, w), k_eff, stride))
    if isinstance(padding, int):
        return (padding, padding), (padding, padding)
    return tuple(tuple(p) for p in padding)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
def test_conv2d(case, bias):
    name, n, h, w, cin, cout, (kh, kw), stride, padding, dilation, groups = case
    rng = _rng("conv", name, bias)
    x = _normal(rng, n, h, w, cin)
    k = _normal(rng, kh, kw, cin // groups, cout)
    inputs, layouts = [x, k], [NCHW, OIHW]
    if bias:
        inputs.append(_normal(rng, cout))
        layouts.append(None)

    s, d = _pair(stride), _pair(dilation)
    k_eff = ((kh - 1) * d[0] + 1, (kw - 1) * d[1] + 1)
    (pt, pb), (pl, pr) = _explicit_conv_pads(padding, h, w, k_eff, s)

    def jbp_fn(x, k, b=None):
        return jbp.conv2d(x, k, b, stride=stride, padding=padding, dilation=dilation,
                          groups=groups)

    def torch_fn(x, k, b=None):
        if isinstance(padding, int):            # PyTorch's own symmetric padding
            return F.conv2d(x, k, b, stride=s, padding=padding, dilation=d, groups=groups)
        x = F.pad(x, (pl, pr, pt, pb))          # (left, right, top, bottom), zeros
        return F.conv2d(x, k, b, stride=s, padding=0, dilation=d, groups=groups)

    _compare(jbp_fn, torch_fn, inputs, layouts, out_layout=NCHW)


# --- pooling -----------------------------------------------------------------------------------

# (id, N, H, W, C, window, stride, padding)
POOL_CASES = [
    ("2x2_s2_8x8", 2, 8, 8, 3, 2, 2, "VALID"),
    ("2x2_s2_odd_7x9", 2, 7, 9, 3, 2, 2, "VALID"),
    ("2x2_default_stride", 2, 6, 8, 2, 2, None, "VALID"),
    ("3x3_s2_overlap_7x9", 2, 7, 9, 3, 3, 2, "VALID"),
    ("3x3_s2_pad1_7x9", 2, 7, 9, 3, 3, 2, 1),
    ("3x3_s2_pad1_8x8", 2, 8, 8, 2, 3, 2, 1),
    ("3x3_s1_pad1", 2, 5, 6, 2, 3, 1, 1),
    ("2x3_s12_valid", 2, 6, 9, 2, (2, 3), (1, 2), "VALID"),
    ("3x2_s21_pad_h1", 2, 7, 6, 2, (3, 2), (2, 1), ((1, 1), (0, 0))),
    ("3x3_s2_same_8x9", 2, 8, 9, 3, 3, 2, "SAME"),
    ("2x2_s1_same_7x9", 2, 7, 9, 2, 2, 1, "SAME"),
    ("3x3_s2_explicit", 2, 7, 8, 2, 3, 2, ((1, 0), (2, 1))),
]


def _pool_geometry(case):
    _, n, h, w, c, window, stride, padding = case
    win = _pair(window)
    st = win if stride is None else _pair(stride)
    if padding == "VALID":
        pads = ((0, 0), (0, 0))
    elif padding == "SAME":
        pads = tuple(_same_pads(size, k, s) for size, k, s in zip((h, w), win, st))
    elif isinstance(padding, int):
        pads = ((padding, padding), (padding, padding))
    else:
        pads = tuple(tuple(p) for p in padding)
    symmetric = pads[0][0] == pads[0][1] and pads[1][0] == pads[1][1]
    return (n, h, w, c), win, st, pads, symmetric


def _torch_pool(pool, x, win, st, pads, symmetric, pad_value, **kw):
    """Torch pooling; symmetric padding natively, otherwise F.pad with ``pad_value``."""
    (pt, pb), (pl, pr) = pads
    if symmetric:
        return pool(x, win, st, padding=(pt, pl), **kw)
    return pool(F.pad(x, (pl, pr, pt, pb), value=pad_value), win, st, padding=0, **kw)


@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_max_pool(case):
    shape, win, st, pads, symmetric = _pool_geometry(case)
    x = _normal(_rng("max", case[0]), *shape)     # continuous values: no ties
    _compare(lambda x: jbp.max_pool(x, case[5], case[6], case[7]),
             lambda x: _torch_pool(F.max_pool2d, x, win, st, pads, symmetric, -np.inf),
             [x], [NCHW], out_layout=NCHW)


@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl_pad", "excl_pad"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_avg_pool(case, count_include_pad):
    shape, win, st, pads, symmetric = _pool_geometry(case)
    x = _normal(_rng("avg", case[0], count_include_pad), *shape)
    (pt, pb), (pl, pr) = pads

    def torch_fn(x):
        if symmetric:       # PyTorch's own padding and count_include_pad
            return F.avg_pool2d(x, win, st, padding=(pt, pl),
                                count_include_pad=count_include_pad)
        padded = F.avg_pool2d(F.pad(x, (pl, pr, pt, pb)), win, st)   # zeros, divisor KH*KW
        if count_include_pad:
            return padded
        # Exclude the padding: divide the window sums by the count of real cells in each.
        ones = F.pad(torch.ones_like(x[:1, :1]), (pl, pr, pt, pb))
        return padded / F.avg_pool2d(ones, win, st)

    _compare(lambda x: jbp.avg_pool(x, case[5], case[6], case[7],
                                    count_include_pad=count_include_pad),
             torch_fn, [x], [NCHW], out_layout=NCHW)


@pytest.mark.parametrize("shape", [(2, 7, 9, 3), (3, 1, 1, 4), (1, 4, 5, 6)])
def test_global_avg_pool(shape):
    x = _normal(_rng("gap", shape), *shape)
    _compare(jbp.global_avg_pool, lambda x: x.mean((2, 3)), [x], [NCHW])


# --- batch norm --------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum, eps", [(0.9, 1e-5), (0.7, 1e-3)])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 4), (2, 3, 3, 2), (6, 5), (2, 3)],
                         ids=["nhwc_3x4x5x4", "nhwc_2x3x3x2", "nc_6x5", "nc_2x3"])
def test_batch_norm(shape, train, momentum, eps):
    rng = _rng("bn", shape, train, momentum)
    c = shape[-1]
    x = 2.0 * _normal(rng, *shape) + 0.5
    gamma = 1.0 + 0.5 * _normal(rng, c)
    beta = _normal(rng, c)
    r_mean = _normal(rng, c)
    r_var = rng.uniform(0.5, 2.0, c)
    layout = NCHW if len(shape) == 4 else None

    def jbp_call(x, gamma, beta):
        return jbp.batch_norm(x, gamma, beta, jnp.asarray(r_mean), jnp.asarray(r_var),
                              train=train, momentum=momentum, eps=eps)

    t_mean, t_var = torch.tensor(r_mean), torch.tensor(r_var)   # updated in place by torch

    def torch_fn(x, gamma, beta):
        return F.batch_norm(x, t_mean, t_var, gamma, beta, training=train,
                            momentum=1.0 - momentum, eps=eps)

    _compare(lambda *a: jbp_call(*a)[0], torch_fn, [x, gamma, beta], [layout, None, None],
             out_layout=layout)

    _, (new_mean, new_var) = jbp_call(jnp.asarray(x), jnp.asarray(gamma), jnp.asarray(beta))
    _close(new_mean, t_mean.numpy(), "running mean")
    _close(new_var, t_var.numpy(), "running var")
    if train:   # the update really happened (the check above is not comparing old to old)
        assert not np.allclose(t_mean.numpy(), r_mean)
        assert not np.allclose(t_var.numpy(), r_var)
    else:
        np.testing.assert_array_equal(t_mean.numpy(), r_mean)
        np.testing.assert_array_equal(t_var.numpy(), r_var)


# --- dense -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n, d_in, d_out", [(3, 5, 4), (1, 6, 1), (2, 1, 3)])
def test_dense(n, d_in, d_out, bias):
    rng = _rng("dense", n, d_in, d_out, bias)
    inputs, layouts = [_normal(rng, n, d_in), _normal(rng, d_in, d_out)], [None, OUT_IN]
    if bias:
        inputs.append(_normal(rng, d_out))
        layouts.append(None)
    _compare(lambda x, w, b=None: jbp.dense(x, w, b),
             lambda x, w, b=None: F.linear(x, w, b), inputs, layouts)


# --- losses ------------------------------------------------------------------------------------

def _probs(rng, n, k):
    e = np.exp(_normal(rng, n, k))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("n, k", [(3, 5), (1, 4), (4, 2)])
def test_cross_entropy_int_labels(n, k, label_smoothing):
    rng = _rng("ce_int", n, k, label_smoothing)
    logits = 3.0 * _normal(rng, n, k)
    labels = rng.integers(0, k, n)
    _compare(lambda z: jbp.softmax_cross_entropy(z, jnp.asarray(labels),
                                                 label_smoothing=label_smoothing),
             lambda z: F.cross_entropy(z, torch.tensor(labels),
                                       label_smoothing=label_smoothing),
             [logits])


@pytest.mark.parametrize("normalised", [True, False], ids=["probs", "unnormalised"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("n, k", [(3, 5), (2, 3)])
def test_cross_entropy_soft_labels(n, k, label_smoothing, normalised):
    """Gradients w.r.t. the logits and the soft targets (PyTorch differentiates both)."""
    rng = _rng("ce_soft", n, k, label_smoothing, normalised)
    logits = 3.0 * _normal(rng, n, k)
    targets = _probs(rng, n, k) if normalised else rng.uniform(0.0, 2.0, (n, k))
    _compare(lambda z, y: jbp.softmax_cross_entropy(z, y, label_smoothing=label_smoothing),
             lambda z, y: F.cross_entropy(z, y, label_smoothing=label_smoothing),
             [logits, targets])


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4, 2), (5,)])
def test_mse(shape):
    rng = _rng("mse", shape)
    _compare(jbp.mse, F.mse_loss, [_normal(rng, *shape), _normal(rng, *shape)])


@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["moderate", "large_logits"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 3, 2)])
def test_sigmoid_binary_cross_entropy(shape, scale):
    rng = _rng("bce", shape, scale)
    logits = scale * _normal(rng, *shape)
    targets = rng.uniform(0.0, 1.0, shape)      # soft targets in [0, 1]
    _compare(jbp.sigmoid_binary_cross_entropy, F.binary_cross_entropy_with_logits,
             [logits, targets])


# --- activations -------------------------------------------------------------------------------

ACTIVATIONS = [
    ("relu", jbp.relu, F.relu),
    ("leaky_relu_0.2", lambda x: jbp.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    ("sigmoid", jbp.sigmoid, torch.sigmoid),
    ("tanh", jbp.tanh, torch.tanh),
    ("softmax_last", lambda x: jbp.softmax(x, axis=-1), lambda x: F.softmax(x, dim=-1)),
    ("softmax_axis1", lambda x: jbp.softmax(x, axis=1), lambda x: F.softmax(x, dim=1)),
    ("log_softmax_last", lambda x: jbp.log_softmax(x, axis=-1),
     lambda x: F.log_softmax(x, dim=-1)),
    ("log_softmax_axis1", lambda x: jbp.log_softmax(x, axis=1),
     lambda x: F.log_softmax(x, dim=1)),
]


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 3, 5)], ids=["2d", "4d"])
@pytest.mark.parametrize("name, jbp_fn, torch_fn", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation(name, jbp_fn, torch_fn, shape):
    x = 3.0 * _normal(_rng("act", name, shape), *shape)   # no exact zeros: ReLU kink avoided
    _compare(jbp_fn, torch_fn, [x])

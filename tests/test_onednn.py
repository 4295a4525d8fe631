"""The oneDNN convolution kernels (jbp/_conv_kernels/onednn.py) against XLA's convolution.

Each FFI op is compared with ``lax.conv_general_dilated`` and its ``jax.vjp`` (an independent
implementation), in float32, over strides, asymmetric padding, dilation, groups and depthwise
shapes; then second order, ``vmap`` (per-example gradients), ``checkpoint``, concurrent calls, and
the fallback when the library cannot be built. Skipped, with the reason, where oneDNN is not
available (no ``jbp[onednn]`` wheel or no compiler).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jbp.layers.conv import conv_config
from jbp._conv_kernels import _onednn_build as build
from jbp._conv_kernels import onednn

_LIB = build.library()
pytestmark = pytest.mark.skipif(
    _LIB is None, reason=f"oneDNN kernels unavailable: {build.unavailable_reason()}")


@pytest.fixture(autouse=True, scope="module")
def _onednn_on():
    """oneDNN is the default (build.DEFAULT_BACKEND), but $JBP_CONV_BACKEND may say otherwise
    (.ci/run reruns the grid with xla): these tests switch it on whatever the environment."""
    onednn.set_conv_backend("onednn")
    yield
    onednn.set_conv_backend(None)

# (x shape, w shape, conv2d keyword arguments)
CASES = {
    "3x3 same": ((2, 8, 8, 4), (3, 3, 4, 6), {}),
    "stride 2, odd size (cells past the last window)": ((2, 9, 9, 3), (3, 3, 3, 5), dict(stride=2)),
    "stride (1,2), asymmetric padding": ((2, 7, 10, 3), (3, 2, 3, 4),
                                         dict(stride=(1, 2), padding=((2, 0), (1, 3)))),
    "valid, dilation (2,3)": ((2, 11, 12, 2), (3, 2, 2, 3), dict(padding="VALID", dilation=(2, 3))),
    "groups 3, dilated, strided": ((3, 10, 9, 6), (3, 3, 2, 9),
                                   dict(groups=3, dilation=2, stride=2, padding=1)),
    "depthwise": ((2, 8, 8, 5), (3, 3, 1, 5), dict(groups=5)),
    "depthwise, multiplier 2, stride 2": ((2, 9, 8, 4), (5, 5, 1, 8), dict(groups=4, stride=2)),
    "depthwise 5x5, stride 2, padding 2 (EfficientNet-B0)": ((2, 9, 9, 6), (5, 5, 1, 6),
                                                             dict(groups=6, stride=2, padding=2)),
    "depthwise 3x3, stride 2, even size (MobileNetV2)": ((2, 8, 8, 6), (3, 3, 1, 6),
                                                         dict(groups=6, stride=2, padding=1)),
    "1x1, stride 2": ((2, 8, 8, 6), (1, 1, 6, 7), dict(stride=2, padding="VALID")),
    "LeNet-5 conv1 (5x5 valid, 1->6)": ((4, 28, 28, 1), (5, 5, 1, 6), dict(padding="VALID")),
    "kernel larger than padded input side": ((1, 3, 3, 2), (5, 5, 2, 3), dict(padding=2)),
}


def _xla(x, w, cfg):
    return lax.conv_general_dilated(
        x, w, window_strides=cfg.stride, padding=cfg.padding, rhs_dilation=cfg.dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=cfg.groups)


def _arrays(case, seed=0):
    xs, ws, kw = CASES[case]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(xs), jnp.float32)
    w = jnp.asarray(rng.standard_normal(ws), jnp.float32)
    return x, w, conv_config(x, w, **kw)


def _close(actual, expected):
    """float32 sums of at most a few hundred terms: 1e-5 of the largest magnitude."""
    expected = np.asarray(expected)
    scale = max(float(np.max(np.abs(expected))), 1.0)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("case", CASES)
def test_three_equations_match_xla(case):
    x, w, cfg = _arrays(case)
    assert onednn.select(x.shape, w.shape, cfg, x.dtype) == {}
    z_ref, vjp = jax.vjp(lambda x, w: _xla(x, w, cfg), x, w)
    g = jnp.asarray(np.random.default_rng(1).standard_normal(z_ref.shape), jnp.float32)
    dx_ref, dw_ref = vjp(g)
    z = jax.jit(onednn.correlate, static_argnums=2)(x, w, cfg)
    dx = jax.jit(onednn.input_grad, static_argnums=(2, 3))(g, w, x.shape, cfg)
    dw = jax.jit(onednn.weight_grad, static_argnums=(2, 3))(x, g, w.shape, cfg)
    assert z.shape == z_ref.shape and dx.shape == x.shape and dw.shape == w.shape
    _close(z, z_ref)
    _close(dx, dx_ref)
    _close(dw, dw_ref)


def _loss(conv):
    return lambda x, w: jnp.sum(jnp.tanh(conv(x, w)) ** 2)


@pytest.mark.parametrize("case", ["stride 2, odd size (cells past the last window)",
                                  "groups 3, dilated, strided", "depthwise"])
def test_second_and_third_order_match_xla(case):
    """grad(grad) and a third derivative of a composition of correlate: every JVP rule of the
    three ops, transposed by JAX, against XLA's convolution differentiated by JAX."""
    x, w, cfg = _arrays(case)
    rng = np.random.default_rng(2)
    vx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    vw = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)

    def hvp(conv):  # Hessian-vector product, reverse over reverse
        grad = jax.grad(_loss(conv), argnums=(0, 1))
        return jax.grad(lambda x, w: sum(jnp.vdot(a, b) for a, b in zip(grad(x, w), (vx, vw))),
                        argnums=(0, 1))

    def third(conv):  # d/dx of a component of the HVP
        return jax.grad(lambda x, w: jnp.sum(hvp(conv)(x, w)[1] * vw), argnums=(0, 1))

    ours = lambda x, w: onednn.correlate(x, w, cfg)  # noqa: E731
    ref = lambda x, w: _xla(x, w, cfg)  # noqa: E731
    for transform in (hvp, third):
        got = jax.jit(transform(ours))(x, w)
        want = jax.jit(transform(ref))(x, w)
        for a, b in zip(got, want):
            _close(a, b)


def test_hessian_forward_over_reverse_float32_through_the_rule():
    """jax.hessian (jacfwd of jacrev) of the manual conv2d with oneDNN on: forward mode enters
    the rule's backward, whose input_grad/weight_grad are these ops."""
    import jbp
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 4, 4, 2)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 2, 2)), jnp.float32)
    cfg = conv_config(x, w)
    assert onednn.select_input_grad(x.shape, w.shape, cfg, x.dtype) == {}

    def loss(ns):
        return lambda x: jnp.sum(jnp.tanh(ns.conv2d(x, w)) ** 2)

    _close(jax.hessian(loss(jbp))(x), jax.hessian(loss(jbp.autodiff))(x))


def test_vjps_of_the_gradient_ops_match_xla():
    """input_grad and weight_grad differentiated directly (their own rules)."""
    x, w, cfg = _arrays("stride (1,2), asymmetric padding")
    z = _xla(x, w, cfg)
    rng = np.random.default_rng(3)
    g = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
    ct_x = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ct_w = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
    got = jax.vjp(lambda g, w: onednn.input_grad(g, w, x.shape, cfg), g, w)[1](ct_x)
    want = jax.vjp(lambda g, w: jax.vjp(lambda x: _xla(x, w, cfg), x)[1](g)[0], g, w)[1](ct_x)
    got += jax.vjp(lambda x, g: onednn.weight_grad(x, g, w.shape, cfg), x, g)[1](ct_w)
    want += jax.vjp(lambda x, g: jax.vjp(lambda x, w: _xla(x, w, cfg), x, w)[1](g)[1],
                    x, g)[1](ct_w)
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("case", ["groups 3, dilated, strided", "depthwise"])
def test_vmap_per_example_gradients_match_xla(case):
    """vmap(grad) over examples (batch folded into N for the image side, a loop for the kernel
    side), over kernels, over both, and nested."""
    x, w, cfg = _arrays(case)
    grads = {name: jax.grad(_loss(conv), argnums=(0, 1)) for name, conv in
             (("ours", lambda x, w: onednn.correlate(x, w, cfg)),
              ("ref", lambda x, w: _xla(x, w, cfg)))}
    x1 = x[:, None]  # per example: batch of one
    ws = jnp.stack([w, 2 * w, -w])
    xs = jnp.stack([x, x[::-1], 0.5 * x])
    batchings = (((0, None), (x1, w)), ((None, 0), (x, ws)), ((0, 0), (xs, ws)))
    if case == "depthwise":  # the per-example case only
        batchings = batchings[:1]
    for in_axes, args in batchings:
        got = jax.jit(jax.vmap(grads["ours"], in_axes))(*args)
        want = jax.jit(jax.vmap(grads["ref"], in_axes))(*args)
        for a, b in zip(got, want):
            _close(a, b)
    if case != "depthwise":
        nested = lambda f: jax.vmap(jax.vmap(f, (0, None)), (None, 0))  # noqa: E731
        for a, b in zip(jax.jit(nested(grads["ours"]))(x1, ws), nested(grads["ref"])(x1, ws)):
            _close(a, b)


def test_checkpointed_gradient_matches_xla():
    x, w, cfg = _arrays("3x3 same")
    w2 = jnp.asarray(np.random.default_rng(5).standard_normal((3, 3, 6, 4)), jnp.float32)

    def loss(conv):
        block = jax.checkpoint(lambda x, w, w2: jnp.tanh(conv(jnp.tanh(conv(x, w)), w2)))
        return lambda x, w, w2: jnp.sum(block(x, w, w2) ** 2)

    got = jax.jit(jax.grad(loss(lambda x, w: onednn.correlate(x, w, cfg)), (0, 1, 2)))(x, w, w2)
    want = jax.grad(loss(lambda x, w: _xla(x, w, cfg)), (0, 1, 2))(x, w, w2)
    for a, b in zip(got, want):
        _close(a, b)


def test_independent_calls_in_one_program_are_each_right():
    """XLA:CPU runs independent FFI calls concurrently: each must keep its own scratch."""
    cases = list(CASES)[:6]
    arrays = [_arrays(c, seed=i) for i, c in enumerate(cases)]

    def many(xs, ws):
        out = []
        for (x, w, cfg) in zip(xs, ws, [a[2] for a in arrays]):
            z = onednn.correlate(x, w, cfg)
            out += [z, onednn.input_grad(z, w, x.shape, cfg),
                    onednn.weight_grad(x, z, w.shape, cfg)]
        return out

    xs, ws = [a[0] for a in arrays], [a[1] for a in arrays]
    for _ in range(3):
        got = jax.jit(many)(xs, ws)
        for i, (x, w, cfg) in enumerate(arrays):
            z, vjp = jax.vjp(lambda x, w: _xla(x, w, cfg), x, w)
            for a, b in zip(got[3 * i:3 * i + 3], (z, *vjp(z))):
                _close(a, b)


def test_select_declines_what_it_does_not_cover():
    x, w, cfg = _arrays("3x3 same")
    assert onednn.select(x.shape, w.shape, cfg, jnp.float64) is None
    assert onednn.select(x.shape, w.shape, cfg, jnp.bfloat16) is None
    assert onednn.select((0,) + x.shape[1:], w.shape, cfg, jnp.float32) is None
    negative = cfg._replace(padding=((-1, 0), (0, 0)))
    assert onednn.select(x.shape, w.shape, negative, jnp.float32) is None


def test_table_predicates_keep_the_measured_losers_on_xla():
    """1×1 kernels (all equations) and strided input gradients stay on XLA (docs/onednn.md)."""
    x, w, cfg = _arrays("1x1, stride 2")
    assert onednn.select(x.shape, w.shape, cfg, x.dtype) == {}  # supported, but slower
    for pred in (onednn.select_forward, onednn.select_input_grad, onednn.select_weight_grad):
        assert pred(x.shape, w.shape, cfg, x.dtype) is None
    x, w, cfg = _arrays("stride 2, odd size (cells past the last window)")
    assert onednn.select_forward(x.shape, w.shape, cfg, x.dtype) == {}
    assert onednn.select_weight_grad(x.shape, w.shape, cfg, x.dtype) == {}
    assert onednn.select_input_grad(x.shape, w.shape, cfg, x.dtype) is None


@pytest.mark.parametrize("case", ["groups 3, dilated, strided",
                                  "depthwise 5x5, stride 2, padding 2 (EfficientNet-B0)"])
def test_strided_grouped_input_grad_stays_on_onednn(case):
    """A strided grouped input gradient has no phase form; XLA's grouped convolution for it ran
    66-350× slower than oneDNN on MobileNetV2's depthwise layers (docs/onednn.md)."""
    from jbp._conv_kernels import choose
    x, w, cfg = _arrays(case)
    chosen = choose("input_grad", x.shape, w.shape, cfg, x.dtype)
    assert chosen and chosen[0].name == "onednn", chosen


def test_backend_switch(monkeypatch):
    x, w, cfg = _arrays("3x3 same")
    onednn.set_conv_backend(None)                    # the module's fixture set "onednn"
    monkeypatch.delenv("JBP_CONV_BACKEND", raising=False)
    assert onednn.conv_backend() == build.DEFAULT_BACKEND == "onednn"
    monkeypatch.setenv("JBP_CONV_BACKEND", "mkl")
    with pytest.raises(ValueError, match="JBP_CONV_BACKEND='mkl': expected one of xla, onednn"):
        onednn.conv_backend()
    monkeypatch.setenv("JBP_CONV_BACKEND", "XLA")
    assert onednn.conv_backend() == "xla"
    monkeypatch.delenv("JBP_CONV_BACKEND")
    try:
        onednn.set_conv_backend("xla")
        assert onednn.conv_backend() == "xla" and onednn.describe() == "xla"
        assert onednn.select(x.shape, w.shape, cfg, x.dtype) is None
        onednn.set_conv_backend("onednn")
        assert onednn.select(x.shape, w.shape, cfg, x.dtype) == {}
        with pytest.raises(ValueError, match="xla, onednn"):
            onednn.set_conv_backend("mkl")
    finally:
        onednn.set_conv_backend("onednn")


def test_manual_rule_takes_oneDNN_and_autodiff_keeps_xla():
    """Through the table (jbp._conv_kernels.FORMS): the manual conv2d's gradient is three FFI
    calls and no XLA convolution; jbp.autodiff's is XLA's; both give XLA's numbers."""
    import jbp
    x, w, cfg = _arrays("3x3 same")

    def grad(ns):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(ns.conv2d(x, w)) ** 2), (0, 1)))

    manual = grad(jbp).lower(x, w).as_text()
    assert all(f"custom_call @{t}" in manual for t in build.TARGETS), manual
    assert "convolution" not in manual
    assert "JbpDnnl" not in grad(jbp.autodiff).lower(x, w).as_text()
    for a, b in zip(grad(jbp)(x, w), grad(jbp.autodiff)(x, w)):
        _close(a, b)


def test_cuda_lowering_has_no_oneDNN_call():
    """lax.platform_dependent keeps the FFI calls (registered for cpu only) off GPU lowerings."""
    import jbp
    x, w, cfg = _arrays("3x3 same")
    step = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.tanh(jbp.conv2d(x, w)) ** 2), (0, 1)))
    text = jax.export.export(step, platforms=("cuda",))(x, w).mlir_module()
    assert "JbpDnnl" not in text and "convolution" in text


def test_grid_reaches_the_oneDNN_form_of_each_equation():
    """The grid's conv cases (jbp/testing/grid.py), in float32, take oneDNN for every equation, with
    groups, depthwise kernels, dilation and asymmetric padding among them."""
    from jbp._conv_kernels import choose
    from jbp.testing.grid import CONV_CASES
    reached = {}
    for case in CONV_CASES:
        kw = {k: v for k, v in case.kwargs.items() if k != "padding_mode"}
        x, w = jnp.zeros(case.shapes[0], jnp.float32), jnp.zeros(case.shapes[1], jnp.float32)
        cfg = conv_config(x, w, **kw)
        for equation in ("forward", "input_grad", "weight_grad"):
            chosen = choose(equation, x.shape, w.shape, cfg, x.dtype)
            if chosen and chosen[0].name == "onednn":
                reached.setdefault(equation, set()).update(
                    k for k in ("groups", "dilation", "padding", "stride") if k in kw)
    assert set(reached) == {"forward", "input_grad", "weight_grad"}, reached
    assert {"groups", "dilation", "padding"} <= reached["input_grad"], reached
    assert {"groups", "dilation", "padding", "stride"} <= reached["weight_grad"], reached


_FALLBACK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import jbp
    from jbp.layers.conv import conv_config
    from jbp._conv_kernels import onednn
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 3)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 3, 4)), jnp.float32)
    cfg = conv_config(x, w)
    for _ in range(3):
        assert onednn.select(x.shape, w.shape, cfg, x.dtype) is None
    grad = lambda ns: jax.jit(jax.grad(lambda x, w: jnp.sum(ns.conv2d(x, w) ** 2), (0, 1)))
    assert "JbpDnnl" not in grad(jbp).lower(x, w).as_text()
    for a, b in zip(grad(jbp)(x, w), grad(jbp.autodiff)(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    print("DESCRIBE", onednn.describe())
""")


def test_fallback_without_a_compiler_says_why_once(tmp_path):
    """A machine without g++ (CXX points nowhere; empty build cache): one warning line, and
    every case declines oneDNN, so the XLA forms run."""
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), JBP_CACHE_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(sys.path), JAX_PLATFORMS="cpu")
    env["JBP_CONV_BACKEND"] = "onednn"
    done = subprocess.run([sys.executable, "-c", _FALLBACK], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if "oneDNN" in ln]
    assert len(lines) == 1, done.stderr
    assert "no C++ compiler" in lines[0] and "using XLA's convolutions" in lines[0]
    assert "DESCRIBE xla (oneDNN unavailable)" in done.stdout

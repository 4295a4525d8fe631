"""Property-based tests: manual gradients equal autodiff for random layer configurations.

hypothesis draws shapes, strides, paddings, dilations, groups and windows; every generated case is
checked in float64 against jax.vjp of the jbp.autodiff twin (same forward, JAX's backward). The
example counts are kept small (each case compiles); the seed is fixed by hypothesis's database-free
derandomised mode so CI is reproducible.
"""

import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis not installed: pip install "
                                 "-e '.[test]'")
from hypothesis import given, settings, strategies as st  # noqa: E402

import jbp  # noqa: E402
from jbp import gradcheck  # noqa: E402

#: Outside the fast loop (``pytest -m 'not slow'``): generated cases, each compiled. CI runs it.
pytestmark = pytest.mark.slow

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)
RUNS = {"conv2d": 0, "pool": 0, "dense_bn": 0}


def _check(manual, autodiff, args, names):
    result = gradcheck.versus_autodiff(manual, autodiff, args, names=names)
    assert result.ok, str(result)


@st.composite
def conv_configs(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = draw(st.one_of(
        st.sampled_from(["SAME", "VALID"]), st.integers(0, 2),
        st.tuples(st.tuples(st.integers(0, 2), st.integers(0, 2)),
                  st.tuples(st.integers(0, 2), st.integers(0, 2)))))
    h = draw(st.integers((kh - 1) * dh + 1, 9))
    w = draw(st.integers((kw - 1) * dw + 1, 9))
    return dict(shape=(draw(st.integers(1, 2)), h, w, cin), kernel=(kh, kw, cin // groups, cout),
                bias=draw(st.booleans()),
                kw=dict(stride=stride, padding=padding, dilation=(dh, dw), groups=groups))


@SETTINGS
@given(conv_configs(), st.integers(0, 2**16))
def _conv2d_property(cfg, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(cfg["shape"]))
    w = jnp.asarray(rng.standard_normal(cfg["kernel"]))
    args, names = [x, w], ["x", "w"]
    if cfg["bias"]:
        args.append(jnp.asarray(rng.standard_normal(cfg["kernel"][-1])))
        names.append("b")
    kw = cfg["kw"]
    _check(lambda *a: jbp.conv2d(*a, **kw), lambda *a: jbp.autodiff.conv2d(*a, **kw), args,
           names)
    RUNS["conv2d"] += 1


@st.composite
def pool_configs(draw):
    window = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad = draw(st.one_of(st.sampled_from(["SAME", "VALID"]), st.tuples(
        st.tuples(st.integers(0, window[0] - 1), st.integers(0, window[0] - 1)),
        st.tuples(st.integers(0, window[1] - 1), st.integers(0, window[1] - 1)))))
    h, w = draw(st.integers(window[0], 8)), draw(st.integers(window[1], 8))
    return dict(shape=(2, h, w, 2), window=window, stride=stride, padding=pad,
                kind=draw(st.sampled_from(["max", "avg_incl", "avg_excl"])))


@SETTINGS
@given(pool_configs(), st.integers(0, 2**16))
def _pool_property(cfg, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(cfg["shape"]))   # no ties
    kw = dict(window=cfg["window"], stride=cfg["stride"], padding=cfg["padding"])
    if cfg["kind"] == "max":
        manual, auto = jbp.max_pool, jbp.autodiff.max_pool
    else:
        kw["count_include_pad"] = cfg["kind"] == "avg_incl"
        manual, auto = jbp.avg_pool, jbp.autodiff.avg_pool
    try:
        manual(x, **kw)
    except ValueError as e:                      # a rejected configuration must say why
        assert "padding" in str(e) or "window" in str(e)
        return
    _check(lambda x: manual(x, **kw), lambda x: auto(x, **kw), [x], ["x"])
    RUNS["pool"] += 1


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 6), st.integers(1, 5), st.booleans(),
       st.integers(0, 2**16))
def _dense_and_batch_norm_property(n, features, out, train, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n + 1, features)))
    w = jnp.asarray(rng.standard_normal((features, out)))
    _check(jbp.dense, jbp.autodiff.dense, [x, w], ["x", "w"])
    g, b = jnp.asarray(rng.standard_normal(features)), jnp.asarray(rng.standard_normal(features))
    mean, var = jnp.zeros(features), jnp.ones(features)

    def bn(ns):
        return lambda x, g, b: ns.batch_norm(x, g, b, mean, var, train=train)[0]

    _check(bn(jbp), bn(jbp.autodiff), [x, g, b], ["x", "gamma", "beta"])
    RUNS["dense_bn"] += 1


def _counted(prop, key: str, at_least: int):
    """Run a hypothesis property and check it really generated and checked cases, in this same
    process (a separate last test would read another xdist worker's counts)."""
    before = RUNS[key]
    prop()
    assert RUNS[key] - before >= at_least, RUNS


def test_conv2d_property():
    _counted(_conv2d_property, "conv2d", 30)


def test_pool_property():
    _counted(_pool_property, "pool", 15)


def test_dense_and_batch_norm_property():
    _counted(_dense_and_batch_norm_property, "dense_bn", 30)

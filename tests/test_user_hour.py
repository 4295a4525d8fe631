"""Small things a new user meets first: layout hints, traced flags, the scripts' --help."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp._checks import LayoutWarning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = jnp.float32


def test_pytorch_kernel_that_fits_hwio_warns():
    x = jnp.ones((2, 8, 8, 3), F32)
    w_torch = jnp.ones((16, 3, 3, 3), F32)                     # (C_out, C_in, KH, KW)
    with pytest.warns(LayoutWarning, match=r"w.transpose\(2, 3, 1, 0\)"):
        y = jbp.conv2d(x, w_torch)
    assert y.shape == (2, 8, 8, 3)                             # what HWIO made of it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert jbp.conv2d(x, w_torch.transpose(2, 3, 1, 0)).shape == (2, 8, 8, 16)


@pytest.mark.parametrize("shape,x_channels,groups", [
    ((3, 3, 3, 3), 3, 1),        # square: the same in both layouts
    ((3, 3, 3, 16), 3, 1),       # an ordinary HWIO kernel
    ((5, 5, 1, 6), 1, 1),        # LeNet-5's first layer
    ((7, 7, 3, 64), 3, 1),       # ResNet-18's stem
    ((3, 3, 1, 8), 8, 8),        # depthwise
    ((16, 1, 1, 1), 1, 1),       # a tall 1-D kernel on one channel: c = 1 is ambiguous
    ((1, 3, 3, 3), 3, 1),        # a 1x3 separable kernel
    ((4, 3, 3, 3), 3, 1),        # fewer than 8 PyTorch output channels: ambiguous
])
def test_hwio_kernels_are_not_flagged(shape, x_channels, groups):
    x = jnp.ones((1, 8, 8, x_channels), F32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jbp.conv2d(x, jnp.ones(shape, F32), groups=groups)


def test_pytorch_kernel_that_does_not_fit_names_the_transpose():
    with pytest.raises(ValueError, match=r"kernel input channels w.shape\[2\]=5 .* PyTorch's"):
        jbp.conv2d(jnp.ones((2, 8, 8, 3), F32), jnp.ones((32, 3, 5, 5), F32))
    with pytest.raises(ValueError) as info:                     # not square: no PyTorch hint
        jbp.conv2d(jnp.ones((2, 8, 8, 3), F32), jnp.ones((3, 3, 5, 4), F32))
    assert "PyTorch" not in str(info.value)


@pytest.mark.parametrize("layer", ["batch_norm", "dropout"])
def test_traced_train_flag_says_how(layer):
    x, c = jnp.ones((4, 3), F32), jnp.ones((3,), F32)
    call = {"batch_norm": lambda t: jbp.batch_norm(x, c, c, c, c, train=t),
            "dropout": lambda t: jbp.dropout(x, 0.5, jax.random.key(0), train=t)}[layer]
    with pytest.raises(TypeError, match=r"static_argnames=\('train',\)"):
        jax.jit(call)(True)
    with pytest.raises(TypeError, match=r"convert it with bool\(train\)"):
        call(np.bool_(True))
    assert jax.jit(call, static_argnums=0)(True) is not None   # static: fine


def _help(script):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", script), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


def test_compare_help_documents_set_and_the_steps_default():
    text = _help("compare.py")
    assert "--set KEY=VALUE override a config value" in text
    assert "training steps to compare (default: 200)" in text


def test_gradcheck_help_lists_the_layers():
    text = _help("gradcheck.py").replace(", ", ",").replace(" ", "")
    assert ",".join(jbp.LAYERS) in text


def test_train_help_names_overwrite():
    text = _help("train.py")
    assert "--overwrite" in text and "--resume RUN_DIR" in text

"""Bad input raises a clear ValueError/TypeError at trace time, naming the argument and shapes."""

import jax
import jax.numpy as jnp
import pytest

import jbp

X = jnp.zeros((2, 8, 8, 3), jnp.float32)
W = jnp.zeros((3, 3, 3, 4), jnp.float32)
NAMESPACES = [jbp, jbp.autodiff]


@pytest.fixture(params=NAMESPACES, ids=["manual", "autodiff"])
def ns(request):
    return request.param


def test_rank3_image_names_batch_axis(ns):
    with pytest.raises(ValueError, match=r"x: expected a rank-4 array \(N, H, W, C_in\).*got "
                                         r"shape \(8, 8, 3\) \(rank 3\).*x\[None\]"):
        ns.conv2d(X[0], W)


def test_kernel_channels_mismatch(ns):
    with pytest.raises(ValueError, match=r"w: kernel input channels w.shape\[2\]=5 must equal "
                                         r"C_in / groups = 3 / 1 = 3"):
        ns.conv2d(X, jnp.zeros((3, 3, 5, 4), jnp.float32))


def test_kernel_channels_mismatch_with_groups(ns):
    x = jnp.zeros((1, 6, 6, 4), jnp.float32)
    with pytest.raises(ValueError, match=r"C_in / groups = 4 / 2 = 2"):
        ns.conv2d(x, jnp.zeros((3, 3, 4, 4), jnp.float32), groups=2)


def test_groups_must_divide_channels(ns):
    with pytest.raises(ValueError, match=r"groups: x has C_in=3 channels, not divisible by "
                                         r"groups=2"):
        ns.conv2d(X, jnp.zeros((3, 3, 1, 4), jnp.float32), groups=2)


def test_nchw_input_is_recognised(ns):
    nchw = jnp.zeros((2, 3, 8, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"looks like NCHW.*transpose\(0, 2, 3, 1\)"):
        ns.conv2d(nchw, W)


def test_bias_shape(ns):
    with pytest.raises(ValueError, match=r"b: expected shape \(4,\) \(C_out\), got \(3,\)"):
        ns.conv2d(X, W, jnp.zeros((3,), jnp.float32))


def test_kernel_larger_than_padded_input(ns):
    with pytest.raises(ValueError, match=r"dilated kernel height 9 is larger than the padded "
                                         r"input 8"):
        ns.conv2d(X, jnp.zeros((9, 3, 3, 4), jnp.float32), padding="VALID")


def test_unknown_padding_string(ns):
    with pytest.raises(ValueError, match=r"padding: unknown padding 'FULL'; expected 'SAME', "
                                         r"'VALID'"):
        ns.conv2d(X, W, padding="FULL")
    with pytest.raises(ValueError, match=r"padding: unknown padding 'SMAE'"):
        ns.max_pool(X, 2, padding="SMAE")


@pytest.mark.parametrize("kwargs,message", [
    (dict(stride=0), r"stride: every entry must be >= 1, got 0"),
    (dict(stride=(1, 2, 3)), r"stride: expected an int or a pair of ints"),
    (dict(dilation=-1), r"dilation: every entry must be >= 1"),
    (dict(padding=-1), r"padding: padding must be >= 0, got -1"),
    (dict(padding=((1, 1),)), r"padding: expected 'SAME', 'VALID', an int, or"),
])
def test_bad_conv_config(ns, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ns.conv2d(X, W, **kwargs)


def test_integer_images_are_rejected(ns):
    with pytest.raises(TypeError, match=r"x: expected a floating-point array, got dtype uint8.*"
                                        r"astype\(jnp.float32\)"):
        ns.conv2d(jnp.zeros((2, 8, 8, 3), jnp.uint8), W)
    with pytest.raises(TypeError, match=r"x: expected a floating-point array"):
        ns.relu(jnp.arange(4))


def test_dtype_mismatch(ns):
    with pytest.raises(TypeError, match=r"w: dtype float64 differs from x dtype float32"):
        ns.conv2d(X, W.astype(jnp.float64))


def test_window_larger_than_padded_input(ns):
    with pytest.raises(ValueError, match=r"window: window height 9 is larger than the padded "
                                         r"input 8"):
        ns.max_pool(X, 9)
    with pytest.raises(ValueError, match=r"window height 10 is larger than the padded input 9"):
        ns.avg_pool(X, 10, padding=((1, 0), (0, 0)))


def test_pool_padding_not_smaller_than_window(ns):
    with pytest.raises(ValueError, match=r"padding: \(2, 2\) along the height must be smaller "
                                         r"than the window 2"):
        ns.max_pool(X, 2, padding=2)


def test_pool_rank(ns):
    with pytest.raises(ValueError, match=r"x: expected a rank-4 array \(N, H, W, C\)"):
        ns.max_pool(jnp.zeros((4, 4), jnp.float32), 2)


def test_dense_shapes(ns):
    x = jnp.zeros((2, 5), jnp.float32)
    with pytest.raises(ValueError, match=r"w: expected shape \(5, out\) to match x features "
                                         r"in=5 \(x.shape=\(2, 5\)\), got \(4, 3\)"):
        ns.dense(x, jnp.zeros((4, 3), jnp.float32))
    # Images not flattened: dense works on the last axis (F.linear), so the weight of the
    # flattened features no longer matches.
    with pytest.raises(ValueError, match=r"w: expected shape \(3, out\) to match x features "
                                         r"in=3 \(x.shape=\(2, 8, 8, 3\)\)"):
        ns.dense(X, jnp.zeros((192, 3), jnp.float32))


@pytest.mark.parametrize("rate,error,message", [
    (-0.1, ValueError, r"rate: expected a float in \[0, 1\), got -0.1"),
    (1.0, ValueError, r"rate: expected a float in \[0, 1\), got 1.0"),
    ("0.5", TypeError, r"rate: expected a Python float"),
])
def test_dropout_rate(ns, rate, error, message):
    with pytest.raises(error, match=message):
        ns.dropout(X, rate, jax.random.key(0), train=True)


def test_dropout_key(ns):
    with pytest.raises(TypeError, match=r"key: expected a PRNG key"):
        ns.dropout(X, 0.5, jnp.zeros((3,), jnp.float32), train=True)


def test_batch_norm_errors(ns):
    c = jnp.zeros((3,), jnp.float32)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(3,\) \(channels, the last "
                                         r"axis of x\), got \(4,\)"):
        ns.batch_norm(X, jnp.zeros((4,)), c, c, c, train=True)
    with pytest.raises(TypeError, match=r"train: expected a Python bool"):
        ns.batch_norm(X, c, c, c, c, train=jnp.array(True))
    with pytest.raises(ValueError, match=r"more than one value per channel"):
        ns.batch_norm(jnp.zeros((1, 3), jnp.float32), c, c, c, c, train=True)
    with pytest.raises(ValueError, match=r"momentum: expected a float in \[0, 1\], got 1.5"):
        ns.batch_norm(X, c, c, c, c, train=True, momentum=1.5)


def test_loss_errors(ns):
    logits = jnp.zeros((4, 3), jnp.float32)
    with pytest.raises(ValueError, match=r"labels: integer labels must have shape \(4,\)"):
        ns.softmax_cross_entropy(logits, jnp.zeros((4, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"labels: one-hot/soft labels must have the logits' "
                                         r"shape \(4, 3\), got \(4, 5\)"):
        ns.softmax_cross_entropy(logits, jnp.zeros((4, 5), jnp.float32))
    with pytest.raises(ValueError, match=r"logits: the batch is empty"):
        ns.softmax_cross_entropy(jnp.zeros((0, 3), jnp.float32), jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"label_smoothing: expected a float in \[0, 1\)"):
        ns.softmax_cross_entropy(logits, jnp.zeros((4,), jnp.int32), label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"target: expected the shape of pred \(4, 3\), got "
                                         r"\(3, 4\)"):
        ns.mse(logits, jnp.zeros((3, 4), jnp.float32))


def test_errors_raise_at_trace_time_under_jit(ns):
    """The check runs while tracing: the error is ours, not XLA's, even inside jax.jit."""
    with pytest.raises(ValueError, match=r"kernel input channels"):
        jax.jit(lambda x, w: ns.conv2d(x, w))(X, jnp.zeros((3, 3, 5, 4), jnp.float32))

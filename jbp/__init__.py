"""jbp: convolutional networks in JAX with hand-written, checked backward rules.

``jbp.X`` is the layer with its hand-written ``jax.custom_vjp`` backward (the equations of
EQUATIONS.md); ``jbp.autodiff.X`` has the same signature and the same forward computation,
differentiated by JAX; ``jbp.manual`` is an alias namespace of the hand-written versions.
Images are NHWC, convolution kernels HWIO.
"""

from jbp.layers.activations import leaky_relu, log_softmax, relu, sigmoid, softmax, tanh
from jbp.layers.conv import conv2d
from jbp.layers.dropout import dropout
from jbp.layers.linear import dense, flatten
from jbp.losses import mse, sigmoid_binary_cross_entropy, softmax_cross_entropy
from jbp.layers.normalization import batch_norm
from jbp.layers.adaptive_pooling import adaptive_avg_pool, global_avg_pool
from jbp.layers.padding import pad
from jbp.layers.pooling import avg_pool, max_pool, max_unpool

from jbp import autodiff, manual  # noqa: E402  (namespaces built from the modules above)
from jbp import init  # noqa: E402  (He/LeCun/Glorot initialisers)
# CPU convolution kernels: "xla" (the default) or "onednn" (opt-in); docs/onednn.md.
from jbp._conv_kernels.onednn import conv_backend, set_conv_backend  # noqa: E402

LAYERS = (
    "conv2d", "dense", "flatten", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
    "log_softmax", "max_pool", "avg_pool", "global_avg_pool", "adaptive_avg_pool",
    "max_unpool", "pad", "batch_norm", "dropout",
    "softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy",
)

__version__ = "0.1.0"
__all__ = list(LAYERS) + ["autodiff", "manual", "init", "LAYERS", "conv_backend",
                          "set_conv_backend"]

"""The hand-written-VJP layers, under an explicit name: ``jbp.manual.X is jbp.X``."""

from jbp.layers.activations import leaky_relu, log_softmax, relu, sigmoid, softmax, tanh  # noqa: F401
from jbp.layers.conv import conv2d  # noqa: F401
from jbp.layers.dropout import dropout  # noqa: F401
from jbp.layers.linear import dense, flatten  # noqa: F401
from jbp.losses import mse, sigmoid_binary_cross_entropy, softmax_cross_entropy  # noqa: F401
from jbp.layers.normalization import batch_norm  # noqa: F401
from jbp.layers.adaptive_pooling import adaptive_avg_pool, global_avg_pool  # noqa: F401
from jbp.layers.padding import pad  # noqa: F401
from jbp.layers.pooling import avg_pool, max_pool, max_unpool  # noqa: F401

"""The same layers differentiated by JAX: no custom rule anywhere.

``jbp.autodiff.X`` has the signature, argument checks and forward computation of ``jbp.X`` (both
are built from the same ``forward`` function in the layer's module); only the backward differs:
here JAX derives it. Use it as the reference for the hand-written rules, or where forward-mode
differentiation (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``) is needed.
"""

from jbp.layers.activations import autodiff_leaky_relu as leaky_relu  # noqa: F401
from jbp.layers.adaptive_pooling import autodiff_adaptive_avg_pool as adaptive_avg_pool  # noqa: F401
from jbp.layers.adaptive_pooling import autodiff_global_avg_pool as global_avg_pool  # noqa: F401
from jbp.layers.activations import autodiff_log_softmax as log_softmax  # noqa: F401
from jbp.layers.activations import autodiff_relu as relu  # noqa: F401
from jbp.layers.activations import autodiff_sigmoid as sigmoid  # noqa: F401
from jbp.layers.activations import autodiff_softmax as softmax  # noqa: F401
from jbp.layers.activations import autodiff_tanh as tanh  # noqa: F401
from jbp.layers.conv import autodiff_conv2d as conv2d  # noqa: F401
from jbp.layers.dropout import autodiff_dropout as dropout  # noqa: F401
from jbp.layers.linear import autodiff_dense as dense  # noqa: F401
from jbp.layers.linear import autodiff_flatten as flatten  # noqa: F401
from jbp.losses import autodiff_mse as mse  # noqa: F401
from jbp.losses import autodiff_sigmoid_binary_cross_entropy as sigmoid_binary_cross_entropy  # noqa: F401,E501
from jbp.losses import autodiff_softmax_cross_entropy as softmax_cross_entropy  # noqa: F401
from jbp.layers.normalization import autodiff_batch_norm as batch_norm  # noqa: F401
from jbp.layers.pooling import autodiff_avg_pool as avg_pool  # noqa: F401
from jbp.layers.padding import autodiff_pad as pad  # noqa: F401
from jbp.layers.pooling import autodiff_max_pool as max_pool  # noqa: F401
from jbp.layers.pooling import autodiff_max_unpool as max_unpool  # noqa: F401

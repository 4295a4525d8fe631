"""jbp: convolutional networks in JAX with hand-written, checked backward rules.

``jbp.X`` is the layer with its hand-written ``jax.custom_vjp`` backward (the equations of
EQUATIONS.md); ``jbp.autodiff.X`` has the same signature and the same forward computation,
differentiated by JAX; ``jbp.manual`` is an alias namespace of the hand-written versions. All
three, and ``LAYERS``, are read from one table (``jbp._registry``) that each layer's file adds
itself to (``jbp/layers/``, ``jbp/losses/``). A model takes its layers from a
:class:`LayerPolicy` (hand-written or autodiff, and the options bound into every call).
Images are NHWC, convolution kernels HWIO.
"""

from jbp import _registry
from jbp import autodiff, manual  # noqa: F401  (namespaces read from the table)
from jbp import init  # noqa: F401  (He/LeCun/Glorot initialisers)
from jbp import quantities  # noqa: F401  (per-example quantities, GGN, K-FAC from the rules)
from jbp.policy import LayerPolicy
# CPU convolution kernels: "onednn" (the default where the [onednn] extra is installed and
# builds, else XLA's forms) or "xla"; GPU and TPU always run XLA's convolution. docs/onednn.md.
from jbp.cpu_conv import conv_backend, set_conv_backend

#: The name of every layer (``jbp._registry.REGISTRY``'s order).
LAYERS = tuple(_registry.layers())
globals().update({name: entry.manual for name, entry in _registry.layers().items()})

__version__ = "0.1.0"
__all__ = list(LAYERS) + ["autodiff", "manual", "init", "quantities", "LAYERS", "LayerPolicy",
                          "conv_backend", "set_conv_backend"]

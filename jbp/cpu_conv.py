"""Which kernels run conv2d on CPU: the backend switch, what ran, and the table of forms.

The public face of ``jbp._conv_kernels`` for scripts, benchmarks and logs (docs/onednn.md,
docs/performance.md). By default a float32 CPU convolution runs on oneDNN where the
``[onednn]`` extra is installed and builds, else on XLA's forms; GPU and TPU always run the
generic XLA convolution (``jbp.layers.conv_equations``).

    conv_backend() / set_conv_backend(name)   "onednn" (default) or "xla"; $JBP_CONV_BACKEND
    describe()                                what a float32 CPU convolution runs on, for logs
    scratch_bytes()                           oneDNN's scratch held outside XLA's buffers
    FORMS, choose, form_named                 the table of formulations, first match wins
    dispatch(equation, operands, static)      run one equation as the table chooses
    arguments(equation, x, w, g, cfg)         (operands, static) of an equation's call
    GENERIC                                   each equation as one XLA convolution
"""

from jbp._conv_kernels import (  # noqa: F401  (re-exported)
    FORMS, GENERIC, Form, arguments, choose, column_block, dispatch, form_named, is_pointwise,
    split_chunk)
from jbp._conv_kernels._onednn_build import (  # noqa: F401  (re-exported)
    DEFAULT_BACKEND, OneDNNUnavailableWarning, conv_backend, describe, scratch_bytes,
    set_conv_backend, unavailable_reason)

__all__ = ["FORMS", "GENERIC", "Form", "arguments", "choose", "column_block", "dispatch",
           "form_named", "is_pointwise", "split_chunk", "DEFAULT_BACKEND",
           "OneDNNUnavailableWarning", "conv_backend", "describe", "scratch_bytes",
           "set_conv_backend", "unavailable_reason"]

"""The faster formulations of conv2d's equations on CPU, chosen from one table, and the one
dispatch that runs an equation.

``jbp.layers.conv_equations`` writes each equation as one generic XLA convolution (``GENERIC``).
XLA:CPU runs some shapes of those convolutions slowly (docs/performance.md says which and why),
so for each equation this package lists other formulations of the same sum, each with the
predicate that selects it:

    FORMS[equation] = (Form(name, select, fn), ...)      equation: "forward",
                                                         "input_grad", "weight_grad"

``select(x_shape, w_shape, cfg, dtype)`` returns the form's keyword parameters (a dict, empty
for none) where the form measured faster, else ``None``. :func:`choose` takes the first form
whose predicate answers. Generic functions and forms share one calling convention, operands
first, then static arguments, then the form's parameters:

    equation     operands  static           generic = GENERIC[equation]
    forward      (x, w)    (cfg,)           correlate(x, w, cfg)          -> z
    input_grad   (g, w)    (x_shape, cfg)   input_grad(g, w, x_shape, cfg) -> ∂L/∂a
    weight_grad  (x, g)    (w_shape, cfg)   weight_grad(x, g, w_shape, cfg) -> ∂L/∂W
                                            form.fn(*operands, *static, **params)

:func:`dispatch` ``(equation, operands, static)`` is the only caller of that convention in the
library: it asks :func:`choose` once and emits ``lax.platform_dependent`` only where a form is
chosen, so CUDA and TPU lowerings always see the generic convolution. ``jbp.layers.conv``'s
forward and backward call it, and ``scripts/bench_ops.py`` builds its calls with
:func:`arguments`.

oneDNN's kernels (docs/onednn.md) head each equation: where the ``[onednn]`` extra is installed
and builds, they are the default CPU backend (``JBP_CONV_BACKEND`` / ``jbp.set_conv_backend``
switch them off), else XLA's forms below them run. Forms with ``rule_only`` run in the
hand-written rule's forward but not in the forward ``jbp.autodiff`` differentiates (JAX's
derivative of them was slower than of the convolution). ``tests/test_conv_formulations.py``
reads this same table; the constants the predicates use are in :mod:`jbp._conv_kernels.tuning`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Tuple

import jax.numpy as jnp
from jax import lax

from jbp.layers import conv_equations as E
from jbp._conv_kernels import block_forms, depthwise_forms, onednn, tap_forms, tuning


class Form(NamedTuple):
    """One formulation of one equation: its name, where it is chosen, and what computes it."""

    name: str
    select: Callable      # (x_shape, w_shape, cfg, dtype) -> dict of parameters, or None
    fn: Callable
    rule_only: bool = False

    @property
    def why(self) -> str:
        """Why the form wins where it is chosen: the first line of its predicate's docstring."""
        return self.select.__doc__.strip().splitlines()[0]


# --- predicates: (x_shape, w_shape, cfg, dtype) -> parameters or None -------------------------

def _measured(dtype) -> bool:
    return jnp.dtype(dtype) in tuning.MEASURED_DTYPES


def _pixels(x_shape, w_shape, cfg) -> int:
    ho, wo = E.out_hw(x_shape, w_shape, cfg)
    return ho * wo


def column_block(x_shape, w_shape, cfg, dtype, max_cin: int) -> Optional[int]:
    """B, the columns per block, for a thin stride-1 layer (at most ``max_cin`` input and
    :data:`tuning.COLUMN_MAX_COUT` output channels, a kernel wider than one column): the
    smallest of 2, 4, 8 with B·C_out >= :data:`tuning.COLUMN_MIN_BLOCKED_COUT`, where the output
    is at least two blocks wide; else None."""
    kh, kw, cin, cout = w_shape
    if (cfg.groups != 1 or cfg.stride != (1, 1) or cfg.dilation != (1, 1) or kw < 2
            or cin > max_cin or cout > tuning.COLUMN_MAX_COUT or not _measured(dtype)):
        return None
    block = next((b for b in (2, 4, 8) if b * cout >= tuning.COLUMN_MIN_BLOCKED_COUT), None)
    if block is None or 2 * block > E.out_hw(x_shape, w_shape, cfg)[1]:
        return None
    return block


def _weight_grad_columns(x_shape, w_shape, cfg, dtype):
    """Thin layers run on Eigen: the blocked input's patch matrix, shared with the forward."""
    if x_shape[0] < tuning.COLUMN_WEIGHT_GRAD_MIN_BATCH:
        return None
    block = column_block(x_shape, w_shape, cfg, dtype, tuning.COLUMN_WEIGHT_GRAD_MAX_CIN)
    return None if block is None else {"block": block}


def _forward_columns(x_shape, w_shape, cfg, dtype):
    """Thin layers run on Eigen: B columns per block give B·C_in -> B·C_out channels."""
    block = column_block(x_shape, w_shape, cfg, dtype, tuning.COLUMN_FORWARD_MAX_CIN)
    if block is not None:
        return {"block": block}
    # Where the weight gradient builds the blocked input's patch matrix anyway, the forward
    # shares it (XLA computes the identical matrix once).
    return _weight_grad_columns(x_shape, w_shape, cfg, dtype)


def _split_measured(x_shape, w_shape, cfg, dtype) -> bool:
    """What both split forms were measured on: 3×3, stride 1, no dilation, one group,
    batch >= :data:`tuning.BATCH_CHUNK_MIN_BATCH`, float32/float64."""
    return (tuple(w_shape[:2]) == (3, 3) and cfg.stride == (1, 1) and cfg.dilation == (1, 1)
            and cfg.groups == 1 and x_shape[0] >= tuning.BATCH_CHUNK_MIN_BATCH
            and _measured(dtype))


def split_chunk(x_shape, w_shape, cfg, dtype) -> int:
    """Images per chunk of the split forms: the largest power of two whose A,
    (H_out + (KH − 1)·d_h) × W_out × KW·C_in per image, fits in :data:`tuning.SPLIT_CHUNK_BYTES`."""
    kh, kw, cin, _ = w_shape
    ho, wo = E.out_hw(x_shape, w_shape, cfg)
    per_image = max(1, (ho + (kh - 1) * cfg.dilation[0]) * wo * kw * cin
                    * jnp.dtype(dtype).itemsize)
    return 1 << max(0, (tuning.SPLIT_CHUNK_BYTES // per_image).bit_length() - 1)


def _at_most_max_chunks(chunk: int, batch: int) -> int:
    """``chunk``, made larger where the batch would need more than
    :data:`tuning.BATCH_CHUNK_MAX_CHUNKS` unrolled chunks."""
    return max(chunk, -(-batch // tuning.BATCH_CHUNK_MAX_CHUNKS))


def _forward_split(x_shape, w_shape, cfg, dtype):
    """Small wide 3×3 layers: one matmul of the input's column shifts per chunk."""
    if not (_split_measured(x_shape, w_shape, cfg, dtype)
            and min(w_shape[2:]) >= tuning.SPLIT_FORWARD_MIN_CHANNELS
            and _pixels(x_shape, w_shape, cfg) <= tuning.SPLIT_FORWARD_MAX_PIXELS):
        return None
    return {"chunk": _at_most_max_chunks(split_chunk(x_shape, w_shape, cfg, dtype), x_shape[0])}


def is_pointwise(w_shape, cfg) -> bool:
    """1×1 kernel, no padding, one group: every output pixel is a matmul of one input pixel."""
    return (tuple(w_shape[:2]) == (1, 1) and cfg.groups == 1
            and cfg.padding == ((0, 0), (0, 0)))


def _input_grad_rows(x_shape, w_shape, cfg, dtype):
    """Thin unpadded layers: δ's rows times a banded kernel, one matmul."""
    _, kw, cin, cout = w_shape
    thin = cin < tuning.ROWS_MAX_CIN and cout <= tuning.COLUMN_MAX_COUT
    unpadded_stride_1 = (cfg.stride == (1, 1) and cfg.dilation == (1, 1) and cfg.groups == 1
                         and cfg.padding == ((0, 0), (0, 0)))
    narrow = x_shape[2] <= tuning.ROWS_MAX_WIDTH_IN_KERNELS * kw
    return {} if unpadded_stride_1 and kw > 1 and thin and narrow and _measured(dtype) else None


def _input_grad_pointwise(x_shape, w_shape, cfg, dtype):
    """1×1 kernels: δ Wᵀ, then the stride gaps padded in."""
    large = _pixels(x_shape, w_shape, cfg) >= tuning.INPUT_GRAD_MIN_PIXELS
    return {} if large and is_pointwise(w_shape, cfg) else None


def _input_grad_phases(x_shape, w_shape, cfg, dtype):
    """Strided kernels: one stride-1 convolution per phase, no dilated zeros."""
    large = _pixels(x_shape, w_shape, cfg) >= tuning.INPUT_GRAD_MIN_PIXELS
    strided = cfg.stride != (1, 1) and cfg.groups == 1 and cfg.dilation == (1, 1)
    return {} if large and strided else None


def _weight_grad_pointwise(x_shape, w_shape, cfg, dtype):
    """1×1 kernels: aᵀ δ, one matmul (XLA:CPU's convolution is 5–9× slower)."""
    return {} if is_pointwise(w_shape, cfg) else None


def _weight_grad_split(x_shape, w_shape, cfg, dtype):
    """3×3 layers with <= 16 channels on one side: A's column shifts against δ's rows."""
    if not (_split_measured(x_shape, w_shape, cfg, dtype)
            and min(w_shape[2:]) <= tuning.SPLIT_WEIGHT_GRAD_MAX_CHANNELS):
        return None
    return {"chunk": split_chunk(x_shape, w_shape, cfg, dtype)}


def _weight_grad_chunks(x_shape, w_shape, cfg, dtype):
    """Large batches: one convolution per chunk, whose transposed input stays in cache."""
    if x_shape[0] < tuning.BATCH_CHUNK_MIN_BATCH or not _measured(dtype):
        return None
    thin = w_shape[3] <= tuning.COLUMN_MAX_COUT
    chunk = tuning.BATCH_CHUNK_THIN if thin else tuning.BATCH_CHUNK_WIDE
    return {"chunk": _at_most_max_chunks(chunk, x_shape[0])}


def _weight_grad_taps(x_shape, w_shape, cfg, dtype):
    """Wide inputs over large images: one matmul per kernel tap."""
    return {} if (cfg.groups == 1 and w_shape[2] >= tuning.TAP_MIN_CIN
                  and _pixels(x_shape, w_shape, cfg) >= tuning.TAP_MIN_PIXELS
                  and x_shape[0] >= tuning.TAP_MIN_BATCH) else None


def _weight_grad_patches(x_shape, w_shape, cfg, dtype):
    """Strided or small wide layers: one patch-matrix matmul per chunk of images."""
    kh, kw, cin, _ = w_shape
    row = kh * kw * cin
    if cfg.groups != 1 or x_shape[0] < tuning.TAP_MIN_BATCH or row > tuning.PATCH_MAX_ROW:
        return None
    strided = cfg.stride != (1, 1) and row >= tuning.PATCH_STRIDED_MIN_ROW
    small_and_wide = (cin >= tuning.PATCH_WIDE_MIN_CIN
                      and _pixels(x_shape, w_shape, cfg) <= tuning.PATCH_WIDE_MAX_PIXELS)
    return {} if strided or small_and_wide else None


def _depthwise(x_shape, w_shape, cfg, dtype):
    """Depthwise k×k (groups = C_in = C_out): shifted slices times per-channel taps, fused."""
    return {} if depthwise_forms.is_depthwise(x_shape, w_shape, cfg) and _measured(dtype) else None


# --- the table --------------------------------------------------------------------------------

# oneDNN (docs/onednn.md) heads each equation: where it is available and enabled
# (JBP_CONV_BACKEND, jbp.set_conv_backend) its predicates decide first; its forward is rule-only,
# so jbp.autodiff keeps differentiating XLA's convolution.
FORMS = {
    "forward": (
        Form("onednn", onednn.select_forward, onednn.correlate, rule_only=True),
        Form("depthwise", _depthwise, depthwise_forms.correlate),
        Form("columns", _forward_columns, block_forms.column_blocked_correlate),
        Form("split", _forward_split, block_forms.split_tap_correlate, rule_only=True),
    ),
    "input_grad": (
        Form("onednn", onednn.select_input_grad, onednn.input_grad),
        Form("depthwise", _depthwise, depthwise_forms.input_grad),
        Form("rows", _input_grad_rows, tap_forms.row_input_grad),
        Form("pointwise", _input_grad_pointwise, tap_forms.pointwise_input_grad),
        Form("phases", _input_grad_phases, tap_forms.phase_input_grad),
    ),
    "weight_grad": (
        Form("onednn", onednn.select_weight_grad, onednn.weight_grad),
        Form("depthwise", _depthwise, depthwise_forms.weight_grad),
        Form("pointwise", _weight_grad_pointwise, tap_forms.pointwise_weight_grad),
        Form("columns", _weight_grad_columns, block_forms.column_blocked_weight_grad),
        Form("split", _weight_grad_split, block_forms.split_tap_weight_grad),
        Form("chunks", _weight_grad_chunks, tap_forms.batch_chunked_weight_grad),
        Form("taps", _weight_grad_taps, tap_forms.tap_weight_grad),
        Form("patches", _weight_grad_patches, tap_forms.patch_weight_grad),
    ),
}


def choose(equation: str, x_shape, w_shape, cfg, dtype, *,
           rule: bool = True) -> Optional[Tuple[Form, dict]]:
    """The first form of ``FORMS[equation]`` whose predicate selects this call, with its
    parameters, or ``None`` for the generic convolution. ``rule=False`` skips ``rule_only``
    forms (the forward that ``jbp.autodiff`` differentiates)."""
    for form in FORMS[equation]:
        if form.rule_only and not rule:
            continue
        params = form.select(tuple(x_shape), tuple(w_shape), cfg, dtype)
        if params is not None:
            return form, params
    return None


def form_named(equation: str, name: str) -> Form:
    """The form of ``FORMS[equation]`` called ``name`` (for benchmarks and tests)."""
    return next(form for form in FORMS[equation] if form.name == name)


# --- the one dispatch -------------------------------------------------------------------------

#: Each equation as one XLA convolution: what runs off CPU, and on CPU where no form is chosen.
GENERIC = {"forward": E.correlate, "input_grad": E.input_grad, "weight_grad": E.weight_grad}


def arguments(equation: str, x, w, g, cfg):
    """``(operands, static)`` of ``equation`` for a layer's input ``x``, kernel ``w`` and output
    gradient ``g`` (the module docstring's table)."""
    if equation == "forward":
        return (x, w), (cfg,)
    if equation == "input_grad":
        return (g, w), (x.shape, cfg)
    return (x, g), (w.shape, cfg)


def _case(equation: str, operands, static):
    """``(x_shape, w_shape, cfg, dtype)`` of one call: what the predicates read."""
    (a, b), cfg = operands, static[-1]
    if equation == "forward":                       # (x, w), (cfg,)
        return a.shape, b.shape, cfg, a.dtype
    if equation == "input_grad":                    # (g, w), (x_shape, cfg)
        return static[0], b.shape, cfg, a.dtype
    return a.shape, static[0], cfg, a.dtype         # (x, g), (w_shape, cfg)


def dispatch(equation: str, operands, static, *, rule: bool = True):
    """``GENERIC[equation](*operands, *static)``; where :func:`choose` picks a form for this
    call, ``form.fn(*operands, *static, **params)`` on XLA:CPU and the generic convolution on
    every other backend (``lax.platform_dependent``, emitted only then). ``rule=False`` skips
    ``rule_only`` forms."""
    chosen = choose(equation, *_case(equation, operands, static), rule=rule)

    def generic(*ops):
        return GENERIC[equation](*ops, *static)

    if chosen is None:
        return generic(*operands)
    form, params = chosen
    return lax.platform_dependent(*operands, cpu=lambda *ops: form.fn(*ops, *static, **params),
                                  default=generic)

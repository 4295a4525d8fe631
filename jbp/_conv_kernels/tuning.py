"""Every tuning constant of the CPU convolution forms, in one place.

Each was measured on the 2-core CPU with ``scripts/bench_ops.py`` and the ResNet-20 / LeNet-5
train steps; the numbers behind them are in docs/performance.md. The predicates of the table
(``jbp._conv_kernels``) and the forms read them from this module at call time, so a test can
``monkeypatch`` one.
"""

import jax.numpy as jnp

#: The dtypes the CPU forms are for: XLA:CPU's YNNPACK convolutions and matmuls take float32 and
#: float64 (not bfloat16 convolutions), and only these were measured.
MEASURED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))

# --- weight gradient over chunks of the batch ------------------------------------------------
#: From this batch on the weight gradient is summed over chunks of the batch (the split-tap and
#: batch-chunked forms); below it the one convolution wins.
BATCH_CHUNK_MIN_BATCH = 64
#: At most this many unrolled chunks: each is its own operation, and compile time grows with them.
BATCH_CHUNK_MAX_CHUNKS = 32
#: Images per chunk of the batch-chunked weight gradient: with <= 16 output channels the chunk's
#: convolution runs on Eigen (16 beats 4 there); wider layers take 4.
BATCH_CHUNK_THIN, BATCH_CHUNK_WIDE = 16, 4

# --- column-blocked forms (thin layers, on Eigen as plain convolutions) ----------------------
#: Largest C_in for the column-blocked forward (a tie at 6 -> 16 alone) and weight gradient.
COLUMN_FORWARD_MAX_CIN, COLUMN_WEIGHT_GRAD_MAX_CIN = 4, 8
#: Largest C_out, and the fewest blocked output channels B·C_out, of a column-blocked layer.
COLUMN_MAX_COUT, COLUMN_MIN_BLOCKED_COUT = 16, 24
#: Smallest batch of the column-blocked weight gradient (a tie at batch 16).
COLUMN_WEIGHT_GRAD_MIN_BATCH = 32
#: Largest patch matrix (bytes) the column-blocked forward builds; past it the blocked
#: correlation runs as a convolution. LeNet-5's first layer at batch 128 needs 4 MB.
COLUMN_FORWARD_PATCH_BYTES = 64 << 20
#: Bytes of patch matrix per step of the column-blocked weight gradient's loop over the batch.
COLUMN_PATCH_BYTES = 8 << 20

# --- split-tap forms (3×3, stride 1) ----------------------------------------------------------
#: Bytes of the input-side matrix A per chunk: best at 8 images of 32×32×16 (1.7 MB).
SPLIT_CHUNK_BYTES = 2 << 20
#: The split weight gradient: at most this many channels on one side (wider ones run on YNNPACK).
SPLIT_WEIGHT_GRAD_MAX_CHANNELS = 16
#: The split forward: at least this many channels on both sides, at most this many output pixels.
SPLIT_FORWARD_MIN_CHANNELS, SPLIT_FORWARD_MAX_PIXELS = 64, 64

# --- per-tap and patch-matrix weight gradients ------------------------------------------------
#: Smallest batch of the per-tap and patch-matrix forms (batch 8–16 lost).
TAP_MIN_BATCH = 32
#: Images per chunk of the per-tap weight gradient (a chunk of x and δ stays in cache).
TAP_CHUNK = 8
#: The per-tap form: at least this many input channels over at least this many output pixels.
TAP_MIN_CIN, TAP_MIN_PIXELS = 32, 256
#: Images per step of the patch-matrix loop: best at 2 on ResNet-20's 8×8×64 layers.
PATCH_CHUNK = 2
#: The patch form: rows of at most this many values (ResNet-18's 7×7×256 lost), strided kernels
#: with rows of at least this many, or C_in >= the third over at most the fourth output pixels.
PATCH_MAX_ROW, PATCH_STRIDED_MIN_ROW, PATCH_WIDE_MIN_CIN, PATCH_WIDE_MAX_PIXELS = 1024, 128, 64, 64

# --- oneDNN ----------------------------------------------------------------------------------
#: oneDNN's weight gradient for fewer than ONEDNN_WEIGHT_GRAD_MIN_CIN input channels sums each
#: entry's N·H_out·W_out products with 14-20x XLA's float32 rounding error (21-42x on ResNet-20's
#: stem after batch norm: docs/precision.md); from
#: ONEDNN_WEIGHT_GRAD_MAX_PRODUCTS products on, such layers keep XLA's forms.
ONEDNN_WEIGHT_GRAD_MIN_CIN, ONEDNN_WEIGHT_GRAD_MAX_PRODUCTS = 16, 8192

# --- input gradient ---------------------------------------------------------------------------
#: Pointwise and stride-phase input gradients only for δ of at least this many pixels (on 8×8 δ
#: both lost to the convolution).
INPUT_GRAD_MIN_PIXELS = 256
#: Row (banded-matmul) input gradient: fewer than this many input channels, at most
#: COLUMN_MAX_COUT output channels, input width at most this many kernel widths.
ROWS_MAX_CIN, ROWS_MAX_WIDTH_IN_KERNELS = 16, 6

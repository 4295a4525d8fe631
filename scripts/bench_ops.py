#!/usr/bin/env python
"""Per-operation micro-benchmark: each formulation of a convolution's three equations, on the
convolution shapes of the benchmark models.

    python scripts/bench_ops.py                    # every conv of lenet5 b128 and resnet20 b128
    python scripts/bench_ops.py --models resnet20 --batch 32 --json ops.json

For every distinct convolution (input shape, kernel, stride, padding) it times, alternating and
after warm-up, the medians of:

    forward        generic: lax.conv_general_dilated | columns: the same correlation over
                   blocks of B columns (B·C_in -> B·C_out channels; thin layers) | split:
                   the input's column shifts times the kernel, then a sum of row-shifted
                   slices, per batch chunk (stride 1; the manual rule's forward only)
    input grad     generic: conv of the stride-dilated δ with the rotated kernel (what XLA's
                   autodiff emits) | phases: one stride-1 conv per stride phase | rows: one
                   matmul of δ's rows with a banded kernel (thin layers) | pointwise (1×1)
    weight grad    generic: conv with N as the contraction axis | taps: one matmul per kernel
                   tap over batch chunks | patches: one patch-matrix (im2col) matmul per
                   batch chunk | columns: the patch matrix of the column-blocked input |
                   split: the input's column shifts against δ's row shifts, one matmul per
                   batch chunk (stride 1) | chunksB: one convolution per B images |
                   pointwise (1×1): one matmul

and checks each against the generic result. jbp.conv's CPU dispatch (``_cpu_input_grad``,
``_cpu_weight_grad``) and its forwards (``_column_block``, ``_use_split_forward``) were chosen
from this table; docs/performance.md records the numbers.
The "chosen" column says which formulation jbp uses for that shape on this backend.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbp import conv as conv_lib

# (model, input (H, W, C_in), kernel, C_out, stride, padding), as the models build them.
MODEL_CONVS = {
    "lenet5": [((28, 28, 1), 5, 6, 1, "SAME"), ((14, 14, 6), 5, 16, 1, "VALID")],
    "resnet20": [((32, 32, 3), 3, 16, 1, 1), ((32, 32, 16), 3, 16, 1, 1),
                 ((32, 32, 16), 3, 32, 2, 1), ((32, 32, 16), 1, 32, 2, "VALID"),
                 ((16, 16, 32), 3, 32, 1, 1), ((16, 16, 32), 3, 64, 2, 1),
                 ((16, 16, 32), 1, 64, 2, "VALID"), ((8, 8, 64), 3, 64, 1, 1)],
    "resnet18": [((112, 112, 3), 7, 64, 2, 3), ((28, 28, 64), 3, 64, 1, 1),
                 ((28, 28, 64), 3, 128, 2, 1), ((28, 28, 64), 1, 128, 2, "VALID"),
                 ((14, 14, 128), 3, 128, 1, 1), ((7, 7, 256), 3, 256, 1, 1)],
}


def _formulations(x, w, cfg):
    """name -> (kind, fn(x, w, g)) for every formulation that applies to this shape."""
    out = {"forward": ("forward", lambda x, w, g: conv_lib._correlate(x, w, cfg)),
           "dx generic": ("input", lambda x, w, g: conv_lib._input_grad(g, w, x.shape, cfg)),
           "dW generic": ("weight", lambda x, w, g: conv_lib._weight_grad(x, g, w.shape, cfg))}
    if conv_lib._is_pointwise(w.shape, cfg):
        out["dx pointwise"] = ("input", lambda x, w, g: conv_lib._pointwise_input_grad(
            g, w, x.shape, cfg))
        out["dW pointwise"] = ("weight", lambda x, w, g: conv_lib._pointwise_weight_grad(
            x, g, cfg))
    elif cfg.groups == 1:
        if cfg.stride != (1, 1) and cfg.dilation == (1, 1):
            out["dx phases"] = ("input", lambda x, w, g: conv_lib._phase_input_grad(
                g, w, x.shape, cfg))
        out["dx taps"] = ("input", lambda x, w, g: conv_lib._tap_input_grad(
            g, w, x.shape, cfg))
        if cfg.stride == (1, 1) and cfg.dilation == (1, 1) and w.shape[2] <= 16:
            out["dx rows"] = ("input", lambda x, w, g: conv_lib._row_input_grad(
                g, w, x.shape, cfg))
        # Batch chunks: the chunk jbp would pick, else 16 or 4 images (to show what it costs).
        chunk = (conv_lib._weight_grad_chunk(x.shape, w.shape, x.dtype)
                 or (16 if w.shape[3] <= 16 else 4))
        if x.shape[0] >= 2 * chunk:
            out[f"dW chunks{chunk}"] = ("weight", lambda x, w, g: (
                conv_lib._batch_chunked_weight_grad(x, g, w.shape, cfg, chunk)))
        if cfg.stride == (1, 1):
            out["forward split"] = ("forward", lambda x, w, g: conv_lib._split_tap_correlate(
                x, w, cfg, conv_lib._split_forward_chunk(x.shape, w.shape, x.dtype, cfg)))
            out["dW split"] = ("weight", lambda x, w, g: conv_lib._split_tap_weight_grad(
                x, g, w.shape, cfg, conv_lib._split_taps_chunk(w.shape, g.shape[1:3], x.dtype,
                                                               cfg)))
        out["dW taps"] = ("weight", lambda x, w, g: conv_lib._tap_weight_grad(
            x, g, w.shape, cfg))
        out["dW patches"] = ("weight", lambda x, w, g: conv_lib._patch_weight_grad(
            x, g, w.shape, cfg))
    if (cfg.stride == (1, 1) and cfg.dilation == (1, 1) and cfg.groups == 1 and w.shape[1] > 1
            and w.shape[2] <= 32):
        # Column blocks: the block jbp would pick, else 2 (to show what blocking costs).
        block = max(conv_lib._forward_column_block(x.shape, w.shape, x.dtype, cfg), 2)
        out[f"forward columns{block}"] = ("forward", lambda x, w, g: (
            conv_lib._column_blocked_correlate(x, w, cfg, block)))
        out[f"dW columns{block}"] = ("weight", lambda x, w, g: (
            conv_lib._column_blocked_weight_grad(x, g, w.shape, cfg, block)))
    return out


def _chosen(x, w, cfg, kind):
    """The formulation jbp.conv's CPU dispatch picks for this shape."""
    z_hw = jax.eval_shape(lambda: conv_lib._forward(x, w, None, cfg)).shape[1:3]
    if kind == "input":
        return "dx " + conv_lib._cpu_input_grad_form(x.shape, w.shape, cfg, z_hw, x.dtype)
    if kind == "weight":
        form = conv_lib._cpu_weight_grad_form(x.shape, w.shape, cfg, z_hw, x.dtype)
        if form == "columns":
            form += str(conv_lib._weight_grad_column_block(x.shape, w.shape, x.dtype, cfg))
        if form == "chunks":
            form += str(conv_lib._weight_grad_chunk(x.shape, w.shape, x.dtype))
        return "dW " + form
    block = conv_lib._forward_column_block(x.shape, w.shape, x.dtype, cfg)
    if block > 1:
        return f"forward columns{block}"
    return "forward split" if conv_lib._use_split_forward(x.shape, w.shape, cfg,
                                                         x.dtype) else "forward"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet5,resnet20",
                   help=f"comma-separated subset of {', '.join(MODEL_CONVS)}")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=15, help="timed calls per formulation")
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_CONVS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODEL_CONVS)}")

    rng = np.random.default_rng(0)
    rows = []
    print(f"jax {jax.__version__} on {jax.default_backend()}, batch {args.batch}, medians of "
          f"{args.repeats} alternating calls (ms)\n")
    print("| model | input | kernel | stride | formulation | ms | × generic | max rel err "
          "| chosen |")
    print("|---|---|---|---:|---|---:|---:|---:|---|")
    for model in models:
        for (h, wd, cin), k, cout, stride, padding in MODEL_CONVS[model]:
            x = jnp.asarray(rng.standard_normal((args.batch, h, wd, cin), dtype=np.float32))
            w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32))
            cfg = conv_lib.conv_config(x, w, stride=stride, padding=padding)
            z = conv_lib._correlate(x, w, cfg)
            g = jnp.asarray(rng.standard_normal(z.shape, dtype=np.float32))
            forms = {name: (kind, jax.jit(fn)) for name, (kind, fn) in
                     _formulations(x, w, cfg).items()}
            results = {name: fn(x, w, g).block_until_ready() for name, (_, fn) in forms.items()}
            for _ in range(2):
                for _, fn in forms.values():
                    fn(x, w, g).block_until_ready()
            times = {name: [] for name in forms}
            for r in range(args.repeats):
                names = list(forms)
                for name in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    forms[name][1](x, w, g).block_until_ready()
                    times[name].append(1e3 * (time.perf_counter() - t0))
            generic = {"forward": "forward", "input": "dx generic", "weight": "dW generic"}
            for name, (kind, _) in forms.items():
                ref = results[generic[kind]]
                err = float(jnp.max(jnp.abs(results[name] - ref)) / jnp.max(jnp.abs(ref)))
                med = float(np.median(times[name]))
                ratio = med / float(np.median(times[generic[kind]]))
                chosen = "✓" if _chosen(x, w, cfg, kind) == name else ""
                row = {"model": model, "input": [args.batch, h, wd, cin], "kernel": [k, k, cin, cout],
                       "stride": stride, "padding": str(padding), "formulation": name,
                       "ms_median": med, "ratio_to_generic": ratio, "max_rel_err": err,
                       "chosen": bool(chosen)}
                rows.append(row)
                print(f"| {model} | {args.batch}×{h}×{wd}×{cin} | {k}×{k}→{cout} | {stride} "
                      f"| {name} | {med:.2f} | {ratio:.2f} | {err:.1e} | {chosen} |",
                      flush=True)
                if err > 1e-4:
                    print(f"error: {name} disagrees with the generic form ({err:.1e})",
                          file=sys.stderr)
                    return 1
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

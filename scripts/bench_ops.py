#!/usr/bin/env python
"""Per-operation micro-benchmark: each formulation of a convolution's three equations, on the
convolution shapes of the benchmark models.

    python scripts/bench_ops.py                    # every conv of lenet5 b128 and resnet20 b128
    python scripts/bench_ops.py --models resnet20 --batch 32 --json ops.json

For every distinct convolution (input shape, kernel, stride, padding) it times, alternating and
after warm-up, the medians of each equation's generic XLA convolution, the form the table of
``jbp.cpu_conv`` chooses for that shape (marked ✓ in the "chosen" column; ✓ on "generic"
where the table chooses none), and the other forms of the table that apply, at the parameters
their predicates pick or at ones that show what they cost. Rows are labelled
"EQUATION FORM PARAMS" with the table's names (``weight_grad chunks chunk=16``). Each is
called as the library's dispatch calls it, ``fn(*operands, *static, **params)``
(``jbp.cpu_conv.arguments``), and checked against the generic result; docs/performance.md
records the numbers the table was chosen from.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jbp import cpu_conv as kernels
from jbp._conv_kernels import onednn
from jbp.layers import conv as conv_lib

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
    # The U-Net's 2×2 stride-2 up-convolutions (64×64 input) as the convolution C they
    # transpose (jbp.layers.conv_transpose): C's input_grad is the layer's forward, C's forward
    # and weight_grad its backward. oneDNN's deconvolution primitive is these same three.
    "unet_up": [((16, 16, 64), 2, 128, 2, "VALID"), ((32, 32, 32), 2, 64, 2, "VALID"),
                ((64, 64, 16), 2, 32, 2, "VALID")],
}


_GENERIC = {"forward": "forward generic", "input_grad": "input_grad generic",
            "weight_grad": "weight_grad generic"}


def _label(equation, form_name, params):
    """'weight_grad chunks chunk=16': the equation, the table's form name and its parameters."""
    return " ".join([equation, form_name] + [f"{k}={v}" for k, v in sorted(params.items())])


def _call(equation, fn, cfg, params):
    """The form as fn(x, w, g), called as the library's dispatch calls it."""
    def call(x, w, g):
        operands, static = kernels.arguments(equation, x, w, g, cfg)
        return fn(*operands, *static, **params)
    return call


def _alternatives(x, w, cfg):
    """Forms of the table to time besides its choice, by name, with the parameters to time
    them at: each form that applies to this shape at the parameter its predicate picks, or else
    one that shows what it costs (chunks of 16 or 4, blocks of 2)."""
    alt = {"input_grad": [], "weight_grad": [], "forward": []}
    if cfg.groups != 1:
        return alt
    if kernels.is_pointwise(w.shape, cfg):
        alt["input_grad"].append(("pointwise", {}))
        alt["weight_grad"].append(("pointwise", {}))
        return alt
    if cfg.stride != (1, 1) and cfg.dilation == (1, 1):
        alt["input_grad"].append(("phases", {}))
        if onednn.select(x.shape, w.shape, cfg, x.dtype) is not None:
            # oneDNN's backward-data at a stride its predicate leaves to XLA: what oneDNN's
            # deconvolution primitive runs as a transposed convolution's forward (unet_up)
            alt["input_grad"].append(("onednn", {}))
    unit = cfg.stride == (1, 1) and cfg.dilation == (1, 1)
    if unit and w.shape[2] <= 16:
        alt["input_grad"].append(("rows", {}))
    chunk = 16 if w.shape[3] <= 16 else 4
    if x.shape[0] >= 2 * chunk:
        alt["weight_grad"].append(("chunks", {"chunk": chunk}))
    if cfg.stride == (1, 1):
        split = kernels.split_chunk(x.shape, w.shape, cfg, x.dtype)
        alt["forward"].append(("split", {"chunk": split}))
        alt["weight_grad"].append(("split", {"chunk": split}))
    alt["weight_grad"] += [("taps", {}), ("patches", {})]
    if unit and w.shape[1] > 1 and w.shape[2] <= 32:
        block = kernels.column_block(x.shape, w.shape, cfg, x.dtype, max_cin=32) or 2
        alt["forward"].append(("columns", {"block": block}))
        alt["weight_grad"].append(("columns", {"block": block}))
    return alt


def _formulations(x, w, cfg):
    """label -> (equation, fn(x, w, g), chosen) for the generic form of each equation, the
    table's choice (jbp.cpu_conv.choose) and the alternatives."""
    out = {}
    for equation, alternatives in _alternatives(x, w, cfg).items():
        chosen = kernels.choose(equation, x.shape, w.shape, cfg, x.dtype)
        out[_GENERIC[equation]] = (equation, _call(equation, kernels.GENERIC[equation], cfg, {}),
                                   chosen is None)
        candidates = [(kernels.form_named(equation, name), params) for name, params in alternatives]
        if chosen is not None:
            candidates.insert(0, chosen)
        for form, params in candidates:
            label = _label(equation, form.name, params)
            if label not in out:
                out[label] = (equation, _call(equation, form.fn, cfg, params),
                              chosen is not None and label == _label(equation, chosen[0].name,
                                                                     chosen[1]))
    return out


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
    print("The table of forms (jbp.cpu_conv.FORMS), first match wins:\n")
    for equation, table in kernels.FORMS.items():
        for form in table:
            only = " (rule only)" if form.rule_only else ""
            print(f"  {equation:<12} {form.name:<10} {form.why}{only}")
    print(f"\njax {jax.__version__} on {jax.default_backend()}, batch {args.batch}, medians of "
          f"{args.repeats} alternating calls (ms)\n")
    print("| model | input | kernel | stride | formulation | ms | × generic | max rel err "
          "| chosen |")
    print("|---|---|---|---:|---|---:|---:|---:|---|")
    for model in models:
        for (h, wd, cin), k, cout, stride, padding in MODEL_CONVS[model]:
            x = jnp.asarray(rng.standard_normal((args.batch, h, wd, cin), dtype=np.float32))
            w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32))
            cfg = conv_lib.conv_config(x, w, stride=stride, padding=padding)
            z = kernels.GENERIC["forward"](x, w, cfg)
            g = jnp.asarray(rng.standard_normal(z.shape, dtype=np.float32))
            table = _formulations(x, w, cfg)
            forms = {name: (kind, jax.jit(fn)) for name, (kind, fn, _) in table.items()}
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
            for name, (kind, _) in forms.items():
                ref = results[_GENERIC[kind]]
                err = float(jnp.max(jnp.abs(results[name] - ref)) / jnp.max(jnp.abs(ref)))
                med = float(np.median(times[name]))
                ratio = med / float(np.median(times[_GENERIC[kind]]))
                chosen = "✓" if table[name][2] else ""
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

#!/usr/bin/env python
"""Depthwise and pointwise convolutions of MobileNetV2 / EfficientNet-B0: each equation's forms
timed against each other, and PyTorch's F.conv2d at the same shapes (in a child process).

    python scripts/bench_depthwise.py --batch 4 --size 224 --repeats 9
    python scripts/bench_depthwise.py --batch 4 --size 224 --no-torch --only dw

For every distinct depthwise convolution of both nets (and their 1×1 expand/project layers with
``--only all``) it times, in rounds that call every variant once in rotating order after
warm-up, the median of: the form the table of ``jbp.cpu_conv`` chooses (what jbp runs),
the generic XLA convolution (``feature_group_count = C``), oneDNN's kernel (where it builds)
and the shifted-slice forms of ``jbp._conv_kernels.depthwise_forms`` (depthwise) or the plain
matmul (pointwise forward). PyTorch runs in a child process (its OpenMP runtime would share
oneDNN's: docs/onednn.md, "Why PyTorch runs in its own process"), channels-last, with
``torch.set_num_threads`` = the CPU count: forward, and forward+backward (input and weight
gradients) — "backward" is their difference. Every form is checked against the generic result.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def net_convs(size: int, only: str):
    """[(net, role, (H, W, C_in), k, C_out, stride, groups)] of both nets' blocks, distinct."""
    from jbp.models.mobilenet import EFFICIENTNET_B0, MOBILENET_V2
    out, seen = [], set()
    for spec in (MOBILENET_V2, EFFICIENTNET_B0):
        h = -(-size // 2)                                   # after the stride-2 stem
        for b in spec.blocks():
            layers = []
            if b.expand != 1:
                layers.append(("expand", h, b.cin, 1, b.hidden, 1, 1))
            layers.append(("dw", h, b.hidden, b.kernel, b.hidden, b.stride, b.hidden))
            h = -(-h // b.stride)
            layers.append(("project", h, b.hidden, 1, b.cout, 1, 1))
            for role, hh, cin, k, cout, s, groups in layers:
                if (only == "dw") != (role == "dw") and only != "all":
                    continue
                key = (hh, cin, k, cout, s, groups)
                if key not in seen:
                    seen.add(key)
                    out.append((spec.name, role, (hh, hh, cin), k, cout, s, groups))
    return out


def _torch_child(batch, size, only, repeats):
    """Times F.conv2d forward and forward+backward per shape; prints one JSON line per shape."""
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(int(os.environ.get("JBP_TORCH_THREADS", os.cpu_count())))
    for net, role, (h, w, cin), k, cout, s, groups in net_convs(size, only):
        x = torch.randn(batch, cin, h, w).to(memory_format=torch.channels_last)
        wt = torch.randn(cout, cin // groups, k, k).to(memory_format=torch.channels_last)
        x.requires_grad_(True)
        wt.requires_grad_(True)

        def fwd():
            with torch.no_grad():
                F.conv2d(x, wt, stride=s, padding=(k - 1) // 2, groups=groups)

        def fwd_bwd():
            z = F.conv2d(x, wt, stride=s, padding=(k - 1) // 2, groups=groups)
            gx, gw = torch.autograd.grad(z, (x, wt), torch.ones_like(z))
        times = {"fwd": [], "fwd_bwd": []}
        for f in (fwd, fwd_bwd, fwd, fwd_bwd):
            f()
        for _ in range(repeats):
            for name, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                t0 = time.perf_counter()
                f()
                times[name].append(1e3 * (time.perf_counter() - t0))
        print(json.dumps({"key": [h, cin, k, cout, s, groups],
                          **{n: float(np.median(t)) for n, t in times.items()},
                          **{n + "_min": float(np.min(t)) for n, t in times.items()}}),
              flush=True)


def _step_before_after(net, batch, size, repeats):
    """A whole train step's loss and gradients (jbp's manual rules) of ``net``, compiled twice in
    one process: with the table as it was before the depthwise forms ("before": no depthwise
    form, strided grouped input gradients on XLA's grouped convolution) and as it is ("after");
    timed alternately, medians."""
    import jax
    import jax.numpy as jnp
    import jbp
    from jbp import models
    from jbp._conv_kernels import FORMS, onednn
    model = models.get_model(net)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 1000, batch))
    params, state = model.init(jax.random.key(0), x.shape[1:], 1000)
    policy = jbp.LayerPolicy("manual")

    def loss(params):
        logits, _ = model.apply(params, state, x, train=True, layers=policy)
        return jbp.softmax_cross_entropy(logits, y)

    def compiled():
        return jax.jit(jax.value_and_grad(loss)).lower(params).compile()

    after = compiled()

    def stride_1_only(x_shape, w_shape, cfg, dtype):      # the predicate before issue 25
        if tuple(cfg.stride) != (1, 1):
            return None
        return onednn.select_input_grad(x_shape, w_shape, cfg, dtype)

    saved = dict(FORMS)
    try:
        for eq in FORMS:
            FORMS[eq] = tuple(f._replace(select=stride_1_only)
                              if (eq, f.name) == ("input_grad", "onednn") else f
                              for f in FORMS[eq] if f.name != "depthwise")
        before = compiled()
    finally:
        FORMS.update(saved)
    steps = {"before": before, "after": after}
    for f in steps.values():
        jax.block_until_ready(f(params))
    times = {k: [] for k in steps}
    for r in range(repeats):
        for k in (list(steps) if r % 2 else list(steps)[::-1]):
            t0 = time.perf_counter()
            jax.block_until_ready(steps[k](params))
            times[k].append(1e3 * (time.perf_counter() - t0))
    print(f"{net} batch {batch} {size}x{size}, manual loss+grad, medians of {repeats} "
          f"alternating steps (ms): " + ", ".join(f"{k} {np.median(t):.1f} (min {min(t):.1f})"
                                                 for k, t in times.items())
          + f"; load average {os.getloadavg()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--only", choices=("dw", "pw", "all"), default="all")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--step", choices=("mobilenet_v2", "efficientnet_b0"), default=None,
                   help="instead: a whole train step with the table before and after the "
                        "depthwise forms")
    p.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--torch-json", default=None, metavar="PATH",
                   help="PyTorch's timings: read from here if it exists, else written here")
    args = p.parse_args(argv)
    if args.step:
        _step_before_after(args.step, args.batch, args.size, args.repeats)
        return 0
    if args.torch_child:
        _torch_child(args.batch, args.size, args.only, args.repeats)
        return 0

    torch_ms = {}
    if args.torch_json and os.path.exists(args.torch_json):
        lines = open(args.torch_json).read().splitlines()
    elif not args.no_torch:
        lines = subprocess.run([sys.executable, __file__, "--torch-child", "--batch",
                                str(args.batch), "--size", str(args.size), "--only", args.only,
                                "--repeats", str(args.repeats)], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        if args.torch_json:
            with open(args.torch_json, "w") as f:
                f.write("\n".join(lines))
    else:
        lines = []
    if lines:
        for line in lines:
            row = json.loads(line)
            torch_ms[tuple(row["key"])] = row

    import jax
    import jax.numpy as jnp
    from jbp import cpu_conv as kernels
    from jbp._conv_kernels import _case, depthwise_forms as D, onednn
    from jbp.layers import conv as conv_lib

    rng = np.random.default_rng(0)
    rows = []
    print(f"jax {jax.__version__}, batch {args.batch}, {args.size}×{args.size} nets, medians of "
          f"{args.repeats} rotating rounds (ms); load average before: {os.getloadavg()}\n")
    print("| net | layer | input | kernel | s | eq | chosen | chosen ms | generic | onednn "
          "| shifted/matmul | torch |")
    print("|---|---|---|---|---:|---|---|---:|---:|---:|---:|---:|")
    for net, role, (h, wd, cin), k, cout, s, groups in net_convs(args.size, args.only):
        x = jnp.asarray(rng.standard_normal((args.batch, h, wd, cin), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout), dtype=np.float32))
        cfg = conv_lib.conv_config(x, w, stride=s, padding=(k - 1) // 2, groups=groups)
        z = kernels.GENERIC["forward"](x, w, cfg)
        g = jnp.asarray(rng.standard_normal(z.shape, dtype=np.float32))
        tk = torch_ms.get((h, cin, k, cout, s, groups))
        for equation in ("forward", "input_grad", "weight_grad"):
            operands, static = kernels.arguments(equation, x, w, g, cfg)
            variants = {"chosen": lambda *o: kernels.dispatch(equation, o, static),
                        "generic": lambda *o: kernels.GENERIC[equation](*o, *static)}
            kind = {"forward": onednn.FORWARD, "input_grad": onednn.INPUT_GRAD,
                    "weight_grad": onednn.WEIGHT_GRAD}[equation]
            if onednn._supported(kind, x.shape, w.shape, cfg, x.dtype):
                variants["onednn"] = lambda *o: getattr(onednn, {
                    "forward": "correlate"}.get(equation, equation))(*o, *static)
            if D.is_depthwise(x.shape, w.shape, cfg):
                variants["alt"] = lambda *o: getattr(D, {
                    "forward": "correlate"}.get(equation, equation))(*o, *static)
            elif k == 1 and equation == "forward" and s == 1:
                variants["alt"] = lambda a, b: jax.lax.dot_general(
                    a, b[0, 0], (((3,), (0,)), ((), ())))
            chosen = kernels.choose(equation, *_case(equation, operands, static))
            fns = {n: jax.jit(f) for n, f in variants.items()}
            ref = fns["generic"](*operands).block_until_ready()
            for n, f in fns.items():
                out = f(*operands).block_until_ready()
                err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
                if err > 1e-4:
                    print(f"error: {n} disagrees ({err:.1e})", file=sys.stderr)
                    return 1
                f(*operands).block_until_ready()
            times = {n: [] for n in fns}
            names = list(fns)
            for r in range(args.repeats):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    fns[n](*operands).block_until_ready()
                    times[n].append(1e3 * (time.perf_counter() - t0))
            med = {n: float(np.median(t)) for n, t in times.items()}
            torch_col = ""
            if tk:
                torch_col = (f"{tk['fwd']:.2f}" if equation == "forward" else
                             f"{tk['fwd_bwd'] - tk['fwd']:.2f} (dx+dW)"
                             if equation == "input_grad" else "")
            cell = lambda n: f"{med[n]:.2f}" if n in med else "–"  # noqa: E731
            print(f"| {net} | {role} | {args.batch}×{h}×{wd}×{cin} | {k}×{k}→{cout} g{groups} "
                  f"| {s} | {equation} | {chosen[0].name if chosen else 'generic'} "
                  f"| {med['chosen']:.2f} | {cell('generic')} | {cell('onednn')} | {cell('alt')} "
                  f"| {torch_col} |", flush=True)
            rows.append({"net": net, "role": role, "input": [args.batch, h, wd, cin], "k": k,
                         "cout": cout, "stride": s, "groups": groups, "equation": equation,
                         "chosen": chosen[0].name if chosen else "generic", "ms": med,
                         "torch": tk})
    print(f"\nload average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

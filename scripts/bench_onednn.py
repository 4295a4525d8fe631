#!/usr/bin/env python
"""oneDNN vs jbp's own CPU forms, per convolution shape and equation (docs/onednn.md).

    python scripts/bench_onednn.py               # lenet5 b128, resnet20 b128, resnet18 b16
    python scripts/bench_onednn.py --models resnet20 --batch 32 --repeats 11

For every convolution of the benchmark models (scripts/bench_ops.py's MODEL_CONVS) it times,
alternating after warm-up, the median of: the XLA form jbp's manual rule uses on CPU today
(the first form of jbp.cpu_conv.FORMS other than oneDNN that selects the shape, printed
in brackets, or the generic convolution), and the oneDNN FFI op of the same equation; prints the ratio
(oneDNN / XLA, < 1: oneDNN faster) and the relative difference of the results.

    python scripts/bench_onednn.py --threads        # the threading checks of docs/onednn.md
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_ops import MODEL_CONVS  # noqa: E402

from jbp import cpu_conv as kernels  # noqa: E402
from jbp.layers import conv as conv_lib  # noqa: E402

_DEFAULT_BATCH = {"lenet5": 128, "resnet20": 128, "resnet18": 16}


def _xla_form(equation, x_shape, w_shape, cfg, dtype):
    """The form jbp's table chooses with oneDNN left out (its first other match), else the
    generic convolution."""
    for form in kernels.FORMS[equation]:
        if form.name != "onednn":
            params = form.select(tuple(x_shape), tuple(w_shape), cfg, dtype)
            if params is not None:
                return form.name, functools.partial(form.fn, **params)
    return "generic", kernels.GENERIC[equation]


def _forms(cfg, x_shape, w_shape):
    """equation -> (XLA form's name, jitted XLA form, jitted oneDNN op), all fn(x, w, g),
    each called as the library's dispatch calls it (jbp.cpu_conv.arguments)."""
    def call(eq, fn):
        def f(x, w, g):
            operands, static = kernels.arguments(eq, x, w, g, cfg)
            return fn(*operands, *static)
        return jax.jit(f)

    out = {}
    for eq in kernels.FORMS:
        name, fn = _xla_form(eq, x_shape, w_shape, cfg, jnp.float32)
        out[eq] = (name, call(eq, fn), call(eq, kernels.form_named(eq, "onednn").fn))
    return out


def _time_pair(a, b, args, repeats):
    for _ in range(2):
        a(*args).block_until_ready()
        b(*args).block_until_ready()
    ta, tb = [], []
    for r in range(repeats):
        order = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
        for fn, times in order:
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            times.append(1e3 * (time.perf_counter() - t0))
    # Minima: on a loaded machine the fastest call is the closest to an unloaded one; the
    # paired median ratio is printed beside them.
    return float(np.min(ta)), float(np.min(tb)), float(np.median(np.divide(tb, ta)))


def shapes(argv_models, batch, repeats, out_json):
    rng = np.random.default_rng(0)
    rows = []
    print(f"jax {jax.__version__}, {kernels.describe()}; fastest of {repeats} alternating calls, "
          f"and the median of the paired ratios\n")
    print("| model | input | kernel | stride | equation | XLA ms (min) | oneDNN ms (min) "
          "| oneDNN/XLA (min) | paired median | GFLOP/s XLA → oneDNN | rel diff |")
    print("|---|---|---|---:|---|---:|---:|---:|---:|---|---:|")
    for model in argv_models:
        n = batch or _DEFAULT_BATCH[model]
        for (h, wd, cin), k, cout, stride, padding in MODEL_CONVS[model]:
            x = jnp.asarray(rng.standard_normal((n, h, wd, cin), dtype=np.float32))
            w = jnp.asarray(rng.standard_normal((k, k, cin, cout), dtype=np.float32))
            cfg = conv_lib.conv_config(x, w, stride=stride, padding=padding)
            z = kernels.GENERIC["forward"](x, w, cfg)
            g = jnp.asarray(rng.standard_normal(z.shape, dtype=np.float32))
            flops = 2 * z.size * k * k * cin
            for eq, (name, fx, fd) in _forms(cfg, x.shape, w.shape).items():
                ref, got = fx(x, w, g), fd(x, w, g)
                err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
                tx, td, ratio = _time_pair(fx, fd, (x, w, g), repeats)
                rows.append(dict(model=model, input=[n, h, wd, cin], kernel=[k, k, cin, cout],
                                 stride=stride, padding=str(padding), equation=eq,
                                 xla_form=name, xla_ms=tx,
                                 onednn_ms=td, ratio_min=td / tx, ratio_paired=ratio,
                                 rel_diff=err))
                print(f"| {model} | {n}×{h}×{wd}×{cin} | {k}×{k}→{cout} | {stride} | {eq} "
                      f"({name}) | "
                      f"{tx:.2f} | {td:.2f} | {td / tx:.2f} | {ratio:.2f} | "
                      f"{flops / tx / 1e6:.0f} → "
                      f"{flops / td / 1e6:.0f} | {err:.1e} |", flush=True)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(rows, f, indent=1)


_PROBE = r"""
import ctypes, os, sys, time, numpy as np, jax, jax.numpy as jnp
from jbp.layers.conv import conv_config
from jbp import cpu_conv
assert cpu_conv.describe().startswith("onednn"), cpu_conv.unavailable_reason()
correlate = cpu_conv.form_named("forward", "onednn").fn
ctypes.CDLL("libgomp.so.1").omp_display_env(0)   # prints the ICVs, OMP_WAIT_POLICY among them
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((128, 16, 16, 32)), jnp.float32)
w = jnp.asarray(rng.standard_normal((3, 3, 32, 32)), jnp.float32)
cfg = conv_config(x, w)
a = jnp.asarray(rng.standard_normal((512, 512)), jnp.float32)
conv = jax.jit(lambda x, w: correlate(x, w, cfg))
mm = jax.jit(lambda a: a @ a)
# XLA's own op right after a oneDNN call (slowed if oneDNN's idle threads spin) vs alone;
# two independent oneDNN convolutions in one program (XLA may run them concurrently) vs one.
two = jax.jit(lambda x, w: (correlate(x, w, cfg), correlate(x * 2, w, cfg)))
one = jax.jit(lambda x, w: (correlate(x, w, cfg), x * 2))
def timed(f):
    t0 = time.perf_counter(); jax.block_until_ready(f()); return time.perf_counter() - t0
def after():
    conv(x, w).block_until_ready(); return timed(lambda: mm(a))
pairs = {"after": (after, lambda: timed(lambda: mm(a))),
         "two": (lambda: timed(lambda: two(x, w)), lambda: timed(lambda: one(x, w)))}
out = []
for name, (f, g) in pairs.items():
    f(); g(); f(); g()
    tf, tg = [], []
    for r in range(60):
        for fn, ts in (((f, tf), (g, tg)) if r % 2 else ((g, tg), (f, tf))):
            ts.append(fn())
    out.append(f"{name}: {np.median(tf)*1e3:.2f} vs {np.median(tg)*1e3:.2f} ms, paired "
               f"x{np.median(np.divide(tf, tg)):.2f}")
print("RESULT matmul after oneDNN vs alone; two convs vs one:", "; ".join(out))
"""


def threads():
    """Each setting in a fresh process: libgomp reads OMP_WAIT_POLICY when it loads."""
    root = pathlib.Path(__file__).resolve().parents[1]
    for label, extra in (("default (jbp sets PASSIVE)", {}),
                         ("OMP_WAIT_POLICY=ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}),
                         ("no execution lock", {"JBP_ONEDNN_NO_LOCK": "1"})):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env.update(extra, PYTHONPATH=str(root))
        done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                              text=True, timeout=600)
        policy = [ln.strip() for ln in done.stderr.splitlines() if "OMP_WAIT_POLICY" in ln]
        result = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")]
        print(f"{label}: {policy[:1]} {result or done.stderr[-500:]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="lenet5,resnet20,resnet18")
    p.add_argument("--batch", type=int, default=0, help="default: 128, 128, 16 by model")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--threads", action="store_true", help="run the threading checks instead")
    args = p.parse_args(argv)
    if kernels.describe().startswith("xla"):
        print(f"oneDNN not active: {kernels.describe()}", file=sys.stderr)
        return 1
    if args.threads:
        threads()
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_CONVS]
    if bad:
        p.error(f"--models: unknown {bad}; choose from {', '.join(MODEL_CONVS)}")
    shapes(models, args.batch, args.repeats, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

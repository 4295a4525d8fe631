#!/usr/bin/env python
"""Data-parallel train steps on host devices: collectives, compile time, step time.

    python scripts/bench_scaling.py                       # 8 host devices, lenet5 + resnet20 b64
    python scripts/bench_scaling.py --devices 4 --models resnet20 --gspmd

For each model and gradient mode it builds ``make_train_step(..., mesh=Mesh(devices, ("data",)))``
(the body under ``shard_map``: every rule sees its device's shard) and, with ``--gspmd``, the
plain one-device step under ``jit`` with the batch sharded ``P("data")`` (XLA's partitioner
splits the global program; the CPU formulations then see the global batch). It prints the
collectives in ``compiled.as_text()``, the compile time and the median step time (float32).
Step times on a shared 2-core machine are noisy: compare the paired rows, not absolute values.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

KINDS = ("all-reduce", "collective-permute", "all-to-all", "all-gather", "reduce-scatter")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8, help="host devices (default 8)")
    p.add_argument("--models", default="lenet5,resnet20")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--gspmd", action="store_true",
                   help="also time the plain step under jit with a sharded batch")
    args = p.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")

    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jbp.models import get_model
    from jbp.train import init_train_state, make_optimizer, make_train_step

    mesh = Mesh(np.array(jax.devices()[:args.devices]), ("data",))
    opt = make_optimizer("momentum", 0.05)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32)
    y = (np.arange(args.batch) % 10).astype(np.int32)
    rows = []
    print(f"jax {jax.__version__}, {len(mesh.devices.flat)} host devices, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores", flush=True)
    for name in args.models.split(","):
        model = get_model(name)
        modes = ["shard_map"] + (["gspmd"] if args.gspmd else [])
        for mode in modes:
            for grad in ("manual", "autodiff"):
                state = init_train_state(model, opt, jax.random.key(0), (28, 28, 1), 10)
                if mode == "shard_map":
                    step = make_train_step(model.apply, opt, grad=grad, mesh=mesh)
                    xs, ys = x, y
                else:
                    step = make_train_step(model.apply, opt, grad=grad)
                    state = jax.device_put(state, NamedSharding(mesh, P()))
                    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
                    ys = jax.device_put(y, NamedSharding(mesh, P("data")))
                t0 = time.perf_counter()
                compiled = step.lower(state, xs, ys).compile()
                compile_s = time.perf_counter() - t0
                text = compiled.as_text()
                counts = {k: len(re.findall(rf"\s{k}(-start)?\(", text)) for k in KINDS}
                state, _ = compiled(state, xs, ys)
                jax.block_until_ready(state)
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    state, m = compiled(state, xs, ys)
                    jax.block_until_ready(m["loss"])
                    times.append(time.perf_counter() - t0)
                row = dict(model=name, mode=mode, grad=grad, compile_s=compile_s,
                           step_ms=1e3 * float(np.median(times)), **counts)
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print("| model | mode | grad | all-reduce | coll.-permute | all-to-all | all-gather "
          "| compile s | step ms (median) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['mode']} | {r['grad']} | {r['all-reduce']} "
              f"| {r['collective-permute']} | {r['all-to-all']} | {r['all-gather']} "
              f"| {r['compile_s']:.1f} | {r['step_ms']:.1f} |")


if __name__ == "__main__":
    main()

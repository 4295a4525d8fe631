#!/usr/bin/env python
"""Where one train step's time goes, jbp beside PyTorch eager, summed by kind of work.

    python scripts/profile_step.py                          # ResNet-20 b32, 10 profiled steps
    python scripts/profile_step.py --config lenet5_b128 --steps 20 --json prof.json

Both sides run the step ``scripts/bench.py`` times (same network, parameters, batch, SGD +
momentum 0.9; PyTorch channels-last in a child process of its own, as in the benchmark) and are
profiled by their own profiler over ``--steps`` steps after warm-up:

- jbp: ``jax.profiler.trace``. XLA:CPU records one event per thunk, named after its HLO
  instruction (``ffi_call.53``, ``compare_select_fusion.27``); each is looked up in the compiled
  HLO and classified by what it runs: oneDNN's custom calls by their target (forward, input
  gradient, weight gradient), the rest by the named scopes jbp's rules put on their ops
  (``jbp.batch_norm.bwd``, ``jbp.relu.fwd``; ``jbp._rule``), including every instruction fused
  into a fusion. A fusion holding both batch norm and ReLU work is its own kind (XLA fused the
  two passes into one).
- PyTorch: ``torch.profiler`` (CPU activities), each aten op's *self* time, classified by name.

Kinds: conv forward, conv input grad, conv weight grad (on PyTorch's oneDNN path one
``convolution_backward`` op computes both gradients: shown as "conv input+weight grad"),
conv (other: XLA ops around the kernels), batch norm, ReLU, batch norm + ReLU (one fused
pass), reorders/copies, allocation (PyTorch's ``empty``/``resize_``; XLA allocates outside
its ops), optimizer, loss + other (residual additions, the loss), and on jbp's side with
``--quantity`` the per-example work, tagged "[quantities]". Times are sums of exclusive event
times per step (ms; on jbp's side each thunk's median run times its runs per step); "wall" is
the measured step time. On XLA:CPU independent thunks may run concurrently, so jbp's sum can
exceed its wall time. ``resnet20nobn_b32`` (no batch norm) has no PyTorch twin: ``--sides jbp``.

Under ``--env tuned`` (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, the benchmark's) PyTorch's
step runs about 3× slower *while profiled* (allocation and first-touch elementwise ops;
docs/performance.md); its kernel rows stay right. ``--env default`` profiles it faithfully.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    """scripts/bench.py as a module (scripts/ is not a package; its top level imports only the
    standard library): the configurations, environment and steps profiled here are its own."""
    spec = importlib.util.spec_from_file_location(
        "_jbp_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
#: bench.py's configurations whose PyTorch twin is ``reference_models.torch_model``'s.
CONFIGS = {name: c for name, c in bench.CONFIGS.items() if c[0] in ("lenet5", "resnet20",
                                                                     "resnet18")}
KINDS = ("conv forward", "conv input grad", "conv weight grad", "conv input+weight grad",
         "conv (other)", "batch norm", "ReLU", "batch norm + ReLU (fused)", "pooling",
         "dense", "reorders/copies", "allocation", "optimizer", "loss + other")
_ONEDNN_TARGETS = {"JbpDnnlConvForward": "conv forward", "JbpDnnlConvInputGrad": "conv input grad",
                   "JbpDnnlConvWeightGrad": "conv weight grad"}


def _batch(batch, shape, classes):
    import numpy as np  # noqa: PLC0415
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    y = rng.integers(0, classes, (batch,)).astype(np.int32)
    return x, y


# ------------------------------------------------------------------------------------- jbp --

def _hlo_kinds(hlo_text: str, batch: int) -> dict:
    """HLO instruction name -> kind, for every instruction of the compiled module."""
    computations, current = {}, None
    instructions = {}                       # name -> (computation it calls or None, line)
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            computations[current] = []
            continue
        inst = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line)
        if inst and current is not None:
            computations[current].append(line)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            instructions[inst.group(1)] = (called.group(1) if called else None, line)

    def op_name(line):
        m = re.search(r'op_name="([^"]*)"', line)
        return m.group(1) if m else None

    def classify(name):
        called, line = instructions[name]
        lines = [line] + (computations.get(called, []) if called else [])
        names = [n for n in map(op_name, lines) if n]
        found = {m for n in names
                 for m in re.findall(r"jbp\.([a-z0-9_]+)\.(fwd|bwd|quantities)", n)}
        target = re.search(r'custom_call_target="([^"]+)"', line)
        if target and target.group(1) in _ONEDNN_TARGETS:
            kind = _ONEDNN_TARGETS[target.group(1)]
        else:
            kind = _kind(name, line, lines, names, found, batch)
        if any(part == "quantities" for _, part in found):     # jbp.quantities' extra work
            return "quantities" if kind == "loss + other" else f"{kind} [quantities]"
        return kind

    return {name: classify(name) for name in instructions}


def _kind(name, line, lines, names, found, batch):
    """The kind of one instruction (``line``; ``lines`` adds the computation it calls) from
    the rule scopes ``found`` in its ops' names and its opcode."""
    layers = {layer for layer, _ in found}
    opcode = re.search(r" = \S+ ([a-z\-]+)\(", line)
    opcode = opcode.group(1) if opcode else ""
    moves = opcode in ("copy", "transpose") or re.match(r"(copy|transpose)", name)
    if {"batch_norm", "relu"} <= layers:
        return "batch norm + ReLU (fused)"
    if layers & {"conv2d", "conv_transpose2d"}:
        if any(" convolution(" in l for l in lines):
            if ("conv2d", "quantities") in found:
                return "conv weight grad"               # per-example: (N, KH, KW, C, K)
            if ("conv2d", "bwd") not in found:
                return "conv forward"
            dims = re.search(r" = f\d+\[(\d+),", line)
            return "conv input grad" if dims and int(dims.group(1)) == batch \
                else "conv weight grad"
        return "reorders/copies" if moves else "conv (other)"
    for layer, kind in (("batch_norm", "batch norm"), ("relu", "ReLU"),
                        ("max_pool", "pooling"), ("avg_pool", "pooling"),
                        ("global_avg_pool", "pooling"), ("dense", "dense")):
        if layer in layers:
            return kind
    if moves:
        return "reorders/copies"
    # outside value_and_grad's jvp/transpose: the optax update
    if names and all("jvp(" not in n and "transpose(" not in n for n in names):
        return "optimizer"
    return "loss + other"


def _exclusive_times(events):
    """Per event name, the list of its occurrences' durations minus those of the events nested
    in each on the same thread (µs), in trace order."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e["tid"])].append(e)
    times = collections.defaultdict(list)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []                              # [name, end, index in times[name]]
        for e in evs:
            while stack and e["ts"] >= stack[-1][1]:
                stack.pop()
            if stack:
                parent, _, i = stack[-1]
                times[parent][i] -= e["dur"]
            times[e["name"]].append(e["dur"])
            stack.append((e["name"], e["ts"] + e["dur"], len(times[e["name"]]) - 1))
    return dict(times)


def profile_jbp(model_name, batch, shape, classes, steps, workdir, *, options=None,
                quantity=None):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    import optax  # noqa: PLC0415
    from jbp import models  # noqa: PLC0415
    from jbp.config import ModelConfig  # noqa: PLC0415
    from jbp.train import make_loss  # noqa: PLC0415

    model = models.from_config(ModelConfig(name=model_name, num_classes=classes,
                                           **(options or {})))
    params, state = model.init(jax.random.PRNGKey(0), shape, classes)
    x_np, y_np = _batch(batch, shape, classes)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    optimizer = optax.sgd(0.01, momentum=0.9)
    loss_fn = make_loss(model.apply, "softmax_cross_entropy", grad="manual")

    def step(params, model_state, opt_state, x, y):       # scripts/bench.py's "manual" step
        (loss, (_, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, model_state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    if quantity is not None:     # the quantity and the gradient of one pass (evaluation mode)
        step = bench.quantity_step(f"q-{quantity}", model.apply, optimizer)

    carry = (params, state, optimizer.init(params))
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*carry, x, y).compile()
    kinds = _hlo_kinds(compiled.as_text(), batch)

    def run(n):
        nonlocal carry
        t0 = time.perf_counter()
        for _ in range(n):
            out = compiled(*carry, x, y)        # (params, state, opt_state, loss[, quantity])
            carry, loss = out[:3], out[3]
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / n, float(loss)

    run(5)
    wall, _ = run(steps)
    with jax.profiler.trace(workdir, create_perfetto_trace=True):
        traced_wall, loss = run(steps)
    (path,) = glob.glob(os.path.join(workdir, "plugins", "profile", "*",
                                     "perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        trace = json.load(f)
    events = [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
              if e.get("ph") == "X" and e.get("name") in kinds]
    # Per thunk, the median of its runs times its runs per step: the first traced steps pay
    # the profiler's start-up (measured: up to +60 ms on a 60 ms step), which a mean would keep.
    by_kind, by_op = collections.Counter(), collections.Counter()
    for name, us in _exclusive_times(events).items():
        ms = float(np.median(us)) * len(us) / steps / 1e3
        by_kind[kinds[name]] += ms
        by_op[name] += ms
    return {"wall_ms": 1e3 * wall, "traced_wall_ms": 1e3 * traced_wall, "loss": loss,
            "kinds": dict(by_kind), "events_per_step": len(events) / steps,
            "top_ops": {f"{name} ({kinds[name]})": ms for name, ms in by_op.most_common(15)}}


# ----------------------------------------------------------------------------------- torch --

_TORCH_KINDS = [  # (regex on the aten op name, kind); first match wins
    (r"convolution_backward", "conv input+weight grad"),
    (r"(mkldnn_)?convolution|conv2d|_convolution", "conv forward"),
    (r"batch_norm", "batch norm"),
    (r"relu|threshold_backward|threshold|clamp_min", "ReLU"),
    (r"max_pool|avg_pool|adaptive_avg|mean", "pooling"),
    (r"addmm|linear|mm$|^aten::t$", "dense"),
    (r"copy_|contiguous|clone|to$|_to_copy|empty_like|as_strided|reorder|transpose|permute|"
     r"view|reshape", "reorders/copies"),
    (r"_foreach|sgd|zero_|add_", "optimizer"),
    (r"^(empty|empty_strided|resize_|zeros|ones)$", "allocation"),
]


def profile_torch(model_name, batch, shape, classes, steps, threads):
    import jax  # noqa: PLC0415  (only for the same initial parameters)
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415
    from jbp.models import get_model  # noqa: PLC0415
    from jbp.testing import reference_models  # noqa: PLC0415

    torch.set_num_threads(threads)
    params, state = get_model(model_name).init(jax.random.PRNGKey(0), shape, classes)
    x_np, y_np = _batch(batch, shape, classes)
    module = reference_models.torch_model(model_name, params, state)
    module = module.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    yt = torch.from_numpy(y_np).long()

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(module(xt), yt)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / n, float(loss.detach())

    run(5)
    wall, _ = run(steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        traced_wall, loss = run(steps)
    by_kind, ops = collections.Counter(), collections.Counter()
    for ev in prof.key_averages():
        if not ev.key.startswith("aten::"):
            continue
        ms = ev.self_cpu_time_total / 1e3 / steps
        ops[ev.key] += ms
        kind = next((k for pattern, k in _TORCH_KINDS if re.search(pattern, ev.key[6:])),
                    "loss + other")
        by_kind[kind] += ms
    return {"wall_ms": 1e3 * wall, "traced_wall_ms": 1e3 * traced_wall, "loss": loss,
            "kinds": dict(by_kind), "top_ops": dict(ops.most_common(15)),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------ main --

def table(jbp_side, torch_side) -> str:
    lines = ["| kind | jbp manual ms | PyTorch eager ms |", "|---|---:|---:|"]
    fmt = lambda side, k: "—" if side is None or k not in side["kinds"] \
        else f"{side['kinds'][k]:.2f}"  # noqa: E731
    seen = set((jbp_side or {}).get("kinds", {})) | set((torch_side or {}).get("kinds", {}))
    for k in [k for k in KINDS if k in seen] + sorted(seen - set(KINDS)):
        lines.append(f"| {k} | {fmt(jbp_side, k)} | {fmt(torch_side, k)} |")
    for label, key in (("sum of ops", None), ("wall, profiled", "traced_wall_ms"),
                       ("wall, not profiled", "wall_ms")):
        cells = []
        for side in (jbp_side, torch_side):
            if side is None:
                cells.append("—")
            elif key is None:
                cells.append(f"**{sum(side['kinds'].values()):.2f}**")
            else:
                cells.append(f"{side[key]:.2f}")
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="resnet20_b32", choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=10, help="profiled steps per side")
    p.add_argument("--sides", default="jbp,torch", help="jbp, torch or both (default)")
    p.add_argument("--quantity", default=None,
                   help="jbp side only: profile the step of jbp.quantities.compute with this "
                        "quantity (e.g. batch_l2; the model in evaluation mode) instead of the "
                        "plain train step")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--env", choices=("tuned", "default"), default="tuned",
                   help="tuned: GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as scripts/bench.py")
    p.add_argument("--_torch-child", dest="torch_child", action="store_true",
                   help=argparse.SUPPRESS)
    p.set_defaults(device=None)              # (what bench.maybe_reexec reads: CPU)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps: expected >= 1, got {args.steps}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not sides or set(sides) - {"jbp", "torch"}:
        p.error(f"--sides: expected jbp, torch or both, got {args.sides!r}")
    if args.config in bench.CONFIG_OPTIONS and "torch" in sides:
        p.error(f"--config {args.config}: a jbp-only variant of the model (no PyTorch twin); "
                f"pass --sides jbp")
    bench.maybe_reexec(args)                 # --env tuned: bench.py's environment, re-exec
    model_name, batch, shape, classes = CONFIGS[args.config]
    if args.torch_child:                     # a process of its own: PyTorch's OpenMP runtime
        print(json.dumps(profile_torch(model_name, batch, shape, classes, args.steps,
                                       os.cpu_count())))
        return 0
    torch_side = jbp_side = None
    if "torch" in sides:
        # first, before jbp loads oneDNN in this process (scripts/bench.py says why)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--config", args.config,
                              "--steps", str(args.steps), "--env", args.env, "--_torch-child"],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            print(f"note: the PyTorch side failed: {out.stderr.strip()[-500:]}", file=sys.stderr)
        else:
            torch_side = json.loads(out.stdout.strip().splitlines()[-1])
    if "jbp" in sides:
        with tempfile.TemporaryDirectory() as workdir:
            jbp_side = profile_jbp(model_name, batch, shape, classes, args.steps, workdir,
                                   options=bench.CONFIG_OPTIONS.get(args.config),
                                   quantity=args.quantity)
    print(f"{args.config}: one train step (SGD + momentum), {args.steps} profiled steps per "
          f"side, ms per step")
    print(table(jbp_side, torch_side))
    if jbp_side:
        print("\njbp's largest thunks (ms per step): " + ", ".join(
            f"{k} {v:.2f}" for k, v in jbp_side["top_ops"].items()))
    if torch_side:
        print("\nPyTorch's largest aten ops (self ms per step): " + ", ".join(
            f"{k[6:]} {v:.2f}" for k, v in torch_side["top_ops"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "steps": args.steps, "jbp": jbp_side,
                       "torch": torch_side}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side-by-side train-step benchmark: jbp manual vs jbp autodiff vs plain lax vs PyTorch.

    python scripts/bench.py                 # all models, >= 20 timed steps each (~10 min, 2 cores)
    python scripts/bench.py --quick         # lenet5 b128 and resnet20 b32 (< 2 min)
    python scripts/bench.py --json out.json --device gpu

Every variant trains the *same* network from the *same* parameters on the *same* batch with
SGD + momentum 0.9 (optax; torch.optim.SGD for PyTorch):

    manual         jbp layers, hand-written backward rules      (jbp.manual)
    autodiff       jbp layers' forward, differentiated by JAX   (jbp.autodiff)
    lax_reference  the network in plain lax/jnp + jax.grad      (jbp.testing.reference_models)
    torch          PyTorch eager, channels-last                 (if torch is installed; in a
                   child process of its own, so that its OpenMP runtime is not jbp's oneDNN's)
    torch-compile  the same PyTorch step (forward, backward, SGD step) under torch.compile
                   (Inductor; on request: --variants ...,torch-compile), in a child process of
                   its own; its compile time (the first calls, until no call compiles any
                   more; a fresh Inductor cache unless TORCHINDUCTOR_CACHE_DIR is set) is
                   the "compile s" column, apart from the step time

With ``--contend N``, N CPU spinners (processes of their own, one process group; at the
benchmark's niceness, or ``--contend-nice K``) run beside the
timed steps: every round is timed twice, quiet (spinners stopped with SIGSTOP) and contended
(SIGCONT), so that the machine's slow phases fall on both alike, and each variant's row gets
"slowdown under contention" = contended median ÷ quiet median (the other columns stay quiet).
The spinners are killed on every exit path (and die with the parent: PR_SET_PDEATHSIG).

A JAX step is one jit-compiled call (forward, backward, optimizer update; donated state). Steps
are timed in alternating rounds after warm-up: each round gives every variant one untimed step
(it absorbs the previous variant's spinning threads) and ``--block`` timed ones, and the
variant order rotates every round. The table shows medians with min-max, the ratio of those
medians to jbp manual's, and the paired ratio: the median over rounds of each round's ratio to
manual in the same round (with its range), which cancels the machine's slow phases
(``paired_ratios``). Before timing, the step-0 losses of all
variants must agree (they start from identical numbers), or the run stops.

Columns: compile time and ``compiled.memory_analysis()`` temp bytes (JAX variants); GFLOP/s
counts 3 × the forward's convolution/matmul FLOPs per step (the usual MFU convention), and
"% peak" divides it by a large float32 matmul measured in the same run on the same device.

Environment: with ``--env tuned`` (the default on Linux CPU) the script re-executes itself with
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: XLA:CPU allocates its temp buffer afresh every step,
and transparent huge pages cut the page-fault cost of touching it (docs/performance.md has
the measured effect). The setting applies to every variant alike, torch included; ``--env
default`` runs without it. The jbp library itself sets nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

TUNED_ENV = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
_REEXEC_MARK = "JBP_BENCH_REEXEC"

CONFIGS = {  # name -> (model, batch, input_shape, num_classes)
    "lenet5_b128": ("lenet5", 128, (28, 28, 1), 10),
    "resnet20_b128": ("resnet20", 128, (32, 32, 3), 10),
    "resnet20_b32": ("resnet20", 32, (32, 32, 3), 10),
    "resnet18_b16": ("resnet18", 16, (112, 112, 3), 1000),
    # Inverted-residual networks at ImageNet size (issue 25): no plain-lax twin (lax_reference is
    # skipped for them); the torch variant is torchvision's own model with jbp's weights
    # (jbp.torch_weights.to_torch). Dropout and stochastic depth are off on both sides (jbp's
    # step runs without a key, torchvision's is built with rates 0), so that the step-0 losses
    # can agree.
    "mobilenet_v2_b16": ("mobilenet_v2", 16, (224, 224, 3), 1000),
    "efficientnet_b0_b16": ("efficientnet_b0", 16, (224, 224, 3), 1000),
    "unet": ("unet", 16, (64, 64, 1), 11),          # segmentation: labels per pixel
    # Accelerator sizes (scripts/device_check.sh):
    "lenet5_b1024": ("lenet5", 1024, (28, 28, 1), 10),
    "resnet20_b512": ("resnet20", 512, (32, 32, 3), 10),
    "resnet18_b64": ("resnet18", 64, (224, 224, 3), 1000),
}
QUICK = ("lenet5_b128", "resnet20_b32")
VARIANTS = ("manual", "autodiff", "lax_reference", "torch")
# PyTorch in child processes: eager, and (on request) the same step under torch.compile.
TORCH_VARIANTS = ("torch", "torch-compile")
# Memory policies of jbp's rules (docs/memory.md), on request only: --variants manual,manual-remat
MEMORY_VARIANTS = {"manual-remat": {"remat": "blocks"}, "manual-bf16res": {"residuals": "bf16"},
                   "manual-int8res": {"residuals": "int8"}}
# More out of one backward (jbp.quantities, jbp.train.privacy; docs/quantities.md), on request
# only: --variants manual,q-batch_l2,q-batch_grad,vmap-batch_grad. Each is a whole step (the
# quantity, the gradient from the same pass, the SGD-momentum update); the per-example outputs
# are returned so that XLA keeps them. The model runs in evaluation mode (batch norm would
# couple the examples). On a model with batch norm (mobilenet_v2_b16, resnet20_b32, ...) that is
# another model than the training-mode "manual" step, so EVAL_BASELINE joins them: jbp's plain
# train step (the rules' gradient, SGD-momentum update) with the model in evaluation mode. Their
# step-0 losses are checked against it, and the table's last columns state each row's baseline.
QUANTITY_VARIANTS = {
    "q-batch_l2": "jbp.quantities batch_l2: per-example gradient norms from the rules",
    "q-batch_grad": "jbp.quantities batch_grad: per-example gradients from the rules",
    "q-diag_ggn": "jbp.quantities diag_ggn: C extra backward columns, vmapped",
    "vmap-batch_grad": "jax.vmap(jax.grad) of the autodiff twin, per-example norms from it",
    "dp": "DP-SGD (clip 1, noise 1): norms from the rules, a second backward",
    "dp-vmap": "DP-SGD (clip 1, noise 1) by clipping jax.vmap(jax.grad)'s per-example gradients",
}
# Second-order optimisers (jbp.train.second_order; docs/second_order.md), on request only:
# --variants manual,kfac,gauss_newton. Each is a whole jbp.train.make_train_step step with that
# optimiser, against "manual" (the same step with SGD-momentum): K-FAC refreshes its factors
# every step (a second, evaluation-mode pass with C backward columns) and eigendecomposes every
# 10th, so its median is a refresh step and its mean includes the eigendecompositions;
# Gauss-Newton runs 10 CG iterations on a sub-batch of 32 (two GGN passes each) plus two loss
# evaluations for Levenberg–Marquardt.
SECOND_ORDER_VARIANTS = {
    "kfac": dict(lr=0.01, options={"damping": 1e-3, "refresh_every": 1, "invert_every": 10}),
    "gauss_newton": dict(lr=1.0, options={"damping": 1.0, "cg_iters": 10, "sub_batch": 32}),
}
EVAL_BASELINE = "manual-eval"
EVAL_BASELINE_TEXT = ("jbp's plain train step (hand-written rules, SGD momentum) with the model in "
                      "evaluation mode: batch norm on its running statistics, as the quantity "
                      "variants run it")
# Configurations with model options (no batch norm: train and eval mode are one model).
CONFIGS["resnet20nobn_b32"] = ("resnet20", 32, (32, 32, 3), 10)
CONFIG_OPTIONS = {"resnet20nobn_b32": {"batch_norm": False}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated; default %(default)s; also torch-compile (the "
                        "torch step under torch.compile, Inductor), the memory policies "
                        f"({', '.join(MEMORY_VARIANTS)}) and the per-example quantities "
                        f"({', '.join(QUANTITY_VARIANTS)}) and the second-order optimisers "
                        f"({', '.join(SECOND_ORDER_VARIANTS)})")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (>= 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant after compile")
    p.add_argument("--device", default=None,
                   help="JAX platform to run on (cpu, gpu, tpu; default: JAX's default backend)")
    p.add_argument("--env", choices=("tuned", "default"), default="tuned",
                   help="tuned: set %s for the run (Linux CPU only)" % " ".join(
                       f"{k}={v}" for k, v in TUNED_ENV.items()))
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: the number of CPU cores)")
    p.add_argument("--block", type=int, default=4,
                   help="timed steps per variant per round, after one untimed step (default 4)")
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32",
                   help="bf16: parameters and images cast to bfloat16 inside the step (jbp's "
                        "precision policy, make_train_step(precision=)); the peak matmul is "
                        "measured in the same dtype. The torch variant runs in f32 only")
    p.add_argument("--contend", type=int, default=0, metavar="N",
                   help="time every round also with N CPU spinners running beside it and report "
                        "each variant's slowdown under contention (contended median / quiet "
                        "median); default 0: quiet only")
    p.add_argument("--contend-nice", type=int, default=None, metavar="K",
                   help="the spinners' niceness (default: the benchmark's own). E.g. `nice -n 19 "
                        "bench.py --contend 1 --contend-nice 0`: a benchmark at low priority "
                        "beside other users' jobs, where oneDNN's OpenMP team waits for "
                        "scheduler ticks (docs/xray.md, 'Reading the backward column')")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="the device's datasheet peak in TFLOP/s for --precision's dtype: "
                        "'%% peak' (MFU) divides by it instead of the measured matmul")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.block < 1:
        p.error("--steps and --block must be >= 1, --warmup >= 0")
    if args.contend < 0:
        p.error(f"--contend: expected a number of spinners >= 0, got {args.contend}")
    if args.contend_nice is not None and not (-20 <= args.contend_nice <= 19 and args.contend):
        p.error(f"--contend-nice: expected a niceness in -20..19 with --contend N, got "
                f"{args.contend_nice}")
    names = QUICK if args.quick else tuple(CONFIGS)
    if args.configs:
        names = tuple(c.strip() for c in args.configs.split(",") if c.strip())
        bad = [c for c in names if c not in CONFIGS]
        if bad:
            p.error(f"--configs: unknown {bad}; choose from {', '.join(CONFIGS)}")
    args.config_names = names
    args.variant_names = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    known = (VARIANTS + TORCH_VARIANTS[1:] + tuple(MEMORY_VARIANTS) + tuple(QUANTITY_VARIANTS)
             + tuple(SECOND_ORDER_VARIANTS))
    bad = [v for v in args.variant_names if v not in known]
    if bad or "manual" not in args.variant_names:
        p.error(f"--variants: need 'manual' plus any of "
                f"{', '.join(known)}; got "
                f"{args.variants!r}")
    return args


def maybe_reexec(args):
    """Re-run this process with the tuned environment (glibc reads its tunables at start-up)."""
    if (args.env != "tuned" or platform.system() != "Linux" or os.environ.get(_REEXEC_MARK)
            or (args.device not in (None, "cpu"))):
        return
    env = dict(os.environ, **TUNED_ENV, **{_REEXEC_MARK: "1"})
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable] + sys.argv, env)


# Everything below runs after the (possible) re-exec, so imports come late on purpose.

def main(argv=None):
    args = parse_args(argv)
    maybe_reexec(args)

    import json
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from jbp.testing import reference_models  # noqa: PLC0415
    from jbp.models import get_model
    from jbp.train import init_optimizer, make_loss

    platforms = sorted({d.platform for d in jax.devices()} | {"cpu"})
    device_name = args.device or jax.default_backend()
    if device_name not in platforms:
        sys.exit(f"--device: {device_name!r} is not available here; JAX sees {platforms}")
    device = jax.devices(device_name)[0]

    # PyTorch runs in a process of its own, started before jbp can load oneDNN: the two would
    # otherwise share one libgomp (PyTorch's, loaded first), whose spinning workers then slowed
    # PyTorch up to 2x beside jbp's oneDNN steps, and left oneDNN's workers spinning too
    # (jbp sets OMP_WAIT_POLICY=PASSIVE only for a libgomp it loads itself; docs/onednn.md).
    torch_procs = {}                     # torch variant -> its TorchProcess
    if args.precision == "bf16" and any(v in TORCH_VARIANTS for v in args.variant_names):
        args.variant_names = [v for v in args.variant_names if v not in TORCH_VARIANTS]
        print("note: --precision bf16: skipping the torch variants (they run float32)",
              file=sys.stderr)
    for v in TORCH_VARIANTS:
        if v in args.variant_names:
            proc = TorchProcess(args.threads or os.cpu_count(), device.platform,
                                compiled=v == "torch-compile")
            if proc.error:
                print(f"note: {proc.error}; skipping the {v} variant", file=sys.stderr)
            else:
                torch_procs[v] = proc
    torch_proc = torch_procs.get("torch") or torch_procs.get("torch-compile")   # the header's
    variants = [v for v in args.variant_names if v not in TORCH_VARIANTS or v in torch_procs]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def median_ms(fn, repeats):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times))

    # --- the device's matmul peak in the step's dtype, measured now ------------------------------
    compute_dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    with jax.default_device(device):
        n = 2048 if device.platform == "cpu" else 8192
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(compute_dtype)
        matmul = jax.jit(lambda a: a @ a)
        matmul(a).block_until_ready()
        peak_gflops = 2 * n ** 3 / median_ms(lambda: matmul(a).block_until_ready(), 10) / 1e6
    log(f"{jnp.dtype(compute_dtype).name} matmul peak ({n}³ on {device.device_kind}): "
        f"{peak_gflops:.0f} GFLOP/s")
    measured_peak = peak_gflops
    if args.peak_tflops:
        peak_gflops = 1e3 * args.peak_tflops

    optimizer = optax.sgd(0.01, momentum=0.9)

    def variant_optimizer(variant):
        if variant in SECOND_ORDER_VARIANTS:
            return second_order_optimizer(variant)
        return optimizer

    def jax_step(variant, model_name, apply):
        if variant in SECOND_ORDER_VARIANTS:
            return jax.jit(second_order_step(apply, variant_optimizer(variant)),
                           donate_argnums=(0, 1, 2))
        if variant in QUANTITY_VARIANTS:
            return jax.jit(quantity_step(variant, apply, optimizer), donate_argnums=(0, 1, 2))
        if variant == EVAL_BASELINE:
            loss_fn = make_loss(
                lambda p, s, xx, *, train, layers: apply(p, s, xx, train=False, layers=layers),
                "softmax_cross_entropy", grad="manual", precision=args.precision)
        elif variant == "lax_reference":
            loss_fn = make_loss(reference_models.lax_apply(model_name), reference_models.lax_loss,
                                grad="autodiff", precision=args.precision)
        elif variant in MEMORY_VARIANTS:
            from jbp import models  # noqa: PLC0415
            from jbp.config import ModelConfig  # noqa: PLC0415
            policy = models.from_config(ModelConfig(name=model_name, **MEMORY_VARIANTS[variant]))
            loss_fn = make_loss(policy.apply, "softmax_cross_entropy", grad="manual",
                                precision=args.precision)
        else:
            loss_fn = make_loss(apply, "softmax_cross_entropy", grad=variant,
                                precision=args.precision)

        def step(params, model_state, opt_state, x, y):
            (loss, (_, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), model_state, opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1, 2))

    rows = []

    def write_json():
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(tmp, args.json)

    all_variants = variants
    for cfg_name in args.config_names:
        model_name, batch, shape, classes = CONFIGS[cfg_name]
        variants = [v for v in all_variants
                    if v != "lax_reference" or model_name in reference_models.LAX_MODELS]
        if cfg_name in CONFIG_OPTIONS:     # a model the lax and torch twins do not build
            from jbp import models as _models  # noqa: PLC0415
            from jbp.config import ModelConfig  # noqa: PLC0415
            model = _models.from_config(ModelConfig(name=model_name,
                                                    **CONFIG_OPTIONS[cfg_name]))
            variants = [v for v in variants if v != "lax_reference" and v not in TORCH_VARIANTS
                        and v not in MEMORY_VARIANTS]
        else:
            model = get_model(model_name)
        rng = np.random.default_rng(0)
        x_np = rng.standard_normal((batch, *shape), dtype=np.float32)
        labels_shape = (batch, *shape[:2]) if model_name == "unet" else (batch,)   # per pixel
        y_np = rng.integers(0, classes, labels_shape).astype(np.int32)
        with jax.default_device(device):
            params, state = model.init(jax.random.PRNGKey(0), shape, classes)
            # Batch norm (the model has running statistics): the quantity variants run the
            # model in evaluation mode and are compared with EVAL_BASELINE, added here.
            baseline = "manual"
            if jax.tree.leaves(state) and any(v in QUANTITY_VARIANTS for v in variants):
                baseline = EVAL_BASELINE
                variants = variants + [EVAL_BASELINE]
                log(f"[{cfg_name}] batch norm: the quantity variants run in evaluation mode and "
                    f"are compared with {EVAL_BASELINE}, {EVAL_BASELINE_TEXT}")
            log(f"[{cfg_name}] building {', '.join(variants)}")
            # (a configuration without batch norm has the same convolutions and matmuls)
            flops = 3 * reference_models.forward_flops(
                model_name, *get_model(model_name).init(jax.random.PRNGKey(0), shape, classes),
                jnp.asarray(x_np))
            x, y = jax.device_put(x_np, device), jax.device_put(y_np, device)
            runners, info = {}, {}
            for v in list(variants):
                if v in TORCH_VARIANTS:
                    try:
                        runners[v] = torch_procs[v].build(model_name, params, state, x_np, y_np)
                    except RuntimeError as e:
                        if v == "torch":
                            raise
                        # Inductor failed (no C++ compiler, an unsupported op, ...): say so and
                        # time the others.
                        log(f"[{cfg_name}] note: {e}; skipping {v} for this configuration")
                        variants.remove(v)
                        continue
                    compiled = torch_procs[v].compile_info
                    info[v] = {"compile_s": compiled and compiled["compile_s"],
                               "temp_bytes": None, "torch_compile": compiled}
                    if compiled:
                        log(f"[{cfg_name}] {v}: compiled in {compiled['compile_s']:.1f} s "
                            f"({compiled['calls']} calls until none compiled, "
                            f"{compiled['graphs']} graphs; Inductor cache "
                            f"{compiled['cache_hits']} hits, {compiled['cache_misses']} misses)")
                    continue
                step = jax_step(v, model_name, model.apply)
                carry = [jax.tree.map(jnp.copy, t)
                         for t in (params, state, init_optimizer(
                                 model, variant_optimizer(v), params, state, shape))]
                t0 = time.perf_counter()
                compiled = step.lower(*carry, x, y).compile()
                compile_s = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                temp = int(mem.temp_size_in_bytes) if mem is not None else None
                info[v] = {"compile_s": compile_s, "temp_bytes": temp}

                def run(compiled=compiled, carry=carry):
                    out = compiled(*carry, x, y)
                    carry[:] = out[:3]
                    return out[3].block_until_ready()

                runners[v] = run
                log(f"[{cfg_name}] {v}: compiled in {compile_s:.1f} s, temp "
                    f"{temp / 2**20 if temp is not None else float('nan'):.1f} MiB")

            # Identical starting point => identical step-0 loss (up to float32 rounding).
            # (quantity variants and EVAL_BASELINE: the evaluation-mode model's loss)
            loss0 = {v: float(runners[v]()) for v in variants}
            tol = 1e-4 if args.precision == "f32" else 3e-2      # bf16: 2^-8 per rounding

            def reference(v):
                return loss0[baseline if v in QUANTITY_VARIANTS or v == EVAL_BASELINE
                             else "manual"]
            bad = {v: l for v, l in loss0.items()
                   if not abs(l - reference(v)) <= tol * max(1, abs(reference(v)))}
            if bad:
                sys.exit(f"[{cfg_name}] step-0 losses disagree: {loss0}; the variants are not "
                         f"the same model, so the timings would mean nothing")
            for v in variants:
                for _ in range(args.warmup):
                    runners[v]()
            # Rounds of short blocks: each variant runs one untimed step, then `block` timed
            # ones, and the variant order rotates every round. The untimed step absorbs what
            # the previous variant leaves behind: PyTorch's OpenMP workers spin for a while
            # after each op, and on a 2-core machine the step right after a torch step ran on
            # about half the CPU (LeNet-5 manual: 7.2 ms alone, 7-16 ms bimodal after torch).
            times = {v: [] for v in variants}
            round_medians = {v: [] for v in variants}
            contended = {v: [] for v in variants}          # --contend: the contended rounds
            rounds = -(-args.steps // args.block)

            def timed_round(r, times, round_medians):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for v in order:
                    runners[v]()
                    n = min(args.block, args.steps - len(times[v]))
                    block = (torch_procs[v].timed(n) if v in torch_procs
                             else _timed(runners[v], n))
                    times[v] += block
                    round_medians[v].append(float(np.median(block)))

            # Quiet and contended rounds interleave (round r quiet, then round r with the
            # spinners running): a slow phase of the machine then falls on both alike. The
            # spinners are stopped, not killed, between rounds: no start-up inside a round.
            with Contention(args.contend, args.contend_nice) as spinners:
                for r in range(rounds):
                    timed_round(r, times, round_medians)
                    msg = ", ".join(f"{v} {np.median(times[v]):.1f} ms" for v in variants)
                    if args.contend:
                        spinners.run()
                        timed_round(r, contended, {v: [] for v in variants})
                        spinners.pause()
                        msg += f"; with {args.contend} spinners: " + ", ".join(
                            f"{v} {np.median(contended[v]):.1f} ms" for v in variants)
                    log(f"[{cfg_name}] round {r + 1}/{rounds}: {msg}")

        manual_ms = float(np.median(times["manual"]))
        for v in variants:
            med = float(np.median(times[v]))
            paired = paired_ratios(round_medians[v], round_medians["manual"])
            # the plain train step a quantity variant is compared with (EVAL_BASELINE on a
            # batch-norm model, else manual itself)
            base = baseline if v in QUANTITY_VARIANTS else "manual"
            base_paired = paired_ratios(round_medians[v], round_medians[base])
            gflops = flops / med / 1e6
            rows.append({
                "model": model_name, "batch": batch, "variant": v,
                "precision": args.precision if v not in TORCH_VARIANTS else "f32",
                "input_shape": list(shape), "device": device.device_kind,
                "step_ms_median": med, "step_ms_min": float(np.min(times[v])),
                "step_ms_max": float(np.max(times[v])), "steps": args.steps,
                "ratio_to_manual": med / manual_ms,
                "ratio_to_manual_paired": float(np.median(paired)),
                "ratio_paired_min": min(paired), "ratio_paired_max": max(paired),
                "compile_s": info[v]["compile_s"], "temp_bytes": info[v]["temp_bytes"],
                "gflops": gflops, "peak_fraction": gflops / peak_gflops,
                "images_per_s": batch / med * 1e3, "loss0": loss0[v],
                "conv_backend": _conv_backend(v, device.platform),
                "baseline": base, "ratio_to_baseline": med / float(np.median(times[base])),
                "ratio_to_baseline_paired": float(np.median(base_paired)),
            })
            if info[v].get("torch_compile"):       # calls, graphs, Inductor cache hits
                rows[-1]["torch_compile"] = info[v]["torch_compile"]
            if args.contend:
                rows[-1].update(contend=args.contend,
                                step_ms_median_contended=float(np.median(contended[v])),
                                slowdown_contended=float(np.median(contended[v])) / med)
            if v == "manual" and rows[-1]["conv_backend"].startswith("onednn"):
                # oneDNN's scratch lives outside XLA's buffers (not in temp_bytes): the bytes
                # held after this config, the largest need of any config so far.
                from jbp import cpu_conv  # noqa: PLC0415
                rows[-1]["onednn_scratch_bytes"] = cpu_conv.scratch_bytes()
        write_json()
        variants = all_variants

    print(_header(jax, torch_proc, device, peak_gflops, args, measured_peak))
    print(table(rows))
    if any(r["variant"] == EVAL_BASELINE for r in rows):
        print(f"\n{EVAL_BASELINE}: {EVAL_BASELINE_TEXT}. On a batch-norm model the quantity "
              f"variants (and {EVAL_BASELINE}) run the model in evaluation mode; their "
              f"'baseline' column names the step they are compared with, 'manual' trains in "
              f"training mode (batch statistics).")
    if args.json:
        print(f"\nwrote {len(rows)} rows to {args.json}")


def second_order_optimizer(variant):
    """The optax transformation of a :data:`SECOND_ORDER_VARIANTS` variant."""
    from jbp.train import make_optimizer  # noqa: PLC0415
    spec = SECOND_ORDER_VARIANTS[variant]
    return make_optimizer(variant, spec["lr"], momentum=0.9,
                          second_order_options=spec["options"])


def second_order_step(apply, optimizer):
    """``(params, model_state, opt_state, x, y) -> (params, model_state, opt_state, loss)``:
    jbp.train.make_train_step's step with a second-order optimiser (it hands the optimiser the
    curvature closures), inside the benchmark's carry convention."""
    import jax  # noqa: PLC0415

    from jbp.train import TrainState, make_train_step  # noqa: PLC0415
    train_step = make_train_step(apply, optimizer, donate=False, check_finite=False)
    rng = jax.random.key(0)

    def step(params, model_state, opt_state, x, y):
        state = TrainState(params, model_state, opt_state, opt_state_count(opt_state), rng)
        state, metrics = train_step(state, x, y)
        return state.params, state.model_state, state.opt_state, metrics["loss"]

    return step


def opt_state_count(opt_state):
    """The step count a second-order optimiser's state carries (its first ``count`` leaf)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, "count"))
              if hasattr(s, "count")]
    return counts[0] if counts else jnp.zeros((), jnp.int32)


def quantity_step(variant, apply, optimizer):
    """One step of a :data:`QUANTITY_VARIANTS` variant: ``(params, model_state, opt_state, x,
    y) -> (params, model_state, opt_state, loss, per-example output)``."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import optax  # noqa: PLC0415

    import jbp  # noqa: PLC0415
    from jbp import quantities  # noqa: PLC0415
    from jbp.policy import LayerPolicy  # noqa: PLC0415
    from jbp.train import privacy  # noqa: PLC0415

    def vmap_grads(params, model_state, x, y):
        def ell(p, xn, yn):
            logits, _ = apply(p, model_state, xn[None], train=False,
                              layers=LayerPolicy("autodiff"))
            return jbp.autodiff.softmax_cross_entropy(logits, yn[None])
        losses, grads = jax.vmap(jax.value_and_grad(ell), (None, 0, 0))(params, x, y)
        norms = jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(x.shape[0], -1)), 1)
                             for g in jax.tree.leaves(grads)))
        return jnp.mean(losses), grads, norms

    def gradient(params, model_state, x, y):
        if variant.startswith("q-"):
            name = variant[2:]
            out = quantities.compute(apply, params, model_state, x, y, quantities=(name,))
            return out["loss"], out["grad"], out[name]
        if variant == "vmap-batch_grad":
            loss, grads, norms = vmap_grads(params, model_state, x, y)
            return loss, jax.tree.map(lambda g: jnp.mean(g, 0), grads), norms
        key = jax.random.PRNGKey(1)
        if variant == "dp":
            loss, _, _, grads, stats = privacy.clipped_gradient(
                lambda p, s, xx, *, train, layers: apply(p, s, xx, train=False, layers=layers),
                lambda logits, labels: jbp.softmax_cross_entropy(logits, labels,
                                                                 reduction="none"),
                LayerPolicy(), params, model_state, x, y, clip_norm=1.0, noise_multiplier=1.0,
                key=key)
            return loss, grads, stats["per_example_norms"]
        loss, grads, norms = vmap_grads(params, model_state, x, y)        # dp-vmap
        scale = jnp.minimum(1.0, 1.0 / norms)
        leaves, tree = jax.tree.flatten(grads)
        keys = jax.random.split(key, len(leaves))
        noisy = [(jnp.tensordot(scale, g, 1) + jax.random.normal(k, g.shape[1:], g.dtype))
                 / x.shape[0] for g, k in zip(leaves, keys)]
        return loss, jax.tree.unflatten(tree, noisy), norms

    def step(params, model_state, opt_state, x, y):
        loss, grads, per_example = gradient(params, model_state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss, per_example

    return step


def _conv_backend(variant: str, platform: str) -> str:
    """The convolution kernels a variant's step ran on. Only jbp's manual rule takes oneDNN
    (float32 on CPU, JBP_CONV_BACKEND / jbp.set_conv_backend; docs/onednn.md), the memory-policy
    variants (manual-remat, ...) included; jbp autodiff
    and the lax reference differentiate XLA's convolution."""
    if variant == "torch":
        return "torch"
    if variant == "torch-compile":
        return "torch inductor"
    if not (variant.startswith(("manual", "q-")) or variant == "dp") or platform != "cpu":
        return "xla"
    from jbp import cpu_conv  # noqa: PLC0415
    return cpu_conv.describe()


def paired_ratios(variant_rounds, manual_rounds):
    """Per-round ratios: each round's median step of a variant over manual's in the same round.

    The two blocks of a round run seconds apart, so a slow phase of the machine (this VM's
    step times drift by 10-20% over a minute) hits both and cancels in their ratio; the ratio
    of whole-run medians does not cancel it when the phases fall unevenly on the variants. The
    table reports the median of these ratios and their range beside the ratio of medians."""
    if len(variant_rounds) != len(manual_rounds):
        raise ValueError(f"{len(variant_rounds)} rounds against {len(manual_rounds)} for manual")
    return [v / m for v, m in zip(variant_rounds, manual_rounds)]


class Contention:
    """``n`` CPU spinners beside the timed steps (``--contend``), as a context manager.

    The spinners are Python busy loops (``while True: pass``) in one process group of their own
    (the first spinner's); they start stopped (SIGSTOP) and :meth:`run` / :meth:`pause` send the
    group SIGCONT / SIGSTOP. ``__exit__`` kills the group (SIGKILL) and reaps every spinner, on
    any exit of the ``with`` block: an exception, KeyboardInterrupt, ``sys.exit``. Each spinner
    also asks the kernel to kill it when its parent dies (``prctl(PR_SET_PDEATHSIG)``, Linux),
    so that not even a SIGKILL of the benchmark leaves one spinning. ``n = 0`` does nothing."""

    MARK = "jbp-bench-spinner"        # in each spinner's command line (tests look for it)
    SPIN = ("import ctypes, os, signal, sys\n"
            "try:\n"
            "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG\n"
            "except (OSError, AttributeError):\n"
            "    pass\n"
            "if os.getppid() != int(sys.argv[2]):             # the parent died already\n"
            "    sys.exit()\n"
            "if sys.argv[3]:                                  # --contend-nice\n"
            "    try:\n"
            "        os.setpriority(os.PRIO_PROCESS, 0, int(sys.argv[3]))\n"
            "    except PermissionError:\n"
            "        sys.exit(3)\n"
            "os.kill(os.getpid(), signal.SIGSTOP)             # start paused\n"
            "while True:\n"
            "    pass\n")

    NICE_DENIED = 3                   # a spinner's exit status: it may not take that niceness

    def __init__(self, n: int, nice=None):
        self.n, self.nice = n, nice
        self.procs = []
        self.pgid = None

    def __enter__(self):
        import subprocess  # noqa: PLC0415
        try:
            for _ in range(self.n):
                # The first spinner leads a new process group (same session); the others join
                # it, so that one signal reaches them all.
                p = subprocess.Popen([sys.executable, "-c", self.SPIN, self.MARK,
                                      str(os.getpid()),
                                      "" if self.nice is None else str(self.nice)],
                                     stdin=subprocess.DEVNULL,
                                     process_group=0 if self.pgid is None else self.pgid)
                self.procs.append(p)
                self.pgid = self.pgid or p.pid
            for p in self.procs:                        # wait until each has stopped itself
                while p.poll() is None and _proc_state(p.pid) not in ("T", "t"):
                    time.sleep(0.01)
                if p.returncode == self.NICE_DENIED:
                    raise RuntimeError(
                        f"--contend-nice {self.nice}: the spinners may not run at a lower "
                        f"niceness than this process ({os.nice(0)}) without privileges; run "
                        f"the benchmark itself under nice instead")
                if p.poll() is not None:
                    raise RuntimeError(f"--contend: a spinner exited at start (exit status "
                                       f"{p.returncode}); no contention to measure")
        except BaseException:
            self.close()
            raise
        return self

    def _signal(self, sig):
        if self.pgid is not None:
            os.killpg(self.pgid, sig)

    def run(self):
        import signal  # noqa: PLC0415
        self._signal(signal.SIGCONT)

    def pause(self):
        import signal  # noqa: PLC0415
        self._signal(signal.SIGSTOP)

    def close(self):
        import signal  # noqa: PLC0415
        try:
            self._signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in self.procs:
            p.kill()                                    # (no-op for a dead one)
            p.wait()
        self.procs, self.pgid = [], None

    def __exit__(self, *exc):
        self.close()
        return False


def _proc_state(pid):
    """The state letter of ``pid`` from /proc (R, S, T, Z, ...); None for no such process, and
    ``"T"`` where there is no /proc (callers then do not wait for the letter)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None if os.path.isdir("/proc") else "T"


def _timed(run, n):
    """``n`` calls of ``run``, each timed (ms)."""
    block = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        block.append(1e3 * (time.perf_counter() - t0))
    return block


class TorchProcess:
    """A PyTorch variant in a child process, driven round by round over a pipe.

    ``build`` sends it a model's parameters and batch and returns a callable for one untimed
    step (it returns the loss); ``timed(n)`` runs ``n`` steps there and returns the times the
    child measured itself (ms), so no pipe latency is counted. ``compiled=True``: the step runs
    under ``torch.compile`` (the torch-compile variant); ``build`` then compiles it and sets
    ``compile_info`` (``compile_s``: the wall time of the calls that compiled, ``calls``,
    ``graphs``, Inductor's ``cache_hits`` / ``cache_misses``), else ``compile_info`` is None."""

    def __init__(self, threads: int, platform: str, compiled: bool = False):
        import multiprocessing  # noqa: PLC0415
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.compile_info = None
        cache = None
        if compiled and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
            # A fresh Inductor cache for this run: its compile time is then a first compile,
            # as JAX's is (no persistent compilation cache); TORCHINDUCTOR_CACHE_DIR keeps one.
            import atexit  # noqa: PLC0415
            import shutil  # noqa: PLC0415
            import tempfile  # noqa: PLC0415
            cache = tempfile.mkdtemp(prefix="jbp-bench-inductor-")
            atexit.register(shutil.rmtree, cache, ignore_errors=True)
        self._proc = ctx.Process(target=_torch_worker,
                                 args=(child, threads, platform, compiled, cache), daemon=True)
        self._proc.start()
        child.close()
        reply = self._conn.recv()
        self.error = reply.get("error")
        self.version, self.threads = reply.get("version"), reply.get("threads")

    def _ask(self, *msg):
        self._conn.send(msg)
        reply = self._conn.recv()
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def build(self, model_name, params, state, x_np, y_np):
        import jax  # noqa: PLC0415
        import numpy as np  # noqa: PLC0415
        to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
        self.compile_info = self._ask("build", model_name, to_np(params), to_np(state), x_np,
                                      y_np)
        return lambda: self._ask("step")

    def timed(self, n):
        return self._ask("timed", n)


def _torch_worker(conn, threads, platform, compiled=False, inductor_cache=None):
    """Child side of :class:`TorchProcess`: PyTorch eager (or ``compiled``: torch.compile,
    Inductor's caches in ``inductor_cache`` where given), channels-last, SGD + momentum."""
    if inductor_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache      # read when torch loads
    try:
        import torch  # noqa: PLC0415
        from jbp.testing import reference_models  # noqa: PLC0415
    except ImportError as e:
        conn.send({"error": f"torch is not installed ({e})"})
        return
    device = "cpu" if platform == "cpu" else ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        conn.send({"error": f"this torch cannot run on {platform}"})
        return
    if compiled:
        missing = _inductor_missing(torch, device)
        if missing:
            conn.send({"error": missing})
            return
    torch.set_num_threads(threads)
    conn.send({"version": torch.__version__, "threads": torch.get_num_threads()})
    run = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        try:
            if msg[0] == "build":
                run, compile_info = _torch_runner(torch, device, reference_models, *msg[1:],
                                                  compiled=compiled)
                conn.send(compile_info)
            elif msg[0] == "step":
                conn.send(run())
            else:
                conn.send(_timed(run, msg[1]))
        except Exception as e:  # noqa: BLE001  (reported in the parent)
            name = "torch-compile" if compiled else "torch"
            text = str(e).strip().splitlines()
            conn.send(RuntimeError(f"{name} variant: {type(e).__name__}: "
                                   f"{text[0] if text else ''}"[:500]))


def _inductor_missing(torch, device):
    """Why torch.compile's Inductor cannot compile here (a sentence), or None. On CPU it
    compiles C++: it needs the compiler torch._inductor.config names ($CXX, else g++)."""
    import shutil  # noqa: PLC0415
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device == "cpu":
        from torch._inductor import config as inductor_config  # noqa: PLC0415
        names = [c for c in inductor_config.cpp.cxx if c] or ["g++"]
        if not any(shutil.which(c) for c in names):
            return (f"torch.compile (Inductor, CPU) needs a C++ compiler: none of "
                    f"{', '.join(names)} is on PATH (set CXX or install g++)")
    else:
        import importlib.util  # noqa: PLC0415
        if importlib.util.find_spec("triton") is None:
            return "torch.compile (Inductor, GPU) needs triton, which is not installed"
    return None


def _compile_events(torch):
    """A number that grows whenever torch.compile compiles something (graphs captured by
    Dynamo, forward and backward graphs compiled by Inductor): its private timing record,
    else Dynamo's graph counter."""
    try:
        from torch._dynamo.utils import compilation_time_metrics  # noqa: PLC0415
        return sum(len(v) for v in compilation_time_metrics.values())
    except ImportError:
        from torch._dynamo.utils import counters  # noqa: PLC0415
        return counters["stats"]["unique_graphs"]


def _torch_runner(torch, device, reference_models, model_name, params, state, x_np, y_np, *,
                  compiled=False):
    """``(run, compile_info)``: ``run()`` runs one PyTorch training step of ``model_name`` from
    ``params``/``state`` on the batch (eager, channels-last, SGD + momentum 0.9) and returns the
    loss. ``compiled``: the step (zero_grad, forward, backward, optimizer step) runs under
    ``torch.compile``; it is compiled here, by calling it until a call compiles nothing (the
    optimizer's momentum buffers appear at the first step and recompile its update at the
    second), and the model and optimizer are then put back to ``params``/``state`` and empty
    momentum (zero buffers: SGD's first update ``buf = g`` equals ``0.9·0 + g``), so that
    ``run()``'s first loss is step 0's like the eager variant's. ``compile_info`` is None
    (eager) or the dict :class:`TorchProcess` documents."""
    import torch.nn.functional as F  # noqa: PLC0415
    module = reference_models.torch_model(model_name, params, state).to(device)
    module = module.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    xt = torch.from_numpy(x_np).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).to(device)
    yt = torch.from_numpy(y_np).long().to(device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(module(xt), yt)
        loss.backward()
        opt.step()
        return loss.detach()

    if not compiled:
        return (lambda: float(step().cpu())), None         # .cpu() synchronises on GPU

    import logging  # noqa: PLC0415
    from torch._dynamo.utils import counters  # noqa: PLC0415
    torch._logging.set_logs(dynamo=logging.ERROR)  # (zero_grad's profiler note, every config)
    step = torch.compile(step)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    compile_s, calls = 0.0, 0
    for _ in range(8):
        before = _compile_events(torch)
        t0 = time.perf_counter()
        float(step().cpu())
        dt = time.perf_counter() - t0
        if _compile_events(torch) == before:                 # this call compiled nothing
            break
        compile_s, calls = compile_s + dt, calls + 1
    with torch.no_grad():
        for k, v in module.state_dict().items():             # (views of the live tensors)
            v.copy_(saved[k])
        for s in opt.state.values():
            if s.get("momentum_buffer") is not None:
                s["momentum_buffer"].zero_()
    info = {"compile_s": compile_s, "calls": calls,
            "graphs": counters["stats"]["unique_graphs"],
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"],
            "cache_misses": counters["inductor"]["fxgraph_cache_miss"]}
    return (lambda: float(step().cpu())), info


def _header(jax, torch, device, peak, args, measured_peak=None):
    lines = [f"jax {jax.__version__} on {device.platform} ({device.device_kind}), "
             f"{os.cpu_count()} CPU cores"]
    if torch is not None:
        lines.append(f"torch {torch.version}, {torch.threads} threads, channels-last, "
                     f"in its own process (each torch variant)")
    env = " ".join(f"{k}={os.environ[k]}" for k in ("GLIBC_TUNABLES", "XLA_FLAGS")
                   if os.environ.get(k))
    source = (f"datasheet peak {peak:.0f} GFLOP/s (--peak-tflops; measured matmul "
              f"{measured_peak:.0f})" if args.peak_tflops else f"matmul peak {peak:.0f} GFLOP/s")
    lines.append(f"environment: {env or '(none set)'}; precision {args.precision}, {source}; "
                 f"{args.steps} timed steps per variant in alternating rounds of {args.block} "
                 f"(+1 untimed), after {args.warmup} warm-up steps")
    if getattr(args, "contend", 0):
        nice = args.contend_nice if args.contend_nice is not None else os.nice(0)
        lines.append(f"contention: every round timed quiet and again with {args.contend} CPU "
                     f"spinner(s) running at nice {nice} (this process: nice {os.nice(0)}); "
                     f"slowdown = contended median / quiet median")
    return "\n".join(lines) + "\n"


def table(rows) -> str:
    """Markdown table of benchmark rows."""
    head = ("| model | batch | variant | precision | step ms median | min–max | × manual "
            "| paired × (range) | compile s | temp MiB | GFLOP/s | % peak | img/s | conv kernels "
            "| baseline | paired × baseline |")
    sep = "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|"
    contended = any("slowdown_contended" in r for r in rows)
    if contended:                     # --contend: one more column, at the end
        head += " slowdown under contention |"
        sep += "---:|"
    out = [head, sep]
    for r in rows:
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        temp = "" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
        out.append(
            f"| {r['model']} | {r['batch']} | {r['variant']} | {r.get('precision', 'f32')} "
            f"| {r['step_ms_median']:.2f} "
            f"| {r['step_ms_min']:.1f}–{r['step_ms_max']:.1f} | {r['ratio_to_manual']:.2f} "
            f"| {r['ratio_to_manual_paired']:.3f} ({r['ratio_paired_min']:.2f}–"
            f"{r['ratio_paired_max']:.2f}) | {compile_s} | {temp} | {r['gflops']:.1f} "
            f"| {100 * r['peak_fraction']:.1f} | {r['images_per_s']:.0f} "
            f"| {r.get('conv_backend', '')} | {r.get('baseline', 'manual')} "
            f"| {r.get('ratio_to_baseline_paired', r['ratio_to_manual_paired']):.3f} |"
            + (f" {r['slowdown_contended']:.2f} |" if contended and "slowdown_contended" in r
               else " |" if contended else ""))
    return "\n".join(out)


if __name__ == "__main__":
    main()

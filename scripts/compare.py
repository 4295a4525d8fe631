"""Manual vs automatic gradients on one model, one batch, one training run.

    python scripts/compare.py --config configs/lenet_mnist.toml --steps 200
    python scripts/compare.py --config configs/resnet20_mnist.toml --steps 200 --out runs/cmp

1. Step 0: the gradient of the training loss on the first batch, from jbp's hand-written rules
   and from JAX (jbp.autodiff), per parameter leaf: each one's error against float64 (below).
2. Then both train K steps from the same initial state on the same batches (two runs of
   jbp.train.fit, in OUT/manual and OUT/autodiff; K is at most the config's train.epochs); prints
   the per-step loss divergence |manual − autodiff| / |autodiff| and writes an overlay plot
   (compare.png).

The output directory (default runs/<name>-compare, numbered -2, -3, ... when taken) is claimed as
scripts/train.py claims a run directory: --out into one that holds a comparison stops with an
error unless --overwrite.

Exits 1 if the step-0 gradient fails the float32 verdict (jbp.accuracy): each of the two float32
gradients is measured against the float64 gradient of the same batch, on the same side of every
ReLU and max pool as its own forward, and manual passes a leaf when its error is within 8x
autodiff's own error plus 16 ulps. Both errors are printed per leaf: how far each float32 result
is from the truth, not how far the two are from each other (which depends on the CPU and the
convolution algorithm: two correct gradients differ by up to 1e-2 on ResNet-20's leaves at
initialisation, where batch norm cancels). A wrong rule (a weight gradient off by 1e-3, a tap
dropped) fails (tests/test_accuracy.py). --rtol N judges the plain manual-vs-autodiff max rel
error instead.

--x64 runs both in float64: the rules are then compared at ~1e-12 instead of float32 rounding,
which shows how much of any divergence over many steps is float32 rounding amplified by training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from jbp import config as config_lib
from jbp import accuracy, checkpoint, cpu_conv, data, gradcheck, models, report, train

GRADS = ("manual", "autodiff")
FILES = ("compare.json", "compare.png")


def comparison_files(out):
    """What a comparison left in ``out``: its own files and the two training runs."""
    found = [n for n in FILES if os.path.isfile(os.path.join(out, n))]
    return found + [f"{g}/{n}" for g in GRADS for n in checkpoint.run_files(os.path.join(out, g))]


def clear_comparison(out):
    for name in FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.unlink(os.path.join(out, name))
    for g in GRADS:
        checkpoint.clear_run(os.path.join(out, g))
        if os.path.isdir(os.path.join(out, g)) and not os.listdir(os.path.join(out, g)):
            os.rmdir(os.path.join(out, g))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="TOML config, e.g. configs/lenet_mnist.toml")
    parser.add_argument("--steps", type=int, default=200,
                        help="training steps to compare (default: 200)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.train_limit=640 "
                             "(repeatable; TOML values, as in scripts/train.py)")
    parser.add_argument("--rtol", type=float, default=None,
                        help="judge step 0 by this max rel error of manual against autodiff "
                             "per leaf instead of the float32 verdict against float64 (default "
                             "with --x64: 1e-9)")
    parser.add_argument("--out", help="directory for compare.json, compare.png and the two runs "
                        "(default runs/<name>-compare, numbered -2, -3, ... when taken)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the comparison already in the output directory first")
    parser.add_argument("--x64", action="store_true", help="params, state and data in float64")
    args = parser.parse_args(argv)
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    try:
        cfg = config_lib.load(args.config, args.set)
        train_set, _ = data.load_dataset(cfg.data, cfg.model.num_classes)
    except (config_lib.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    default = os.path.join("runs", f"{cfg.name}-compare")
    out = args.out or (default if args.overwrite else
                       train.run_dir.unused(default, comparison_files))
    try:
        train.run_dir.claim(out, overwrite=args.overwrite, run_files=comparison_files,
                            clear=clear_comparison, resumable=False)
        model = models.from_config(cfg.model)
    except (train.RunDirError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out != (args.out or default):
        print(f"{default} holds a comparison already; this one goes to {out}")

    tc = cfg.train
    steps_per_epoch = data.num_batches(train_set, tc.batch_size, train=True)
    optimizer = train.optimizer_from_config(cfg.optim, tc.epochs * steps_per_epoch)
    key = jax.random.key(tc.seed)
    shape = train_set.x.shape[1:]
    dtype = np.float64 if args.x64 else np.float32

    states = {g: train.init_train_state(model, optimizer, key, shape, cfg.model.num_classes,
                                        dtype=dtype if args.x64 else None) for g in GRADS}

    # --- 1. step-0 gradients (the first batch fit trains on) ------------------------------
    x0, y0 = next(data.batches(train_set, tc.batch_size, seed=tc.seed, epoch=0,
                               augment_shift=cfg.data.augment_shift, mean=cfg.data.mean,
                               std=cfg.data.std))
    x0 = x0.astype(dtype)
    backend = cpu_conv.describe()
    detail = f"{cfg.model.name}, step 0, batch {tc.batch_size}, {np.dtype(dtype).name}"
    if args.rtol is None and args.x64:
        args.rtol = 1e-9
    if args.rtol is None:      # float32: each gradient against float64 (jbp.accuracy)
        check, *sides = accuracy.check_model(model.apply, states["manual"].params,
                                             states["manual"].model_state, x0, y0,
                                             detail=detail)
        loss0 = [float(s.loss) for s in sides]
        step0 = [{"leaf": r.name, "error": r.error, "autodiff_error": r.autodiff_error,
                  "bound": r.bound} for r in check.rows]
    else:
        grads = [train.make_grad_fn(model.apply, grad=g)(states[g].params,
                                                          states[g].model_state, x0, y0)
                 for g in GRADS]
        loss0 = [float(value) for value, _ in grads]
        check = gradcheck.compare("manual", "autodiff", *(jax.tree.leaves(g) for _, g in grads),
                                  train.leaf_names(grads[0][1]), rtol=args.rtol, atol=0.0,
                                  detail=detail)
        step0 = [{"leaf": a.name, "max_abs": a.max_abs, "max_rel": a.max_rel,
                  "cosine": a.cosine} for a in check.args]
    print(f"{cfg.name}: {cfg.model.name} in {np.dtype(dtype).name}, step-0 gradients on one "
          f"batch of {tc.batch_size}, convolutions: {backend} "
          f"(loss manual {loss0[0]:.6f}, autodiff {loss0[1]:.6f})")
    print(str(check).replace("\n", "\n  "))
    print(f"  step 0: {'ok' if check.ok else 'FAIL'}\n")

    # --- 2. K training steps each, same batches: a run of jbp.train.fit per gradient ---------
    losses = {g: [] for g in states}
    start = time.perf_counter()
    for g in GRADS:
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(tc, grad=g, log_every=1))
        train.fit(run_cfg, os.path.join(out, g), max_steps=args.steps,
                  dtype=dtype if args.x64 else None,
                  verbose=False, on_metrics=lambda r, g=g: r["kind"] == "train"
                  and losses[g].append(r["loss"]))
        states[g] = checkpoint.restore_latest(os.path.join(out, g), states[g])[0]
    losses = {g: np.asarray(v, np.float64) for g, v in losses.items()}
    args.steps = len(losses["manual"])            # fewer if the config's epochs end first
    divergence = np.abs(losses["manual"] - losses["autodiff"]) / np.abs(losses["autodiff"])
    print(f"{args.steps} training steps each ({time.perf_counter() - start:.1f} s, convolutions: "
          f"{backend}), loss divergence |manual − autodiff| / |autodiff|:")
    print(f"  {'step':>6} {'manual':>12} {'autodiff':>12} {'divergence':>11}")
    marks = sorted(set(np.linspace(0, args.steps - 1, min(args.steps, 11)).astype(int)))
    for i in marks:
        print(f"  {i:>6} {losses['manual'][i]:>12.6f} {losses['autodiff'][i]:>12.6f} "
              f"{divergence[i]:>11.2e}")
    worst = int(np.argmax(divergence))
    final = gradcheck.compare("manual", "autodiff", jax.tree.leaves(states["manual"].params),
                              jax.tree.leaves(states["autodiff"].params),
                              train.leaf_names(states["manual"].params), rtol=1.0, atol=1.0)
    print(f"  max divergence {divergence[worst]:.2e} at step {worst}; final parameters differ by "
          f"max rel {final.max_rel:.2e}")

    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"config": args.config, "model": cfg.model.name, "steps": args.steps,
                   "dtype": np.dtype(dtype).name,
                   "conv_backend": backend, "step0": step0, "step0_ok": check.ok,
                   "step0_rtol": args.rtol,
                   "loss_manual": losses["manual"].tolist(),
                   "loss_autodiff": losses["autodiff"].tolist(),
                   "max_loss_divergence": float(divergence[worst])}, f)
    png = report.plot_overlay({g: losses[g] for g in losses}, os.path.join(out, "compare.png"),
                              f"{cfg.name}: manual vs autodiff gradients",
                              diff_of=("manual", "autodiff"))
    print(f"wrote {os.path.join(out, 'compare.json')}" + (f" and {png}" if png else ""))
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())

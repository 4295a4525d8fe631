"""Gradient diagnostics of a run from jbp's per-example quantities: per-layer gradient
signal-to-noise and the distribution of per-example gradient norms, checkpoint by checkpoint.

    python scripts/diagnostics.py runs/lenet_mnist-manual            # -> RUN/diagnostics.png
    python scripts/diagnostics.py RUN --batch 256

For each ckpt-*.npz in RUN the model is restored and, on one fixed batch (the first training
batch of the run's data), ``jbp.quantities.compute(..., quantities=("batch_l2", "variance"))``
gives in one forward and one backward (evaluation mode):

- per parameter array, the gradient signal-to-noise ratio ``SNR = Σ ḡ² / Σ Var_n(∇ℓ_n)``
  (``ḡ`` the batch-mean gradient, sums over the array's elements): above 1 the mean gradient
  dominates the spread between examples, far below 1 a step follows noise;
- every example's gradient norm ``‖∇ℓ_n‖`` over all parameters (from ``batch_l2``, without
  forming per-example gradients), whose histogram shows the clipping a DP-SGD ``clip_norm``
  would do.

Writes RUN/diagnostics.json and a PNG (SNR per layer against the step; histograms of the
per-example norms at the first, middle and last checkpoint). The plot needs the [plots] extra.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jbp import checkpoint, quantities, train
from jbp.train import run_dir as run_dirs


def diagnose(apply, params, model_state, x, y) -> dict:
    """SNR per parameter array (by its path) and per-example gradient norms on one batch."""
    out = quantities.compute(apply, params, model_state, x, y,
                             quantities=("batch_l2", "variance"))
    names = train.leaf_names(params)
    grads = jax.tree.leaves(out["grad"])
    variances = jax.tree.leaves(out["variance"])
    snr = {name: float(jnp.sum(g ** 2) / jnp.maximum(jnp.sum(v), 1e-30))
           for name, g, v in zip(names, grads, variances)}
    n = x.shape[0]
    norms = n * jnp.sqrt(sum(jax.tree.leaves(out["batch_l2"])))    # ‖∇ℓ_n‖ (batch_l2: /N)
    return {"loss": float(out["loss"]), "snr": snr, "norms": np.asarray(norms).tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory written by scripts/train.py")
    parser.add_argument("--batch", type=int, default=128, help="examples in the fixed batch")
    parser.add_argument("--out", help="PNG path (default RUN/diagnostics.png)")
    args = parser.parse_args(argv)
    try:
        run = run_dirs.finished_run(args.run, args.batch)
    except train.RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, model, x, y, like, paths = run
    points = []
    for path in paths:
        state, _ = checkpoint.restore(path, like)
        point = {"step": int(state.step), "checkpoint": os.path.basename(path),
                 **diagnose(model.apply, state.params, state.model_state, x, y)}
        points.append(point)
        norms = np.asarray(point["norms"])
        print(f"step {point['step']:>6}: loss {point['loss']:.4f}  per-example ‖∇ℓ‖ median "
              f"{np.median(norms):.3g} (max {norms.max():.3g})  SNR "
              + " ".join(f"{k}={v:.2g}" for k, v in point["snr"].items()), flush=True)
    with open(os.path.join(args.run, "diagnostics.json"), "w") as f:
        json.dump({"batch": int(x.shape[0]), "points": points}, f, indent=1)
    png = _plot(points, args.out or os.path.join(args.run, "diagnostics.png"), args.run)
    if png:
        print(f"wrote {png}")
    return 0


def _plot(points, path, title):
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [p["step"] for p in points]
    for name in points[0]["snr"]:
        left.plot(steps, [p["snr"][name] for p in points], "o-", ms=3, label=name)
    left.set_yscale("log")
    left.set_xlabel("step")
    left.set_ylabel("gradient SNR  Σ ḡ² / Σ Var_n(∇ℓ_n)")
    left.legend(fontsize=6, ncol=2)
    chosen = sorted({0, len(points) // 2, len(points) - 1})
    # log-spaced bins: a trained network's norms span orders of magnitude (a few examples it
    # still gets wrong carry most of the gradient)
    every = np.concatenate([np.asarray(points[i]["norms"]) for i in chosen])
    positive = every[every > 0]
    lo, hi = (positive.min(), positive.max()) if positive.size else (1e-8, 1.0)
    bins = np.geomspace(lo, hi * 1.0001 if hi > lo else lo * 10, 31)
    for i in chosen:
        right.hist(np.clip(points[i]["norms"], lo, None), bins=bins, alpha=0.5,
                   label=f"step {points[i]['step']}")
    right.set_xscale("log")
    right.set_xlabel("per-example gradient norm ‖∇ℓ_n‖")
    right.set_ylabel("examples")
    right.legend(fontsize=8)
    fig.suptitle(f"gradient diagnostics: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

"""Sharpness (top Hessian eigenvalue of the train loss) of every saved checkpoint of a run.

    python scripts/curvature.py runs/lenet_mnist-manual                 # -> RUN/curvature.png
    python scripts/curvature.py RUN --batch 256 --iters 30 --trace 20

For each ckpt-*.npz in RUN (scripts/train.py keeps the newest train.keep_checkpoints; raise it,
or --every, to see more of the trajectory) the model is restored and, on one fixed batch (the
first training batch of the run's data), the top eigenvalue λ_max of the Hessian of the
train-mode loss is found by power iteration through jbp's rules (jbp.curvature), optionally
with Hutchinson's trace estimate. Writes RUN/curvature.json and a plot of λ_max against the step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax  # noqa: E402

from jbp import checkpoint, curvature, train  # noqa: E402
from jbp.train import run_dir as run_dirs  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory written by scripts/train.py")
    parser.add_argument("--batch", type=int, default=128, help="examples in the fixed batch")
    parser.add_argument("--iters", type=int, default=50, help="power iterations (max)")
    parser.add_argument("--trace", type=int, default=0, metavar="S",
                        help="also estimate tr H with S Hutchinson samples")
    parser.add_argument("--out", help="PNG path (default RUN/curvature.png)")
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
        loss = curvature.train_loss(model.apply, state.model_state, x, y)
        lam, _ = curvature.top_eigenvalue(loss, state.params, key=jax.random.key(0),
                                          iters=args.iters, tol=1e-4)
        point = {"step": int(state.step), "checkpoint": os.path.basename(path),
                 "loss": float(loss(state.params)), "lambda_max": lam}
        if args.trace:
            point["trace"], point["trace_stderr"] = curvature.hutchinson_trace(
                loss, state.params, key=jax.random.key(1), samples=args.trace)
        points.append(point)
        print(f"step {point['step']:>6}: loss {point['loss']:.4f}  λ_max {lam:.4g}"
              + (f"  tr H {point['trace']:.4g} ± {point['trace_stderr']:.2g}" if args.trace
                 else ""), flush=True)
    with open(os.path.join(args.run, "curvature.json"), "w") as f:
        json.dump({"batch": int(x.shape[0]), "points": points}, f, indent=1)
    png = _plot(points, args.out or os.path.join(args.run, "curvature.png"), args.run)
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
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in points], [p["lambda_max"] for p in points], "o-")
    ax.set_xlabel("step")
    ax.set_ylabel("λ_max of the train-loss Hessian")
    ax.set_title(f"sharpness: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())

"""Per-layer gradient norms over a training run, as a PNG: watch gradients vanish or explode.

    python scripts/plot_gradients.py runs/lenet_mnist-manual        # -> runs/.../gradients.png

Reads the "grad_norms" that scripts/train.py logs every train.log_every steps to metrics.jsonl
(one L2 norm per parameter leaf) and draws one line per weight (kernels and dense matrices; add
--all for biases and batch-norm parameters), on a log scale.

    python scripts/plot_gradients.py --compare configs/resnet20_mnist.toml \
        configs/plain20_mnist.toml configs/plain20_nobn_mnist.toml --steps 100 --out flow.png

trains each config briefly (jbp.train.fit for --steps steps of its own optimiser, in a temporary
run directory; nothing is kept but the picture and a JSON beside it) and draws, side by side, ‖∂L/∂W‖ of every weight against
its depth at a few steps: gradients vanishing toward the input show as a line falling to the left.
"""

from __future__ import annotations

import argparse
import os
import sys

from jbp import report


def _depth_order(names):
    """Weights in forward order: stem/conv1 first, then blocks[i] conv1, conv2 (projections
    right after their block's conv2), dense layers last."""
    import re  # noqa: PLC0415

    def key(n):
        m = re.search(r"\['blocks'\]\[(\d+)\]\['(\w+)'\]", n)
        if m:
            return (1, int(m.group(1)), {"conv1": 0, "conv2": 1}.get(m.group(2), 2))
        if "stem" in n:
            return (0, 0, 0)
        return (2 if "fc" in n else 0, 0, n)
    return sorted(names, key=key)


def compare(configs, steps, out, batch=None, points=4):
    """Train each config ``steps`` steps; per-weight gradient norms at ``points`` steps."""
    import dataclasses  # noqa: PLC0415
    import json  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from jbp import config as config_lib  # noqa: PLC0415
    from jbp import train  # noqa: PLC0415
    record_at = sorted({0, *np.linspace(0, steps - 1, points).astype(int).tolist()})
    results = {}
    for path in configs:
        cfg = config_lib.load(path, [f"train.batch_size={batch}"] if batch else [])
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=1))
        records = []                      # the first steps of the configured schedule
        with tempfile.TemporaryDirectory() as run:
            train.fit(cfg, os.path.join(run, cfg.name), max_steps=steps, verbose=False,
                      on_metrics=lambda r: r["kind"] == "train" and records.append(r))
        weights = _depth_order([n for n in records[0]["grad_norms"] if n.endswith("['w']")])
        series = {r["step"] - 1: [r["grad_norms"][n] for n in weights] for r in records
                  if r["step"] - 1 in record_at}
        losses = [r["loss"] for r in records]
        results[cfg.name] = {"weights": weights, "norms": {str(k): v for k, v in series.items()},
                             "loss_first": losses[0], "loss_last": float(np.mean(losses[-10:]))}
        print(f"{cfg.name}: loss {losses[0]:.3f} -> {results[cfg.name]['loss_last']:.3f}; "
              f"‖∂L/∂W‖ first/last weight at step 0: {series[0][0]:.3e} / {series[0][-1]:.3e}")
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"steps": steps, "results": results}, f, indent=1)
    plt = report.matplotlib_or_none()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), sharey=True)
    for ax, (name, r) in zip(np.atleast_1d(axes), results.items()):
        for k, ys in r["norms"].items():
            ax.semilogy(range(1, len(ys) + 1), ys, "o-", ms=3, label=f"step {k}")
        ax.set(title=f"{name}\nloss {r['loss_first']:.2f} → {r['loss_last']:.2f}",
               xlabel="weight layer (input → output)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    np.atleast_1d(axes)[0].set_ylabel("‖∂L/∂W‖₂")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--compare":
        cmp = argparse.ArgumentParser(description="train configs briefly, compare gradient flow")
        cmp.add_argument("--compare", nargs="+", required=True, metavar="CONFIG")
        cmp.add_argument("--steps", type=int, default=100)
        cmp.add_argument("--batch", type=int, help="override train.batch_size")
        cmp.add_argument("--out", default="gradient_flow.png")
        a = cmp.parse_args(argv)
        png = compare(a.compare, a.steps, a.out, a.batch)
        print(f"wrote {png or 'no picture (matplotlib missing)'} and "
              f"{os.path.splitext(a.out)[0]}.json")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="run directory written by scripts/train.py")
    parser.add_argument("--all", action="store_true", help="every leaf, not only weights")
    parser.add_argument("--out", help="PNG path (default RUN/gradients.png)")
    args = parser.parse_args(argv)
    path = os.path.join(args.run, "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"error: {path}: no such file (is {args.run} a run directory?)", file=sys.stderr)
        return 2
    records = [r for r in report.read_jsonl(path) if r.get("kind") == "train" and
               "grad_norms" in r]
    if not records:
        print(f"error: {path}: no gradient norms logged", file=sys.stderr)
        return 2
    names = [n for n in records[0]["grad_norms"] if args.all or n.endswith("['w']")]
    series = {n: [r["grad_norms"][n] for r in records] for n in names}
    steps = [r["step"] for r in records]
    png = report.plot_gradient_norms(steps, series, args.out or os.path.join(args.run,
                                                                          "gradients.png"),
                                     title=f"gradient norm per layer: {args.run}")
    first, last = records[0], records[-1]
    print(f"{len(names)} layers, {len(records)} points (steps {steps[0]}..{steps[-1]})")
    for n in names:
        print(f"  {n:<40} {first['grad_norms'][n]:>10.3e} -> {last['grad_norms'][n]:>10.3e}")
    if png:
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

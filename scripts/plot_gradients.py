"""Per-layer gradient norms over a training run, as a PNG: watch gradients vanish or explode.

    python scripts/plot_gradients.py runs/lenet_mnist-manual        # -> runs/.../gradients.png

Reads the "grad_norms" that scripts/train.py logs every train.log_every steps to metrics.jsonl
(one L2 norm per parameter leaf) and draws one line per weight (kernels and dense matrices; add
--all for biases and batch-norm parameters), on a log scale.

    python scripts/plot_gradients.py --compare configs/resnet20_mnist.toml \
        configs/plain20_mnist.toml configs/plain20_nobn_mnist.toml --steps 100 --out flow.png

trains each config briefly (--steps steps of its own optimiser, in this process, nothing written
but the picture and a JSON beside it) and draws, side by side, ‖∂L/∂W‖ of every weight against
its depth at a few steps: gradients vanishing toward the input show as a line falling to the left.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jbp import report  # noqa: E402


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
    import json  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jbp import config as config_lib  # noqa: PLC0415
    from jbp import data, models, train  # noqa: PLC0415
    record_at = sorted({0, *np.linspace(0, steps - 1, points).astype(int).tolist()})
    results = {}
    for path in configs:
        cfg = config_lib.load(path, [f"train.batch_size={batch}"] if batch else [])
        tc = cfg.train
        train_set, _ = data.load_dataset(cfg.data, cfg.model.num_classes)
        model = models.from_config(cfg.model)
        optimizer = train.optimizer_from_config(cfg.optim, steps)
        state = train.init_train_state(model, optimizer, jax.random.key(tc.seed),
                                       train_set.x.shape[1:], cfg.model.num_classes)
        names = train.leaf_names(state.params)
        weights = _depth_order([n for n in names if n.endswith("['w']")])
        step = train.make_train_step(model.apply, optimizer, grad=tc.grad)
        series, losses, done, epoch = {}, [], 0, 0
        while done < steps:
            for x, y in data.batches(train_set, tc.batch_size, mean=cfg.data.mean,
                                     std=cfg.data.std, seed=tc.seed, epoch=epoch,
                                     augment_shift=cfg.data.augment_shift):
                state, metrics = step(state, x, y)
                if done in record_at:
                    norms = dict(zip(names, np.asarray(metrics["leaf_norms"]).tolist()))
                    series[done] = [norms[n] for n in weights]
                losses.append(float(metrics["loss"]))
                done += 1
                if done >= steps:
                    break
            epoch += 1
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

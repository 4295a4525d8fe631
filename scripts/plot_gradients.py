"""Per-layer gradient norms over a training run, as a PNG: watch gradients vanish or explode.

    python scripts/plot_gradients.py runs/lenet_mnist-manual        # -> runs/.../gradients.png

Reads the "grad_norms" that scripts/train.py logs every train.log_every steps to metrics.jsonl
(one L2 norm per parameter leaf) and draws one line per weight (kernels and dense matrices; add
--all for biases and batch-norm parameters), on a log scale.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jbp import report  # noqa: E402


def main(argv=None) -> int:
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

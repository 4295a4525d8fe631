"""Does second order pay? K-FAC, damped Gauss-Newton, Adam and SGD + momentum on the shipped
MNIST (jbp.train.optimizer_study; docs/second_order.md).

    python scripts/second_order.py                                   # the full study
    nice -n 19 python scripts/second_order.py --models lenet5 --steps 300 --sweep 2 \
        --eval-every 50 --test-limit 2000 --out runs/second_order-short

Writes OUT/second_order.json (every run's curve), OUT/second_order.png (test accuracy of each
optimiser's best setting against steps and wall time) and prints a Markdown table: steps and
training seconds to 98.5% and 99% test accuracy, final accuracy, median ms per step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    from jbp.train import optimizer_study  # noqa: PLC0415
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet5,resnet20",
                   help=f"comma-separated subset of {','.join(optimizer_study.CONFIGS)}")
    p.add_argument("--optimizers", default=",".join(optimizer_study.OPTIMIZERS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--steps", type=int, default=2000, help="steps per run (default %(default)s)")
    p.add_argument("--sweep", type=int, default=2,
                   help="settings per optimiser, the first N of its list (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (default: all 60,000)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="evaluate on the first N test images (default: all 10,000)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="stop a run once its training time (compilation and evaluation "
                        "excluded) passes SECONDS, even before --steps (default: no limit)")
    p.add_argument("--out", default="runs/second_order")
    p.add_argument("--replot", default=None, metavar="JSON[,JSON...]",
                   help="train nothing: read the rows of earlier runs' second_order.json "
                        "files (e.g. one per model), write them together to OUT (one table, "
                        "one PNG)")
    args = p.parse_args(argv)
    split = lambda text: tuple(s.strip() for s in text.split(",") if s.strip())  # noqa: E731
    if args.replot:
        rows = []
        for path in split(args.replot):
            try:
                with open(path) as f:
                    rows += json.load(f)
            except (OSError, ValueError) as e:
                print(f"error: --replot: cannot read {path}: {e}", file=sys.stderr)
                return 2
        os.makedirs(args.out, exist_ok=True)
        optimizer_study.write(rows, args.out)
    else:
        try:
            rows = optimizer_study.run(
                models_=split(args.models), optimizers=split(args.optimizers),
                steps=args.steps, sweep=args.sweep, eval_every=args.eval_every,
                batch_size=args.batch_size, train_limit=args.train_limit,
                test_limit=args.test_limit, out=args.out, root=ROOT,
                time_budget=args.time_budget)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(optimizer_study.table(rows))
    print(f"\nwrote {os.path.join(args.out, 'second_order.json')} and second_order.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

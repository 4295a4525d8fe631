"""X-ray a model: every layer call of its forward on a real batch, jbp's rule beside JAX's autodiff.

    python scripts/xray.py --config configs/resnet20_mnist.toml --batch 128 \\
        --json xray.json --png xray.png

Prints a markdown table (one row per layer call: shapes, parameters, FLOPs, bytes saved for the
backward by jbp's rule and by JAX's autodiff, forward/backward ms of both, backward/forward
ratio, ‖∂L/∂W‖, ‖∂L/∂a‖, manual-vs-autodiff gradient error) and the totals. The model is the
config's, freshly initialised with train.seed; the batch is the
first training batch of the config's data. ``model.residuals`` in the config (or --residuals)
selects the residual policy of the rules measured. See jbp/xray.py for what each column means.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax  # noqa: E402

from jbp import LayerPolicy, config as config_lib  # noqa: E402
from jbp import data, models, xray  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="TOML config (model and data)")
    parser.add_argument("--batch", type=int, help="batch size (default train.batch_size)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--residuals", choices=models.RESIDUALS,
                        help="residual policy of the measured rules (overrides model.residuals)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per layer (median); "
                        "0 skips timing")
    parser.add_argument("--json", help="write rows and totals as JSON here")
    parser.add_argument("--png", help="write the picture here")
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"model.residuals={args.residuals}"] if args.residuals
                                  else [])
    try:
        cfg = config_lib.load(args.config, overrides)
        train_set, _ = data.load_dataset(cfg.data, cfg.model.num_classes)
        # The policy is measured through `nn` below; the X-ray records calls eagerly (no remat).
        model = models.from_config(dataclasses.replace(cfg.model, residuals="exact",
                                                       remat="none"))
    except (config_lib.ConfigError, data.DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    batch = args.batch or cfg.train.batch_size
    if batch < 1 or batch > train_set.num_examples:
        print(f"error: --batch: expected 1..{train_set.num_examples}, got {batch}",
              file=sys.stderr)
        return 2
    x, y = next(data.batches(train_set, batch, mean=cfg.data.mean, std=cfg.data.std,
                             seed=cfg.train.seed))
    params, state = model.init(jax.random.key(cfg.train.seed), x.shape[1:],
                               cfg.model.num_classes)
    nn = LayerPolicy("manual", cfg.model.residuals)
    print(f"{cfg.name}: {cfg.model.name}, batch {batch}, residuals {cfg.model.residuals}, "
          f"{args.repeats} timed runs per layer", file=sys.stderr)
    # What the conv rows ran on: oneDNN's OpenMP team waits for a descheduled thread on a busy
    # machine (docs/xray.md, "Reading the backward column").
    from jbp import cpu_conv  # noqa: PLC0415
    print(f"conv kernels: {cpu_conv.describe()}; OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', '(unset: all cores)')}", file=sys.stderr)
    report = xray.xray(model.apply, params, state, x, y, repeats=args.repeats, manual=nn,
                       progress=lambda p: print(f"  {p}", file=sys.stderr, flush=True))
    print(xray.markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "model": cfg.model.name, "batch": batch,
                       "residuals": cfg.model.residuals, "rows": report.rows,
                       "totals": report.totals}, f, indent=1)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.png:
        title = f"{cfg.model.name}, batch {batch}: time, residuals, gradient norms per call"
        if xray.plot(report, args.png, title):
            print(f"wrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

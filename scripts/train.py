"""Train a jbp model from a config: the command line of :func:`jbp.train.fit`.

    python scripts/train.py                                   # configs/lenet_mnist.toml
    python scripts/train.py --config configs/resnet20_mnist.toml --grad autodiff
    python scripts/train.py --set optim.lr=0.1 --set train.epochs=5 --out runs/quick
    python scripts/train.py --resume runs/quick               # continue where it stopped

A run gets a directory of its own: by default runs/<config name>-<grad>, or runs/<...>-2, -3, ...
when that one holds a run already (it says which). --out DIR into a directory that holds a run
stops with an error offering --resume, another --out and --overwrite (which deletes the old run
first); nothing is mixed or deleted otherwise. What a run directory holds: jbp/train/loop.py.

Ctrl-C (SIGINT) or SIGTERM finishes the current step (or evaluation, or checkpoint write), writes
a checkpoint and exits 0 with the command that resumes (bit-identically); before the first step has
finished there is nothing to resume: one line, status 130 (SIGINT) or 143 (SIGTERM), nothing left
behind (jbp.train.StopRequest). Exit status 1: a non-finite loss or gradient; 2: a usage error.
"""

import argparse
import os
import signal
import sys


def _stop_while_importing(signum, _frame):      # jbp.train.StopRequest takes over in main()
    os.write(2, f"{signal.Signals(signum).name}: stopped during start-up (imports), before the "
                f"first training step finished; nothing to resume.\n".encode())
    os._exit(128 + signum)


if __name__ == "__main__":      # before the imports: Ctrl-C while JAX loads is clean too
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, _stop_while_importing)
    _test, _, _phase = os.environ.get("JBP_TEST_SIGNAL", "").partition("@")   # tests only
    if _phase == "import":
        os.kill(os.getpid(), signal.Signals[_test])

from jbp import checkpoint, config as config_lib, data, parallel, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a jbp model from a TOML config.")
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "lenet_mnist.toml"),
                        help="TOML config (default: configs/lenet_mnist.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    parser.add_argument("--grad", choices=["manual", "autodiff"],
                        help="gradients from jbp's hand-written rules or from JAX (overrides "
                             "train.grad)")
    parser.add_argument("--out", help="run directory (default runs/<name>-<grad>, numbered -2, "
                        "-3, ... when taken); a new run refuses a directory that holds one")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its newest good checkpoint")
    where.add_argument("--overwrite", action="store_true",
                       help="delete the run already in the run directory, then start afresh")
    parser.add_argument("--every", type=int, metavar="N",
                        help="checkpoint every N steps (overrides train.checkpoint_every)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = train.StopRequest()
    stop.reached("data")
    # Several processes (scripts/launch.py, or a cluster JAX detects): join them before any
    # device is touched. Only process 0 writes to the run directory.
    parallel.initialize_distributed()
    overrides = list(args.set) + ([f"train.grad={args.grad}"] if args.grad else [])
    overrides += [f"train.checkpoint_every={args.every}"] if args.every else []
    try:
        if args.resume:
            cfg, out = train.load_config(args.resume, overrides), args.resume
        else:
            cfg = config_lib.load(args.config, overrides)
            default = os.path.join("runs", f"{cfg.name}-{cfg.train.grad}")
            out = args.out or (default if args.overwrite else train.run_dir.unused(default))
            if out != (args.out or default) and parallel.is_main_process():
                print(f"{default} holds a run already (continue it with --resume {default}); "
                      f"this one goes to {out}")
        result = train.fit(cfg, out, resume=bool(args.resume), overwrite=args.overwrite,
                           stop=stop)
    except (config_lib.ConfigError, data.DataError, checkpoint.CheckpointError,
            train.FitError, train.RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except train.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["status"] == "stopped":
        print(f"Resume with: python scripts/train.py --resume {out}", flush=True)
    elif result["status"] == "already finished":
        print(f"A new run of this config gets a directory of its own: python scripts/train.py "
              f"--config {os.path.join(out, 'config.toml')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a jbp model from a config: progress bar, evaluation each epoch, metrics, summary, plot.

    python scripts/train.py                                   # configs/lenet_mnist.toml
    python scripts/train.py --config configs/resnet20_mnist.toml --grad autodiff
    python scripts/train.py --set optim.lr=0.1 --set train.epochs=5 --out runs/quick
    python scripts/train.py --resume runs/quick               # continue where it stopped

Ctrl-C (SIGINT) or SIGTERM finishes the current step (or evaluation, or checkpoint write), writes
a checkpoint and exits 0 with the command that resumes; before the first step has finished there is
nothing to resume, and it exits at once with one line and status 130 (SIGINT) or 143 (SIGTERM). A
crash loses only the steps since the last checkpoint. Resuming replays the same data order, so the
result is bit-identical to an uninterrupted run on the same machine.

A new run never shares a directory with another: if the run directory already holds a run, it
stops with an error that offers --resume, --out and --overwrite (which deletes the old run first).

Writes to the run directory (default runs/<config name>-<grad>):
    config.toml     the resolved config (file + overrides); --resume reads it back
    ckpt-*.npz      checkpoints every train.checkpoint_every steps and at each epoch end
    metrics.jsonl   one JSON object per line: "train" every train.log_every steps, "eval" per epoch
    summary.json    final test accuracy, throughput, wall time
    curves.png      loss and accuracy curves (needs matplotlib: the [plots] extra)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time


class StopRequest:
    """SIGINT/SIGTERM at any moment, without a traceback.

    Until the first training step has finished (imports, data, compilation, the first step)
    there is nothing to resume: the signal prints one line, removes the files this start created
    and exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM) at once. Python runs
    signal handlers only between bytecodes of the main thread, so a thread also watches a wake-up
    fd that the C-level handler writes: that ends a stop requested while XLA compiles.

    Once a step has finished, the signal only sets ``signal``: the loop finishes the step, the
    evaluation or the checkpoint write in progress, writes a checkpoint and exits 0.

    ``JBP_TEST_SIGNAL=SIGINT@phase`` (tests only) makes the script signal itself on reaching
    ``phase``: import, data, compile (from another thread, as XLA starts compiling the train
    step), first-step, eval, checkpoint.
    """

    def __init__(self):
        self.signal = None
        self.started = False        # a step has finished: a stop writes a checkpoint
        self.phase = "start-up"
        self.cleanup = []           # files (then directories) this start created
        self._lock = threading.Lock()
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        test = os.environ.get("JBP_TEST_SIGNAL", "")
        self._test_signal, _, self._test_phase = test.partition("@")

    def _handle(self, signum, _frame):
        if not self.started:
            self._exit_early(signum)
        self.signal = self.signal or signal.Signals(signum).name

    def _watch(self, fd):
        while True:
            for signum in os.read(fd, 64):
                if not self.started:
                    self._exit_early(signum)

    def _exit_early(self, signum):
        with self._lock:                # the handler and the watcher may both get here
            for path in self.cleanup:
                try:
                    os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
                except OSError:
                    pass
            name = signal.Signals(signum).name
            os.write(2, f"{name}: stopped during {self.phase}, before the first training step "
                        f"finished; nothing to resume.\n".encode())
            os._exit(128 + signum)

    def reached(self, phase):
        """Mark a phase; the test hook signals here (for "compile": while XLA compiles)."""
        if phase != self._test_phase:
            return
        signum = signal.Signals[self._test_signal]
        if phase == "compile":
            import jax  # noqa: PLC0415
            fired = []

            def after_lowering(event, _duration, **_kw):
                if event.endswith("jaxpr_to_mlir_module_duration") and not fired:
                    fired.append(event)     # XLA's backend compile starts next: the signal
                    # comes from another thread while the main thread enters it
                    threading.Thread(target=os.kill, args=(os.getpid(), signum)).start()
            jax.monitoring.register_event_duration_secs_listener(after_lowering)
        else:
            os.kill(os.getpid(), signum)


if __name__ == "__main__":
    STOP = StopRequest()                # before the imports: Ctrl-C while JAX loads is clean too
    STOP.phase = "start-up (imports)"
    STOP.reached("import")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jbp import LayerPolicy, checkpoint  # noqa: E402
from jbp import config as config_lib  # noqa: E402
from jbp import data, parallel, report, train  # noqa: E402
from jbp import models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "lenet_mnist.toml")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Train a jbp model from a TOML config.")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="TOML config (default: "
                        "configs/lenet_mnist.toml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=0.1 (repeatable)")
    parser.add_argument("--grad", choices=["manual", "autodiff"],
                        help="gradients from jbp's hand-written rules or from JAX (overrides "
                             "train.grad)")
    parser.add_argument("--out", help="run directory (default runs/<name>-<grad>); a new run "
                        "refuses a directory that holds one")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the run in RUN_DIR from its newest good checkpoint")
    where.add_argument("--overwrite", action="store_true",
                       help="delete the run already in the run directory, then start afresh")
    parser.add_argument("--every", type=int, metavar="N",
                        help="checkpoint every N steps (overrides train.checkpoint_every)")
    return parser.parse_args(argv)


def progress(total: int, desc: str):
    """A tqdm bar on a terminal; nothing when output is redirected (epoch lines still print)."""
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def report_non_finite(out, metrics, names, train_set, tc, epoch, batch, step) -> int:
    """Stop on a NaN/Inf loss or gradient: name the step and the first bad leaf, save the batch's
    example indices. The state was not updated and no checkpoint is written, so the newest
    checkpoint is the last good one."""
    leaf_finite = np.asarray(metrics["leaf_finite"])
    bad = [n for n, ok in zip(names, leaf_finite) if not ok]
    order = data.epoch_order(train_set.num_examples, seed=tc.seed, epoch=epoch, shuffle=True)
    indices = order[batch * tc.batch_size:(batch + 1) * tc.batch_size]
    path = os.path.join(out, "nonfinite_batch.json")
    with open(path, "w") as f:
        json.dump({"step": step, "epoch": epoch, "batch": batch, "loss": float(metrics["loss"]),
                   "nonfinite_leaves": bad, "example_indices": indices.tolist()}, f)
    where = f"first non-finite gradient in parameter {bad[0]}" if bad else "the loss is non-finite"
    print(f"error: non-finite loss or gradient at step {step} (epoch {epoch + 1}, batch {batch}): "
          f"{where}. The update was not applied; the newest checkpoint in {out} is the last good "
          f"state. The batch's example indices are in {path}.", file=sys.stderr)
    return 1


def claim_run_directory(out: str, overwrite: bool, stop) -> str | None:
    """A new run gets a directory of its own: None, or the error if ``out`` holds another run.

    Two runs never share a directory: its checkpoints, metrics and summary would mix, and
    ``--resume`` would continue whichever checkpoint has the highest step.
    """
    existing = checkpoint.run_files(out)
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        return (f"{out} already holds a run ({shown}). Continue it with --resume {out}, start "
                f"this one elsewhere with --out runs/NEW_NAME, or delete the old run and start "
                f"afresh with --overwrite")
    if existing:
        checkpoint.clear_run(out)
        print(f"--overwrite: deleted the previous run in {out} ({len(existing)} files)")
    if not os.path.isdir(out):
        os.makedirs(out)
        stop.cleanup.append(out)
    return None


def data_parallel_mesh(tc):
    """The ``"data"`` mesh for ``train.data_parallel="auto"`` on more than one device, ``None``
    for one device or ``"off"``, or an error message (a batch that does not divide)."""
    if tc.data_parallel == "off" or jax.device_count() == 1:
        return None
    mesh = parallel.data_mesh()
    if tc.batch_size % mesh.size:
        return (f"train.batch_size={tc.batch_size} does not divide over the {mesh.size} devices "
                f"JAX sees ({jax.process_count()} process(es)); use a multiple of {mesh.size}, "
                f"or --set train.data_parallel=off")
    return mesh


def describe_devices(mesh) -> str:
    if mesh is None:
        return ""
    return f", data parallel over {mesh.size} devices in {jax.process_count()} process(es)"


def main(argv=None) -> int:
    args = parse_args(argv)
    stop = globals().get("STOP") or StopRequest()
    stop.phase = "start-up (loading data)"
    stop.reached("data")
    # Several processes (scripts/launch.py, or a cluster JAX detects): join them before any
    # device is touched. Only process 0 writes to the run directory.
    parallel.initialize_distributed()
    main_process = parallel.is_main_process()
    overrides = list(args.set) + ([f"train.grad={args.grad}"] if args.grad else [])
    overrides += [f"train.checkpoint_every={args.every}"] if args.every else []
    try:
        if args.resume:
            if not os.path.isfile(os.path.join(args.resume, "config.toml")):
                raise config_lib.ConfigError(f"{args.resume}: not a run directory (no "
                                             f"config.toml); nothing to resume")
            cfg = config_lib.load(os.path.join(args.resume, "config.toml"), overrides)
        else:
            cfg = config_lib.load(args.config, overrides)
        train_set, test_set = data.load_dataset(cfg.data, cfg.model.num_classes)
    except (config_lib.ConfigError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = args.resume or args.out or os.path.join("runs", f"{cfg.name}-{cfg.train.grad}")
    if not args.resume and main_process:
        error = claim_run_directory(out, args.overwrite, stop)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        stop.cleanup.insert(0, os.path.join(out, "config.toml"))
    config_text = config_lib.to_toml(cfg)
    if main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.toml"), "w") as f:
            f.write(config_text)

    # --- model, optimiser, jitted steps ---
    tc = cfg.train
    input_shape = train_set.x.shape[1:]
    steps_per_epoch = data.num_batches(train_set, tc.batch_size, train=True)
    if steps_per_epoch == 0:
        print(f"error: {train_set.num_examples} training examples is fewer than one batch of "
              f"{tc.batch_size}", file=sys.stderr)
        return 2
    total_steps = tc.epochs * steps_per_epoch
    try:
        model = models.from_config(cfg.model)
        layers = LayerPolicy(tc.grad, residuals=cfg.model.residuals)
    except ValueError as e:                        # an option this model does not have
        print(f"error: {e}", file=sys.stderr)
        return 2
    optimizer = train.optimizer_from_config(cfg.optim, total_steps)
    state = train.init_train_state(model, optimizer, jax.random.key(tc.seed), input_shape,
                                   cfg.model.num_classes)
    position = {"epoch": 0, "batch": 0}             # the next batch to train on
    if args.resume:
        try:
            state, manifest, path = checkpoint.restore_latest(out, state)
        except checkpoint.CheckpointError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        position = manifest["position"]
        print(f"resuming from {path}: step {int(state.step)}, epoch {position['epoch'] + 1}, "
              f"batch {position['batch']}")
        if position["epoch"] >= tc.epochs:
            print(f"{out}: the run already finished all {tc.epochs} epochs; nothing to do")
            return 0
    mesh = data_parallel_mesh(tc)
    if isinstance(mesh, str):
        print(f"error: {mesh}", file=sys.stderr)
        return 2
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    train_step = train.make_train_step(model.apply, optimizer, grad=layers,
                                       check_finite=tc.check_finite, mesh=mesh,
                                       precision=tc.precision)
    eval_step = train.make_eval_step(model.apply, grad=layers)
    names = train.leaf_names(state.params)

    def save(epoch, batch):
        stop.reached("checkpoint")
        if not main_process:
            return os.path.join(out, "(process 0 writes the checkpoint)")
        return checkpoint.save(out, parallel.local_view(state),
                               position={"epoch": epoch, "batch": batch},
                               config=config_text, keep=tc.keep_checkpoints)

    def stopped(path):
        print(f"{stop.signal}: stopped after step {int(state.step)}, checkpoint {path}. "
              f"Resume with: python scripts/train.py --resume {out}", flush=True)
        return 0
    print(f"{cfg.name}: {cfg.model.name} ({train.tree_size(state.params):,} parameters), "
          f"{tc.grad} gradients, {train_set.num_examples:,} train / {test_set.num_examples:,} "
          f"test images {input_shape}, {tc.epochs} epochs x {steps_per_epoch} steps of "
          f"{tc.batch_size}, on {jax.default_backend()}{describe_devices(mesh)} -> {out}",
          flush=True)

    # --- training loop ---
    norm = dict(mean=cfg.data.mean, std=cfg.data.std)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if not args.resume and main_process:
        open(metrics_path, "w").close()
        stop.cleanup.insert(0, metrics_path)
    stop.phase = "compilation and the first step"
    stop.reached("compile")
    start = time.perf_counter()
    train_time, images, result = 0.0, 0, {}
    with open(metrics_path if main_process else os.devnull, "a") as log:
        for epoch in range(position["epoch"], tc.epochs):
            first = position["batch"] if epoch == position["epoch"] else 0
            bar = progress(steps_per_epoch - first, f"epoch {epoch + 1}/{tc.epochs}")
            epoch_start = time.perf_counter()
            for batch, (x, y) in enumerate(data.batches(
                    train_set, tc.batch_size, seed=tc.seed, epoch=epoch, start=first,
                    augment_shift=cfg.data.augment_shift, **norm), start=first):
                if mesh is not None:
                    x, y = parallel.global_batch(mesh, x, y)   # this process's rows of it
                state, metrics = train_step(state, x, y)
                bar.update(1)
                if not stop.started:
                    stop.reached("first-step")
                step, finite = jax.device_get(parallel.local_view(
                    (state.step, metrics["finite"])))          # one transfer
                step = int(step)
                stop.started = True               # from now on a stop writes a checkpoint
                if not finite:
                    bar.close()
                    return report_non_finite(out, metrics, names, train_set, tc, epoch, batch,
                                             step + 1)
                if stop.signal:
                    bar.close()
                    return stopped(save(epoch, batch + 1))
                if step % tc.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                    path = save(epoch, batch + 1)     # (the epoch's last step: saved below)
                    if stop.signal:                   # arrived during the write
                        bar.close()
                        return stopped(path)
                if step % tc.log_every == 0 or step == total_steps:
                    values = {k: float(metrics[k]) for k in ("loss", "accuracy", "grad_norm")}
                    values["grad_norms"] = dict(zip(names, map(float, metrics["leaf_norms"])))
                    rate = (images + (bar.n * tc.batch_size)) / max(
                        train_time + time.perf_counter() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:,.0f}")
                    log.write(json.dumps({"kind": "train", "step": step, "epoch": epoch,
                                          **values}) + "\n")
                    log.flush()
            jax.block_until_ready(state.params)
            bar.close()
            train_time += time.perf_counter() - epoch_start
            images += (steps_per_epoch - first) * tc.batch_size
            path = save(epoch + 1, 0)
            stop.reached("eval")
            result = train.evaluate(eval_step, parallel.local_view(state), data.batches(
                test_set, tc.eval_batch_size, train=False, **norm))
            record = {"kind": "eval", "step": int(state.step), "epoch": epoch + 1,
                      "test_loss": result["loss"], "test_accuracy": result["accuracy"],
                      "images_per_s": images / train_time,
                      "wall_s": time.perf_counter() - start}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"epoch {epoch + 1:>3}/{tc.epochs}  test loss {result['loss']:.4f}  "
                  f"test acc {result['accuracy']:.4f}  {images / train_time:,.0f} img/s  "
                  f"{record['wall_s']:.0f} s", flush=True)
            if stop.signal and epoch + 1 < tc.epochs:   # during the checkpoint or the evaluation
                return stopped(path)

    wall = time.perf_counter() - start
    summary = {"name": cfg.name, "model": cfg.model.name, "grad": tc.grad,
               "test_accuracy": result["accuracy"], "test_loss": result["loss"],
               "images_per_s": images / train_time, "wall_s": wall, "steps": int(state.step),
               "backend": jax.default_backend(), "config": dataclasses.asdict(cfg)}
    if not main_process:
        print(f"done (process {jax.process_index()}): test accuracy {result['accuracy']:.4f}")
        return 0
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    png = report.plot_training(report.read_jsonl(metrics_path), os.path.join(out, "curves.png"),
                               title=f"{cfg.name} ({tc.grad} gradients)")
    print(f"done: test accuracy {result['accuracy']:.4f}, {images / train_time:,.0f} images/s, "
          f"wall time {wall:.1f} s (compilation included); "
          f"{'plot ' + png if png else 'no plot'}, metrics {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A training run as one call: :func:`fit` (config + run directory -> summary).

    cfg = jbp.config.load("configs/lenet_mnist.toml", ["train.epochs=2"])
    summary = jbp.train.fit(cfg, "runs/mine")          # the loop scripts/train.py runs
    summary = jbp.train.fit(cfg, "runs/mine", resume=True)   # after a stop or a crash

It loads the data, builds the model (``jbp.models.from_config``), the optimiser and the jitted
steps (data parallel over every device JAX sees, ``train.data_parallel``), trains epoch by epoch
with evaluation after each, and writes into the run directory:

    config.toml     the resolved config; a resume reads it back (:func:`jbp.train.load_config`)
    ckpt-*.npz      checkpoints every train.checkpoint_every steps and at each epoch end
    metrics.jsonl   one JSON object per line: "train" every train.log_every steps, "eval" per epoch
    summary.json    final test accuracy, throughput, wall time, the convolution kernels
    curves.png      loss and accuracy curves (needs matplotlib: the [plots] extra)

With a class per pixel (a segmentation set, ``data.dataset = "mnist_scenes"``) every evaluation
also records the pixel accuracy, the IoU of every class and their mean (mIoU) in metrics.jsonl,
the summary and the curves, and the run ends with ``predictions.png``: a few test canvases,
input | truth | prediction side by side.

A resume replays the same data order from the checkpoint's position, so the result is
bit-identical to an uninterrupted run on the same machine. A non-finite loss or gradient stops
the run (:class:`NonFiniteError`, the batch's example indices in ``nonfinite_batch.json``); the
newest checkpoint is then the last good state. Only process 0 writes to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from jbp import checkpoint, cpu_conv, data, models, parallel, report
from jbp import config as config_lib
from jbp.policy import LayerPolicy
from jbp.train import privacy
from jbp.train import run_dir as run_dirs
from jbp.train.optim import optimizer_from_config
from jbp.train.step import (evaluate, init_optimizer, init_train_state, leaf_names,
                            make_eval_step, make_train_step, tree_size)
from jbp.train.stop import Stop


class FitError(ValueError):
    """A run cannot start as configured (fewer examples than a batch, a model option the model
    does not have, a batch that does not divide over the devices)."""


class NonFiniteError(RuntimeError):
    """A step's loss or gradient was NaN/Inf: the update was not applied and the run stopped."""

    def __init__(self, message: str, step: int, path: str):
        super().__init__(message)
        self.step, self.path = step, path


def _progress(total: int, desc: str, verbose: bool):
    """A tqdm bar on a terminal; nothing when output is redirected (epoch lines still print)."""
    from tqdm import tqdm  # noqa: PLC0415
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                disable=not (verbose and sys.stderr.isatty()))


def _data_parallel_mesh(tc):
    """The ``"data"`` mesh for ``train.data_parallel="auto"`` on more than one device, ``None``
    for one device or ``"off"``."""
    if tc.data_parallel == "off" or jax.device_count() == 1:
        return None
    mesh = parallel.data_mesh()
    if tc.batch_size % mesh.size:
        raise FitError(f"train.batch_size={tc.batch_size} does not divide over the {mesh.size} "
                       f"devices JAX sees ({jax.process_count()} process(es)); use a multiple of "
                       f"{mesh.size}, or --set train.data_parallel=off")
    return mesh


def _non_finite(out, metrics, names, source, epoch, batch, step) -> NonFiniteError:
    """Name the step and the first bad leaf, save the batch's example indices (and files)."""
    leaf_finite = np.asarray(metrics["leaf_finite"])
    bad = [n for n, ok in zip(names, leaf_finite) if not ok]
    path = os.path.join(out, "nonfinite_batch.json")
    with open(path, "w") as f:
        json.dump({"step": step, "epoch": epoch, "batch": batch, "loss": float(metrics["loss"]),
                   "nonfinite_leaves": bad, **source.batch_examples(epoch, batch)}, f)
    where = f"first non-finite gradient in parameter {bad[0]}" if bad else "the loss is non-finite"
    return NonFiniteError(
        f"non-finite loss or gradient at step {step} (epoch {epoch + 1}, batch {batch}): "
        f"{where}. The update was not applied; the newest checkpoint in {out} is the last good "
        f"state. The batch's example indices are in {path}.", step, path)


#: How many test canvases ``predictions.png`` shows (segmentation runs).
PREDICTION_CANVASES = 4


def _segmentation_record(result: dict) -> dict:
    """The per-pixel scores of an evaluation (empty for classification)."""
    if result.get("miou") is None:
        return {}
    return {"test_pixel_accuracy": result["pixel_accuracy"], "test_miou": result["miou"],
            "test_iou": result["iou"]}


def _maybe(accuracy) -> str:
    return "n/a" if accuracy is None else f"{accuracy:.4f}"   # n/a: labels are not classes


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def fit(cfg: config_lib.Config, run_dir: str, *, resume: bool = False, overwrite: bool = False,
        stop: Optional[Stop] = None, on_metrics: Optional[Callable[[dict], None]] = None,
        max_steps: Optional[int] = None, dtype=None, verbose: bool = True) -> dict:
    """Train ``cfg`` in ``run_dir`` (module docstring); returns the summary (``summary.json``).

    ``resume``: continue the run in ``run_dir`` from its newest good checkpoint (a finished run:
    its summary, ``status="already finished"``). A new run refuses a directory that holds one
    (:class:`jbp.train.RunDirError`) unless ``overwrite`` deletes that run first.
    ``stop``: a :class:`jbp.train.Stop`; once its ``reason`` is set, the run writes a checkpoint
    and returns ``{"status": "stopped", "reason", "steps", "checkpoint", "run_dir"}``.
    ``on_metrics(record)``: called with each record written to metrics.jsonl.
    ``max_steps``: stop after that many steps in all, as a stop would (a short experiment on the
    configured schedule). ``dtype``: the parameters' and images' float dtype (``np.float64``
    needs ``jax_enable_x64``); default the model's (float32). ``verbose``: print progress.
    Raises FitError, jbp.data.DataError, jbp.checkpoint.CheckpointError, NonFiniteError.
    """
    stop = stop if stop is not None else Stop()
    say = print if verbose else (lambda *_a, **_k: None)
    stop.reached("data")
    main_process = parallel.is_main_process()
    tc, out = cfg.train, run_dir
    mesh = _data_parallel_mesh(tc)
    source = data.open_source(       # a streamed source reads this process's shard (if meshed)
        cfg.data, cfg.model.num_classes, batch_size=tc.batch_size, seed=tc.seed,
        eval_batch_size=tc.eval_batch_size,
        shard=(jax.process_index(), jax.process_count()) if mesh is not None else (0, 1))
    input_shape, steps_per_epoch = source.input_shape, source.steps_per_epoch
    if steps_per_epoch == 0:
        raise FitError(f"{source.num_train} training examples is fewer than one batch of "
                       f"{tc.batch_size}")
    total_steps = tc.epochs * steps_per_epoch
    try:
        model = models.from_config(cfg.model)
        layers = LayerPolicy(tc.grad, residuals=cfg.model.residuals)
    except ValueError as e:                        # an option this model does not have
        raise FitError(str(e)) from e
    optimizer = optimizer_from_config(cfg.optim, total_steps)
    state = init_train_state(model, optimizer, jax.random.key(tc.seed), input_shape,
                             cfg.model.num_classes, dtype=dtype)
    position = {"epoch": 0, "batch": 0}             # the next batch to train on
    if cfg.model.init_from and not resume:          # fine-tuning: the weights, a fresh optimiser
        params, model_state = checkpoint.restore_weights(cfg.model.init_from, state.params,
                                                         state.model_state,
                                                         fresh=cfg.model.init_fresh)
        state = state._replace(params=params, model_state=model_state,
                               opt_state=init_optimizer(model, optimizer, params,
                                                        model_state, input_shape))
        say(f"weights from {cfg.model.init_from}"
            + (f" (fresh: {', '.join(cfg.model.init_fresh)})" if cfg.model.init_fresh else ""))
    if resume:
        state, manifest, path = checkpoint.restore_latest(out, state)
        position = manifest["position"]
        source.resume(position)
        if position["epoch"] >= tc.epochs:
            say(f"{out}: the run already finished all {tc.epochs} epochs ({int(state.step)} "
                f"steps, {path}); nothing to resume")
            return {**_read_json(os.path.join(out, "summary.json")),
                    "status": "already finished", "steps": int(state.step), "run_dir": out}
        say(f"resuming from {path}: step {int(state.step)}, epoch {position['epoch'] + 1}, "
            f"batch {position['batch']}")
    elif main_process:
        run_dirs.claim(out, overwrite=overwrite, created=stop.cleanup, say=say)
        stop.cleanup.insert(0, os.path.join(out, "config.toml"))
    config_text = config_lib.to_toml(cfg)
    if main_process:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.toml"), "w") as f:
            f.write(config_text)
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    try:
        train_step = make_train_step(model.apply, optimizer, layers=layers,
                                     check_finite=tc.check_finite, mesh=mesh,
                                     precision=tc.precision, dp=tc.dp)
    except ValueError as e:                        # train.dp with a setting it does not take
        raise FitError(str(e)) from e
    eval_step = make_eval_step(model.apply, layers=layers)
    names = leaf_names(state.params)

    def save(epoch, batch):
        stop.reached("checkpoint")
        position = {"epoch": epoch, "batch": batch, **source.position()}   # (every process)
        if not main_process:
            return os.path.join(out, "(process 0 writes the checkpoint)")
        return checkpoint.save(out, parallel.local_view(state), position=position,
                               config=config_text, keep=tc.keep_checkpoints)

    def stopped(path):
        reason = stop.reason or f"max_steps={max_steps}"
        say(f"{reason}: stopped after step {int(state.step)}, checkpoint {path}.", flush=True)
        return {"status": "stopped", "reason": reason, "steps": int(state.step),
                "checkpoint": path, "run_dir": out}

    conv = cpu_conv.describe()
    if dtype is not None and np.dtype(dtype) != np.float32 and conv.startswith("onednn"):
        conv = "xla (oneDNN's kernels are float32 only)"
    devices = (f", data parallel over {mesh.size} devices in {jax.process_count()} process(es)"
               if mesh is not None else "")
    say(f"{cfg.name}: {cfg.model.name} ({tree_size(state.params):,} parameters), {tc.grad} "
        f"gradients, {source.num_train:,} train / {source.num_test:,} test images "
        f"{input_shape}, {tc.epochs} epochs x {steps_per_epoch} steps of {tc.batch_size}, on "
        f"{jax.default_backend()}{devices}, convolutions: {conv} -> {out}", flush=True)

    to_global = parallel.process_batch if source.per_process else parallel.global_batch
    metrics_path = os.path.join(out, "metrics.jsonl")
    if not resume and main_process:
        open(metrics_path, "w").close()
        stop.cleanup.insert(0, metrics_path)
    stop.reached("compile")
    start = time.perf_counter()
    train_time, images, result = 0.0, 0, {}
    with open(metrics_path if main_process else os.devnull, "a") as log:
        def write(record):
            log.write(json.dumps(record) + "\n")
            log.flush()
            if on_metrics is not None:
                on_metrics(record)

        for epoch in range(position["epoch"], tc.epochs):
            first = position["batch"] if epoch == position["epoch"] else 0
            bar = _progress(steps_per_epoch - first, f"epoch {epoch + 1}/{tc.epochs}", verbose)
            epoch_start = time.perf_counter()
            for batch, (x, y) in enumerate(source.train_batches(epoch, first), start=first):
                if dtype is not None:
                    x = x.astype(dtype)
                if mesh is not None:
                    x, y = to_global(mesh, x, y)           # this process's rows of it
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
                    raise _non_finite(out, metrics, names, source, epoch, batch, step + 1)
                if stop.reason:
                    bar.close()
                    return stopped(save(epoch, batch + 1))
                if step % tc.checkpoint_every == 0 and batch + 1 < steps_per_epoch:
                    path = save(epoch, batch + 1)     # (the epoch's last step: saved below)
                    if stop.reason:                   # arrived during the write
                        bar.close()
                        return stopped(path)
                if step % tc.log_every == 0 or step == total_steps:
                    host = jax.device_get(parallel.local_view(
                        {k: metrics[k] for k in ("loss", "accuracy", "grad_norm", "leaf_norms")
                         if k in metrics}))
                    values = {k: float(v) for k, v in host.items() if k != "leaf_norms"}
                    values["grad_norms"] = dict(zip(names, map(float, host["leaf_norms"])))
                    rate = (images + (bar.n * tc.batch_size)) / max(
                        train_time + time.perf_counter() - epoch_start, 1e-9)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:,.0f}")
                    write({"kind": "train", "step": step, "epoch": epoch, **values,
                           **source.counters()})
                if max_steps is not None and step >= max_steps and step < total_steps:
                    bar.close()
                    return stopped(save(epoch, batch + 1))
            jax.block_until_ready(state.params)
            bar.close()
            train_time += time.perf_counter() - epoch_start
            images += (steps_per_epoch - first) * tc.batch_size
            path = save(epoch + 1, 0)
            stop.reached("eval")
            result = evaluate(eval_step, parallel.local_view(state), source.test_batches())
            record = {"kind": "eval", "step": int(state.step), "epoch": epoch + 1,
                      "test_loss": result["loss"], "test_accuracy": result["accuracy"],
                      **_segmentation_record(result),
                      "images_per_s": images / train_time,
                      "wall_s": time.perf_counter() - start}
            if tc.dp is not None:                # privacy spent so far (jbp.train.privacy)
                record["epsilon"] = privacy.epsilon(int(state.step), tc.batch_size,
                                                    source.num_train, tc.dp.noise_multiplier)
                record["delta"] = privacy.DELTA
            write(record)
            miou = f"  test mIoU {result['miou']:.4f}" if result.get("miou") is not None else ""
            say(f"epoch {epoch + 1:>3}/{tc.epochs}  test loss {result['loss']:.4f}  test acc "
                f"{_maybe(result['accuracy'])}{miou}  "
                f"{images / train_time:,.0f} img/s  {record['wall_s']:.0f} s", flush=True)
            if stop.reason and epoch + 1 < tc.epochs:   # during the checkpoint or the evaluation
                return stopped(path)

    wall = time.perf_counter() - start
    summary = {"status": "finished", "name": cfg.name, "model": cfg.model.name,
               "grad": tc.grad, "test_accuracy": result["accuracy"],
               "test_loss": result["loss"], **_segmentation_record(result),
               "images_per_s": images / train_time, "wall_s": wall,
               "steps": int(state.step), "backend": jax.default_backend(),
               "conv_backend": conv, "run_dir": out, **source.counters(),
               **({k: record[k] for k in ("epsilon", "delta")} if tc.dp is not None and result
                  else {}),
               "config": dataclasses.asdict(cfg)}
    if not main_process:
        say(f"done (process {jax.process_index()}): test accuracy {_maybe(result['accuracy'])}")
        return summary
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    png = report.plot_training(report.read_jsonl(metrics_path), os.path.join(out, "curves.png"),
                               title=f"{cfg.name} ({tc.grad} gradients)")
    if result.get("miou") is not None:
        x, y = next(iter(source.test_batches()))
        logits, _ = model.apply(state.params, state.model_state, x[:PREDICTION_CANVASES],
                                train=False, layers=layers)
        report.plot_segmentation(x[:PREDICTION_CANVASES], y[:PREDICTION_CANVASES],
                                 np.argmax(np.asarray(logits), -1),
                                 os.path.join(out, "predictions.png"),
                                 title=f"{cfg.name}: test mIoU {result['miou']:.3f}")
    say(f"done: test accuracy {_maybe(result['accuracy'])}, {images / train_time:,.0f} images/s, "
        f"wall time {wall:.1f} s (compilation included); "
        f"{'plot ' + png if png else 'no plot'}, metrics {metrics_path}")
    return summary

"""Does second order pay? K-FAC, damped Gauss-Newton, Adam and SGD + momentum on the shipped
MNIST, each with a learning-rate/damping sweep of the same size (``scripts/second_order.py``).

    rows = optimizer_study.run(models=("lenet5",), steps=300, sweep=2, out="runs/so")

For every model and optimiser, every setting of the first ``sweep`` entries of :data:`SWEEPS`
trains from the same initial parameters on the same batches (``train.seed``, the config's data
order, no augmentation, no weight decay) with a constant learning rate for ``steps`` steps, evaluating the test accuracy every
``eval_every`` steps (on the first ``test_limit`` test images). A row records the steps and
the training wall time (compilation and evaluation excluded) to the first evaluation at or above
98.5% and 99%, the final accuracy, and the median time of one step. The best setting of each
optimiser (most accurate at the end) is the one the curves show: ``OUT/second_order.png``, test
accuracy against steps and against wall time, one row of panels per model;
``OUT/second_order.json`` holds every row and curve.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from jbp import config as config_lib
from jbp import data, models
from jbp.policy import LayerPolicy
from jbp.train.optim import optimizer_from_config
from jbp.train.step import evaluate, init_train_state, make_eval_step, make_train_step

#: The optimisers compared, by ``optim.optimizer`` name (``momentum``: SGD + momentum 0.9).
OPTIMIZERS = ("kfac", "gauss_newton", "adam", "momentum")
#: Per optimiser, the settings swept (``optim.*`` keys), in order: ``--sweep N`` takes the first
#: N of each, so every optimiser gets the same number of runs.
SWEEPS: Dict[str, List[dict]] = {
    "kfac": [{"lr": 0.05, "damping": 1e-2}, {"lr": 0.2, "damping": 1e-2},
             {"lr": 0.05, "damping": 1e-1}, {"lr": 0.2, "damping": 1e-3}],
    "gauss_newton": [{"lr": 1.0, "damping": 1.0}, {"lr": 0.5, "damping": 1.0},
                     {"lr": 1.0, "damping": 10.0}, {"lr": 1.0, "damping": 0.1}],
    "adam": [{"lr": 1e-3}, {"lr": 3e-3}, {"lr": 3e-4}, {"lr": 1e-2}],
    "momentum": [{"lr": 0.05}, {"lr": 0.1}, {"lr": 0.02}, {"lr": 0.2}],
}
#: What every K-FAC run of the study shares: factors refreshed every 5 steps (a refresh is an
#: evaluation-mode pass with C = 10 backward columns), eigendecompositions every 20.
KFAC_FIXED = ("optim.refresh_every=5", "optim.invert_every=20")
#: What every Gauss-Newton run of a model shares: on LeNet-5 10 CG iterations on a sub-batch of
#: 32; on ResNet-20, where one GGN-vector product through 20 convolutions on 32 examples costs
#: about three plain steps, 5 iterations on 16 (a step of 12 products instead of 22, each half
#: the size).
GAUSS_NEWTON_FIXED = {"lenet5": ("optim.sub_batch=32", "optim.cg_iters=10"),
                      "resnet20": ("optim.sub_batch=16", "optim.cg_iters=5")}
#: The model configs the study starts from.
CONFIGS = {"lenet5": "configs/lenet_mnist.toml", "resnet20": "configs/resnet20_mnist.toml"}
TARGETS = (0.985, 0.99)


def _config(model: str, optimizer: str, setting: dict, *, batch_size: int, train_limit,
            test_limit, root: str) -> config_lib.Config:
    overrides = [f"optim.optimizer={optimizer}", "optim.schedule=constant",
                 "optim.warmup_steps=0", "optim.weight_decay=0.0", "data.augment_shift=0",
                 f"train.batch_size={batch_size}", "train.data_parallel=off",
                 f"data.train_limit={train_limit}" if train_limit else "data.train_limit=60000",
                 f"data.test_limit={test_limit}" if test_limit else "data.test_limit=10000"]
    overrides += [f"optim.{k}={v!r}" for k, v in setting.items()]
    if optimizer == "gauss_newton":
        overrides += list(GAUSS_NEWTON_FIXED[model])
    if optimizer == "kfac":
        overrides += list(KFAC_FIXED)
    return config_lib.load(os.path.join(root, CONFIGS[model]), overrides)


def train_one(cfg: config_lib.Config, steps: int, eval_every: int,
              say=print, time_budget: Optional[float] = None) -> dict:
    """One run of ``steps`` steps, or fewer if its training time passes ``time_budget``
    seconds (then it ends with an evaluation at the step where it stopped); the test accuracy
    every ``eval_every`` steps."""
    source = data.open_source(cfg.data, cfg.model.num_classes, batch_size=cfg.train.batch_size,
                              eval_batch_size=cfg.train.eval_batch_size, seed=cfg.train.seed)
    model = models.from_config(cfg.model)
    layers = LayerPolicy(cfg.train.grad)
    optimizer = optimizer_from_config(cfg.optim, steps)
    state = init_train_state(model, optimizer, jax.random.key(cfg.train.seed),
                             source.input_shape, cfg.model.num_classes)
    step_fn = make_train_step(model.apply, optimizer, layers=layers)
    eval_fn = make_eval_step(model.apply, layers=layers)
    curve, step_times, train_time, compile_s, done = [], [], 0.0, None, 0
    epoch = 0
    while done < steps:
        for x, y in source.train_batches(epoch, 0):
            t0 = time.perf_counter()
            state, metrics = step_fn(state, x, y)
            jax.block_until_ready(state.params)
            elapsed = time.perf_counter() - t0
            if compile_s is None:
                compile_s = elapsed            # the first step compiles: not counted
            else:
                train_time += elapsed
                step_times.append(elapsed)
            done += 1
            out_of_time = time_budget is not None and train_time >= time_budget
            if not bool(metrics["finite"]):
                say(f"  step {done}: non-finite loss or gradient; stopping this run")
                curve.append({"step": done, "time_s": train_time, "accuracy": float("nan"),
                              "loss": float("nan")})
                done = steps
                break
            if done % eval_every == 0 or done == steps or out_of_time:
                result = evaluate(eval_fn, state, source.test_batches())
                curve.append({"step": done, "time_s": train_time,
                              "accuracy": result["accuracy"], "loss": result["loss"]})
                say(f"  step {done}: test accuracy {result['accuracy']:.4f}, train loss "
                    f"{float(metrics['loss']):.4f}, {train_time:.1f} s")
            if out_of_time:
                say(f"  step {done}: time budget of {time_budget:g} s spent; stopping this run")
                steps = done
            if done >= steps:
                break
        epoch += 1
    row = {"final_accuracy": curve[-1]["accuracy"], "compile_s": compile_s, "steps_run": done,
           "step_ms_median": 1e3 * float(np.median(step_times)) if step_times else None,
           "train_time_s": train_time, "curve": curve}
    for target in TARGETS:
        hit = next((p for p in curve if p["accuracy"] >= target), None)
        row[f"steps_to_{target}"] = None if hit is None else hit["step"]
        row[f"time_to_{target}"] = None if hit is None else hit["time_s"]
    return row


def run(*, models_: Sequence[str] = ("lenet5", "resnet20"),
        optimizers: Sequence[str] = OPTIMIZERS, steps: int = 2000, sweep: int = 2,
        eval_every: int = 100, batch_size: int = 64, train_limit: Optional[int] = None,
        test_limit: Optional[int] = None, out: str = "runs/second_order", root: str = ".",
        time_budget: Optional[float] = None, say=print) -> List[dict]:
    """The study (module docstring); returns every row, also written to OUT."""
    for name in models_:
        if name not in CONFIGS:
            raise ValueError(f"models: expected names from {tuple(CONFIGS)}, got {name!r}")
    for name in optimizers:
        if name not in SWEEPS:
            raise ValueError(f"optimizers: expected names from {tuple(SWEEPS)}, got {name!r}")
    if not 1 <= sweep <= min(len(v) for v in SWEEPS.values()):
        raise ValueError(f"sweep: expected 1 .. {min(len(v) for v in SWEEPS.values())}, "
                         f"got {sweep}")
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"time_budget: expected seconds > 0, got {time_budget}")
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps, eval_every: expected >= 1, got {steps}, {eval_every}")
    os.makedirs(out, exist_ok=True)
    rows = []
    for model in models_:
        for optimizer in optimizers:
            for setting in SWEEPS[optimizer][:sweep]:
                cfg = _config(model, optimizer, setting, batch_size=batch_size,
                              train_limit=train_limit, test_limit=test_limit, root=root)
                say(f"{model} {optimizer} {setting}")
                row = {"model": model, "optimizer": optimizer, "setting": setting,
                       "steps": steps, "batch_size": batch_size,
                       **train_one(cfg, steps, eval_every, say=say, time_budget=time_budget)}
                rows.append(row)
                _write(rows, out)
    write(rows, out)
    return rows


def write(rows: List[dict], out: str) -> None:
    """``OUT/second_order.json`` (every row) and ``OUT/second_order.png`` (the curves)."""
    _write(rows, out)
    plot(rows, os.path.join(out, "second_order.png"))


def best(rows: List[dict]) -> List[dict]:
    """Per model and optimiser, the row with the highest final accuracy."""
    chosen = {}
    for row in rows:
        key = (row["model"], row["optimizer"])
        acc = row["final_accuracy"] if row["final_accuracy"] == row["final_accuracy"] else -1
        if key not in chosen or acc > chosen[key][0]:
            chosen[key] = (acc, row)
    return [row for _, row in chosen.values()]


def table(rows: List[dict]) -> str:
    """A Markdown table of the rows (every setting; the best of each optimiser marked *)."""
    marked = {id(r) for r in best(rows)}

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)
    lines = ["| model | optimizer | setting | steps to 98.5% | s to 98.5% | steps to 99% | "
             "s to 99% | steps run | final acc. | ms/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
        star = " *" if id(r) in marked else ""
        lines.append(f"| {r['model']} | {r['optimizer']}{star} | {setting} | "
                     f"{fmt(r['steps_to_0.985'], 'd')} | {fmt(r['time_to_0.985'], '.1f')} | "
                     f"{fmt(r['steps_to_0.99'], 'd')} | {fmt(r['time_to_0.99'], '.1f')} | "
                     f"{r.get('steps_run', r['steps'])} | {r['final_accuracy']:.4f} | "
                     f"{fmt(r['step_ms_median'], '.1f')} |")
    return "\n".join(lines)


def _write(rows, out):
    tmp = os.path.join(out, "second_order.json.tmp")
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(tmp, os.path.join(out, "second_order.json"))


def plot(rows: List[dict], path: str) -> Optional[str]:
    """Test accuracy against steps and against wall time of each optimiser's best setting."""
    try:
        import matplotlib  # noqa: PLC0415
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    chosen = best(rows)
    model_names = list(dict.fromkeys(r["model"] for r in chosen))
    fig, axes = plt.subplots(len(model_names), 2, figsize=(11, 4 * len(model_names)),
                             squeeze=False)
    for i, model in enumerate(model_names):
        for row in (r for r in chosen if r["model"] == model):
            setting = ", ".join(f"{k}={v:g}" for k, v in row["setting"].items())
            label = f"{row['optimizer']} ({setting})"
            steps = [p["step"] for p in row["curve"]]
            seconds = [p["time_s"] for p in row["curve"]]
            acc = [p["accuracy"] for p in row["curve"]]
            color = f"C{OPTIMIZERS.index(row['optimizer'])}"    # one colour per optimiser
            axes[i][0].plot(steps, acc, marker=".", label=label, color=color)
            axes[i][1].plot(seconds, acc, marker=".", label=label, color=color)
        for ax, xlabel in zip(axes[i], ("step", "training wall time (s)")):
            for target in TARGETS:
                ax.axhline(target, color="gray", lw=0.5, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0.9, 1.0)
            ax.set_title(model)
            ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Run directories: a new run gets one of its own, and nothing is mixed or deleted unasked.

A run directory holds one run (:func:`jbp.checkpoint.run_files`). :func:`claim` refuses one that
holds a run unless told to delete it (``overwrite``); :func:`unused` gives a default name a
numbered sibling when it is taken (``runs/lenet_mnist-manual-2``), as Lightning's and Hydra's
``version_N`` / dated directories do, so running the same command twice makes two runs.
"""

from __future__ import annotations

import os
from typing import Any, Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from jbp import checkpoint, data, models
from jbp import config as config_lib
from jbp.train.optim import optimizer_from_config
from jbp.train.step import init_train_state


class RunDirError(ValueError):
    """The run directory holds another run (and may not be overwritten)."""


def unused(base: str, run_files: Callable[[str], List[str]] = checkpoint.run_files) -> str:
    """``base`` if it holds no run, else the first of ``base-2``, ``base-3``, ... that holds none."""
    out, n = base, 1
    while run_files(out):
        n += 1
        out = f"{base}-{n}"
    return out


def claim(out: str, *, overwrite: bool = False, created: Optional[list] = None,
          run_files: Callable[[str], List[str]] = checkpoint.run_files,
          clear: Callable[[str], Sequence[str]] = checkpoint.clear_run,
          resumable: bool = True, say: Callable[[str], None] = print) -> None:
    """Make ``out`` this new run's: create it, or delete the run it holds if ``overwrite``, or
    raise :class:`RunDirError` offering ``--resume`` (if ``resumable``), ``--out`` and
    ``--overwrite``. A directory it creates is appended to ``created`` (a stop's cleanup);
    ``say`` prints what it deleted.

    Two runs never share a directory: their checkpoints, metrics and summaries would mix, and a
    resume would continue whichever checkpoint has the highest step.
    """
    existing = run_files(out)
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        resume = f"Continue it with --resume {out}, start" if resumable else "Start"
        raise RunDirError(f"{out} already holds a run ({shown}). {resume} this one elsewhere "
                          f"with --out runs/NEW_NAME, or delete the old run and start afresh "
                          f"with --overwrite")
    if existing:
        clear(out)
        say(f"--overwrite: deleted the previous run in {out} ({len(existing)} files)")
    if not os.path.isdir(out):
        os.makedirs(out)
        if created is not None:
            created.append(out)


def load_config(run_dir: str, overrides: Sequence[str] = ()) -> config_lib.Config:
    """The config a run was started with (its ``config.toml``), with ``overrides`` applied."""
    path = os.path.join(run_dir, "config.toml")
    if not os.path.isfile(path):
        raise config_lib.ConfigError(f"{run_dir}: not a run directory (no config.toml); "
                                     f"nothing to resume")
    return config_lib.load(path, overrides)


class FinishedRun(NamedTuple):
    """A run read back for analysis (``scripts/curvature.py``, ``scripts/diagnostics.py``)."""

    cfg: config_lib.Config
    model: models.Model
    x: jax.Array                 # one fixed training batch, normalised as in training
    y: jax.Array
    like: Any                    # a TrainState of the run's shapes, for checkpoint.restore
    paths: List[str]             # its ckpt-*.npz, oldest first


def finished_run(run_dir: str, batch: int) -> FinishedRun:
    """The model, the first training batch of ``batch`` examples (the run's seed) and the
    checkpoints of ``run_dir``; a :class:`RunDirError` where it is not a run with checkpoints."""
    try:
        cfg = config_lib.load(os.path.join(run_dir, "config.toml"))
        train_set, _ = data.load_dataset(cfg.data, cfg.model.num_classes)
    except (config_lib.ConfigError, data.DataError) as e:
        raise RunDirError(f"{e} (is {run_dir} a run directory?)") from e
    paths = checkpoint.checkpoint_paths(run_dir)
    if not paths:
        raise RunDirError(f"{run_dir}: no ckpt-*.npz checkpoints")
    model = models.from_config(cfg.model)
    x, y = next(data.batches(train_set, min(batch, train_set.num_examples),
                             mean=cfg.data.mean, std=cfg.data.std, seed=cfg.train.seed))
    x, y = jnp.asarray(x), jnp.asarray(y)
    like = init_train_state(model, optimizer_from_config(cfg.optim, 1),
                            jax.random.key(cfg.train.seed), x.shape[1:], cfg.model.num_classes)
    return FinishedRun(cfg, model, x, y, like, paths)

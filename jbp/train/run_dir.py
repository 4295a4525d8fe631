"""Run directories: a new run gets one of its own, and nothing is mixed or deleted unasked.

A run directory holds one run (:func:`jbp.checkpoint.run_files`). :func:`claim` refuses one that
holds a run unless told to delete it (``overwrite``); :func:`unused` gives a default name a
numbered sibling when it is taken (``runs/lenet_mnist-manual-2``), as Lightning's and Hydra's
``version_N`` / dated directories do, so running the same command twice makes two runs.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

from jbp import checkpoint
from jbp import config as config_lib


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

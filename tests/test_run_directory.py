"""Two runs never share a run directory, and pruning never deletes the newest checkpoint.

The failure this guards against (issue 19): a second run with other settings into the same
directory, stopped early, had its checkpoint pruned at once (the last 3 were kept by step number
and the old run's were higher), and --resume then loaded the *old* run's newest checkpoint.
"""

import hashlib
import os
import subprocess
import sys
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from jbp import checkpoint

#: Outside the fast loop (``pytest -m 'not slow'``): training runs. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--set", 'model.name="seed_cnn"', "--set", "data.augment_shift=0",
        "--set", "data.train_limit=320", "--set", "data.test_limit=100",
        "--set", "train.epochs=2", "--set", "train.batch_size=32", "--every", "4"]


class _State(NamedTuple):
    w: jnp.ndarray
    step: jnp.ndarray


def _state(step, value=0.0):
    return _State(jnp.full((3,), value, jnp.float32), jnp.asarray(step, jnp.int32))


def _steps(run_dir):
    return [int(os.path.basename(p)[5:14]) for p in checkpoint.checkpoint_paths(str(run_dir))]


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    for step in (3050, 3100, 3120):                    # another run's, higher-numbered
        checkpoint.save(str(tmp_path), _state(step), keep=3)
    path = checkpoint.save(str(tmp_path), _state(276, 1.0), keep=3)
    assert os.path.exists(path) and 276 in _steps(tmp_path)
    for step in (280, 284, 288):                       # this run's own history is pruned to 3
        checkpoint.save(str(tmp_path), _state(step, 1.0), keep=3)
    assert _steps(tmp_path) == [280, 284, 288, 3050, 3100, 3120]


def test_run_files_and_clear_run(tmp_path):
    checkpoint.save(str(tmp_path), _state(5))
    for name in ("config.toml", "metrics.jsonl", "summary.json", ".ckpt-abc.tmp", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert checkpoint.run_files(str(tmp_path)) == [
        ".ckpt-abc.tmp", "ckpt-000000005.npz", "config.toml", "metrics.jsonl", "summary.json"]
    checkpoint.clear_run(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]       # only the run's own files are deleted
    assert checkpoint.run_files(str(tmp_path / "missing")) == []


def _train(*args, signal_at=None, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if k != "JBP_TEST_SIGNAL"}
    if signal_at:
        env["JBP_TEST_SIGNAL"] = signal_at
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def _digest(run_dir):
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
            for name in sorted(os.listdir(run_dir))}


@pytest.mark.slow             # four training runs
def test_a_second_run_never_mixes_with_the_first(tmp_path):
    run = tmp_path / "run"
    first = _train(*TINY, "--out", str(run))                       # finishes: steps 12, 16, 20
    assert first.returncode == 0, first.stdout + first.stderr
    assert _steps(run) == [12, 16, 20]
    before = _digest(run)

    # Same directory, other settings: refused, the old run untouched.
    other = ["--set", "optim.lr=0.01"]
    refused = _train(*TINY, *other, "--out", str(run))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    for option in (f"--resume {run}", "--out", "--overwrite"):
        assert option in refused.stderr, refused.stderr
    assert _digest(run) == before

    # With --overwrite the old run goes first; stopped at its first checkpoint (step 4), the new
    # run's checkpoint survives pruning and is what --resume continues.
    second = _train(*TINY, *other, "--out", str(run), "--overwrite",
                    signal_at="SIGINT@checkpoint")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "SIGINT: stopped after step 4" in second.stdout
    assert sorted(os.listdir(run)) == ["ckpt-000000004.npz", "config.toml", "metrics.jsonl"]
    assert "lr = 0.01" in (run / "config.toml").read_text()
    resumed = _train("--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "ckpt-000000004.npz: step 4," in resumed.stdout
    assert "already finished" not in resumed.stdout
    assert _steps(run) == [12, 16, 20]
    manifest, _ = checkpoint.read(checkpoint.checkpoint_paths(str(run))[-1])
    assert "lr = 0.01" in manifest["config"]
    # The new run's own final state, not the old one's.
    old = before["ckpt-000000020.npz"]
    assert hashlib.sha256((run / "ckpt-000000020.npz").read_bytes()).hexdigest() != old
    assert np.isfinite(float(__import__("json").load(open(run / "summary.json"))["test_loss"]))


def test_the_same_command_twice_makes_two_runs(tmp_path):
    """The README's first command, run again: the default name is taken, so the new run gets
    runs/<name>-<grad>-2 and says so; the first run is untouched, and --resume on it (finished)
    says there is nothing to do without counting an epoch past the last."""
    args = [*TINY, "--set", "train.epochs=1"]
    first = _train(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    run = tmp_path / "runs" / "lenet_mnist-manual"
    before = _digest(run)
    second = _train(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "this one goes to runs/lenet_mnist-manual-2" in second.stdout
    assert (tmp_path / "runs" / "lenet_mnist-manual-2" / "summary.json").is_file()
    assert _digest(run) == before
    resumed = _train("--resume", "runs/lenet_mnist-manual", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "already finished all 1 epochs" in resumed.stdout
    assert "epoch 2" not in resumed.stdout and "resuming from" not in resumed.stdout
    assert "--config runs/lenet_mnist-manual/config.toml" in resumed.stdout
    assert _digest(run) == before

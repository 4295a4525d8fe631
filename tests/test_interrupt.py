"""Ctrl-C/SIGTERM at any moment of scripts/train.py: never a traceback.

Before the first step has finished: one line, exit 128 + signal (130/143), and the run directory
this start created is gone. After it: the checkpoint stop (exit 0), and --resume continues.
Each moment is hit deterministically: JBP_TEST_SIGNAL=SIG@phase makes the script signal itself
on reaching the phase ("compile": from another thread as XLA starts compiling the train step).
"""

import os
import signal
import subprocess
import sys

import pytest

from jbp import checkpoint

#: Outside the fast loop (``pytest -m 'not slow'``): training runs in subprocesses. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The document's small network: compiles in a fraction of LeNet-5's time.
TINY = ["--set", 'model.name="seed_cnn"', "--set", "data.augment_shift=0",
        "--set", "data.train_limit=320", "--set", "data.test_limit=100",
        "--set", "train.epochs=2", "--set", "train.batch_size=32", "--every", "4"]


def _train(*args, signal_at=None, timeout=240):
    env = dict(os.environ)
    env.pop("JBP_TEST_SIGNAL", None)
    if signal_at:
        env["JBP_TEST_SIGNAL"] = signal_at
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


@pytest.mark.parametrize("signal_at", ["SIGINT@import", "SIGTERM@data", "SIGINT@compile",
                                       "SIGTERM@compile", "SIGINT@first-step"])
def test_stop_before_the_first_step_is_one_line(tmp_path, signal_at):
    run = tmp_path / "run"
    proc = _train(*TINY, "--out", str(run), signal_at=signal_at)
    sig = signal.Signals[signal_at.split("@")[0]]
    assert proc.returncode == 128 + sig, proc.stdout + proc.stderr          # 130 / 143
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{sig.name}: stopped during ") and "nothing to resume" in lines[0]
    assert not run.exists()            # nothing half-made is left to block the next run
    if signal_at.endswith("compile"):
        assert "compilation" in lines[0]


@pytest.mark.slow             # two runs each
@pytest.mark.parametrize("signal_at,stopped_at", [("SIGINT@checkpoint", 4),
                                                   ("SIGTERM@eval", 10)])
def test_stop_after_a_step_checkpoints_and_resumes(tmp_path, signal_at, stopped_at):
    """A signal during a checkpoint write or the evaluation: the write (or evaluation) finishes,
    the checkpoint stop follows, and --resume continues from exactly there to the end."""
    run = tmp_path / "run"
    proc = _train(*TINY, "--out", str(run), signal_at=signal_at)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    sig = signal_at.split("@")[0]
    assert f"{sig}: stopped after step {stopped_at}, checkpoint" in proc.stdout
    assert f"--resume {run}" in proc.stdout
    paths = checkpoint.checkpoint_paths(str(run))
    assert paths[-1].endswith(f"ckpt-{stopped_at:09d}.npz")
    manifest, _ = checkpoint.read(paths[-1])                        # complete and verified
    assert manifest["step"] == stopped_at
    resumed = _train("--resume", str(run))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"step {stopped_at}," in resumed.stdout and "done: test accuracy" in resumed.stdout


def test_stop_before_the_first_step_of_a_resume_leaves_the_run(tmp_path):
    run = tmp_path / "run"
    assert _train(*TINY, "--out", str(run), signal_at="SIGINT@checkpoint").returncode == 0
    before = sorted(os.listdir(run))
    proc = _train("--resume", str(run), signal_at="SIGINT@compile")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(os.listdir(run)) == before

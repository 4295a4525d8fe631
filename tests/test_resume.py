"""The training CLI survives interruption: SIGINT checkpoints and exits 0; SIGKILL loses only the
steps since the last checkpoint; either way, resuming ends bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jbp import checkpoint

#: Outside the fast loop (``pytest -m 'not slow'``): training runs. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "data.train_limit=640", "--set", "data.test_limit=200", "--set",
         "train.epochs=2", "--set", "train.batch_size=32", "--set", "data.augment_shift=2",
         "--every", "4"]


def _train(*args, **kw):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            **kw)


def _final_arrays(run_dir):
    _, arrays = checkpoint.read(checkpoint.checkpoint_paths(run_dir)[-1])
    return arrays


def _wait_for_checkpoint(run_dir, proc, min_step, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        paths = checkpoint.checkpoint_paths(run_dir)
        if paths and int(os.path.basename(paths[-1])[5:14]) >= min_step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("straight"))
    proc = _train(*SMALL, "--out", run)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    return _final_arrays(run)


@pytest.mark.slow             # seven training runs
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_run_resumes_to_identical_parameters(tmp_path, uninterrupted, sig):
    run = str(tmp_path / "run")
    proc = _train(*SMALL, "--out", run)
    _wait_for_checkpoint(run, proc, min_step=8)          # mid-way through epoch 1 of 2
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig != signal.SIGKILL:
        assert proc.returncode == 0, out + err
        assert f"{sig.name}: stopped after step" in out and f"--resume {run}" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    # A kill during a write leaves at most a .ckpt-*.tmp file, never a torn ckpt-*.npz.
    assert all(checkpoint.read(p) for p in checkpoint.checkpoint_paths(run))
    resumed = _train("--resume", run)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    assert "resuming from" in out and "done: test accuracy" in out
    final = _final_arrays(run)
    assert len(final) == len(uninterrupted)
    for a, b in zip(final, uninterrupted):
        np.testing.assert_array_equal(a, b)


def test_resume_errors_are_clear(tmp_path):
    proc = _train("--resume", str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "not a run directory (no config.toml)" in err

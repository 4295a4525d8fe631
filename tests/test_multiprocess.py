"""Several processes: a short LeNet-5 run on 2 processes × 2 host devices (scripts/launch.py,
127.0.0.1) ends where the same run on 1 process × 4 devices ends; only process 0 writes.

Bounded: every child has a timeout and the launcher terminates, then kills, any process still
running when one fails or time runs out.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jbp import checkpoint

#: Outside the fast loop (``pytest -m 'not slow'``): several processes. CI runs it.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 240
# 128 training images, batch 16 (4 per device): 8 steps of one epoch; a small eval.
RUN = ["--set", "train.epochs=1", "--set", "train.batch_size=16", "--set",
       "data.train_limit=128", "--set", "data.test_limit=64", "--set", "train.eval_batch_size=64",
       "--set", "train.log_every=4", "--set", "data.augment_shift=0", "--set",
       "optim.warmup_steps=0"]


def _env(devices=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(k, None)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT + 30)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def _final_leaves(run_dir):
    manifest, arrays = checkpoint.read(checkpoint.checkpoint_paths(str(run_dir))[-1])
    return manifest, {e["path"]: a for e, a in zip(manifest["leaves"], arrays)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    two, one = base / "two_processes", base / "one_process"
    out_two = _run([sys.executable, "scripts/launch.py", "--processes", "2",
                    "--devices-per-process", "2", "--timeout", str(TIMEOUT), "--",
                    "scripts/train.py", *RUN, "--out", str(two)], _env())
    out_one = _run([sys.executable, "scripts/train.py", *RUN, "--out", str(one)], _env(4))
    return two, one, out_two, out_one


def test_two_processes_match_one_process(runs):
    two, one, out_two, out_one = runs
    assert "over 4 devices in 2 process(es)" in out_two
    assert "over 4 devices in 1 process(es)" in out_one
    m2, leaves2 = _final_leaves(two)
    m1, leaves1 = _final_leaves(one)
    assert m2["step"] == m1["step"] == 8
    assert leaves2.keys() == leaves1.keys()
    worst = {}
    for path, a in leaves1.items():
        b = leaves2[path]
        if a.dtype.kind == "f":
            scale = max(float(np.max(np.abs(a))), 1e-30)
            worst[path] = float(np.max(np.abs(a - b))) / scale
    bad = {k: v for k, v in worst.items() if not v <= 1e-4}
    assert not bad, bad
    # The logged losses of every step agree too (process 0's log vs the one-process log).
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
               if '"train"' in line] for d in (two, one)]
    assert len(losses[0]) == len(losses[1]) == 2
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_only_process_zero_writes(runs):
    two, _, out_two, _ = runs
    names = sorted(p.name for p in two.iterdir())
    assert "summary.json" in names and "config.toml" in names
    assert len([n for n in names if n.startswith("ckpt-")]) >= 1
    lines = (two / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if '"eval"' in line]
    assert len(evals) == 1                    # one eval line: written by one process
    assert "[1] done (process 1)" in out_two

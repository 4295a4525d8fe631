"""Non-finite guard: a NaN/Inf step is not applied, is reported with its leaf, step and batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import optax

from jbp import checkpoint, train
from jbp.models import get_model

#: Outside the fast loop (``pytest -m 'not slow'``): training runs. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_nan_batch_is_not_applied_and_leaves_are_flagged():
    model = get_model("lenet5")
    opt = optax.sgd(0.1)
    state = train.init_train_state(model, opt, jax.random.key(0), (28, 28, 1), 10)
    step = train.make_train_step(model.apply, opt, donate=False)
    x = np.zeros((4, 28, 28, 1), np.float32)
    y = np.array([0, 1, 2, 3])
    good, metrics = step(state, x, y)
    assert bool(metrics["finite"]) and int(good.step) == 1
    x[1, 3, 3, 0] = np.nan
    after, metrics = step(good, x, y)
    assert not bool(metrics["finite"])
    assert int(after.step) == 1                                    # the step was skipped
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(good.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    names = train.leaf_names(state.params)
    flagged = [n for n, ok in zip(names, np.asarray(metrics["leaf_finite"])) if not ok]
    assert "['conv1']['w']" in flagged            # a NaN pixel poisons the first kernel's grad
    norms = np.asarray(metrics["leaf_norms"])
    assert norms.shape == (len(names),)


def test_leaf_norms_are_the_gradient_norms():
    model = get_model("seed_cnn")
    opt = optax.sgd(0.0)
    state = train.init_train_state(model, opt, jax.random.key(0), (6, 6, 1), 3)
    x = np.random.default_rng(0).standard_normal((5, 6, 6, 1)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1])
    _, metrics = train.make_train_step(model.apply, opt, donate=False)(state, x, y)
    _, grads = train.make_grad_fn(model.apply)(state.params, state.model_state, x, y)
    want = [float(np.linalg.norm(np.asarray(g))) for g in jax.tree.leaves(grads)]
    np.testing.assert_allclose(np.asarray(metrics["leaf_norms"]), want, rtol=1e-5)


def test_cli_stops_on_divergence_keeping_last_good_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--out", run,
         "--set", "data.train_limit=640", "--set", "train.epochs=1", "--set", "optim.lr=1e30",
         "--set", "optim.schedule=\"constant\"", "--set", "optim.warmup_steps=0",
         "--set", "train.batch_size=32", "--every", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "error: non-finite loss or gradient at step" in proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.load(open(os.path.join(run, "nonfinite_batch.json")))
    assert len(report["example_indices"]) == 32 and report["step"] >= 1
    assert f"at step {report['step']} " in proc.stderr
    if report["nonfinite_leaves"]:
        assert f"first non-finite gradient in parameter {report['nonfinite_leaves'][0]}" \
            in proc.stderr
    for path in checkpoint.checkpoint_paths(run):                 # every checkpoint is finite
        _, arrays = checkpoint.read(path)
        assert all(np.all(np.isfinite(a)) for a in arrays if a.dtype.kind == "f")


def test_check_can_be_switched_off():
    model = get_model("seed_cnn")
    opt = optax.sgd(0.1)
    state = train.init_train_state(model, opt, jax.random.key(0), (6, 6, 1), 3)
    x = np.full((2, 6, 6, 1), np.nan, np.float32)
    after, metrics = train.make_train_step(model.apply, opt, donate=False,
                                           check_finite=False)(state, x, np.array([0, 1]))
    assert bool(metrics["finite"]) and int(after.step) == 1        # applied, unchecked
    # NaN pixels reach the conv kernel gradient (ReLU maps NaN to 0, so fc stays finite).
    assert not np.all(np.isfinite(np.asarray(after.params["conv"]["w"])))


def test_plot_gradients_script(tmp_path):
    run = str(tmp_path / "run")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train.py"), "--out", run,
                    "--set", "data.train_limit=640", "--set", "train.epochs=1",
                    "--set", "train.log_every=5"], check=True, capture_output=True, timeout=300,
                   cwd=ROOT)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_gradients.py"),
                           run], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "5 layers" in proc.stdout and "['conv1']['w']" in proc.stdout
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert all(set(r["grad_norms"]) >= {"['fc3']['w']"} for r in records if r["kind"] == "train")

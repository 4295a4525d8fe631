"""Training: real data, jit-compiled optax steps, manual vs autodiff, the CLIs end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jbp import data, train
from jbp.models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM = dict(mean=(data.MNIST_MEAN,), std=(data.MNIST_STD,))


@pytest.fixture(scope="module")
def mnist():
    train_set, test_set = data.load_mnist()
    return data.subset(train_set, 2048), data.subset(test_set, 1000)


def _float64(state, optimizer):
    """The state in float64 (params and statistics widened, the optimiser re-initialised)."""
    params, model_state = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64),
                                       (state.params, state.model_state))
    return state._replace(params=params, model_state=model_state,
                          opt_state=optimizer.init(params))


def _run(model_name, grad, mnist, steps, optimizer=None, dtype=jnp.float32):
    train_set, _ = mnist
    model = get_model(model_name)
    optimizer = optimizer or optax.sgd(0.05, momentum=0.9)
    state = train.init_train_state(model, optimizer, jax.random.key(0), (28, 28, 1), 10)
    if dtype == jnp.float64:
        state = _float64(state, optimizer)
    step = train.make_train_step(model.apply, optimizer, grad=grad)
    losses = []
    for i, (x, y) in zip(range(steps), data.batches(train_set, 64, seed=0, **NORM)):
        state, metrics = step(state, jnp.asarray(x, dtype), y)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_few_steps_lower_the_loss_on_real_mnist(mnist):
    state, losses = _run("lenet5", "manual", mnist, 30)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    ev = train.evaluate(train.make_eval_step(get_model("lenet5").apply), state,
                        data.batches(mnist[1], 256, train=False, **NORM))
    assert ev["count"] == 1000 and ev["accuracy"] > 0.4       # chance is 0.1
    assert int(state.step) == 30


def test_manual_and_autodiff_steps_agree_lenet(mnist):
    """LeNet: the same 10 steps from the same state give the same parameters, in float64 (where
    summation order cannot move a ReLU or a max pool; float32 is jbp.accuracy's verdict,
    tests/test_accuracy.py)."""
    manual, lm = _run("lenet5", "manual", mnist, 10, dtype=jnp.float64)
    auto, la = _run("lenet5", "autodiff", mnist, 10, dtype=jnp.float64)
    np.testing.assert_allclose(lm, la, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(manual.params), jax.tree.leaves(auto.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9,
                                   atol=1e-12 * float(np.max(np.abs(b))))


def test_manual_and_autodiff_steps_agree_resnet20(mnist):
    """ResNet-20 (batch norm): one step's update, new running statistics and optimiser state
    agree in float64. In float32 two correct gradients differ by up to 1e-2 here (batch norm's
    cancellations, ReLUs flipped by rounding), by how much depends on the CPU; the float32
    gradient is held against float64 beside autodiff's in tests/test_accuracy.py."""
    train_set, _ = mnist
    model = get_model("resnet20")
    optimizer = optax.sgd(0.1, momentum=0.9)
    x, y = next(data.batches(train_set, 32, seed=0, **NORM))
    state = _float64(train.init_train_state(model, optimizer, jax.random.key(0), (28, 28, 1),
                                            10), optimizer)
    outs = [jax.tree.leaves(train.make_train_step(model.apply, optimizer, grad=g, donate=False)(
        state, jnp.asarray(x, jnp.float64), y)[0][:3]) for g in ("manual", "autodiff")]
    for a, b in zip(*outs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9,
                                   atol=1e-12 * max(float(np.max(np.abs(b))), 1e-30))


@pytest.mark.parametrize("name", train.OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name, mnist):
    opt = train.make_optimizer(name, train.make_schedule("cosine", 0.01, 20, warmup_steps=5),
                               weight_decay=1e-4, clip_norm=1.0)
    _, losses = _run("seed_cnn", "manual", mnist, 3, optimizer=opt)
    assert all(np.isfinite(losses))


def test_schedules_by_hand():
    cos = train.make_schedule("cosine", 0.1, 100, warmup_steps=10)
    assert float(cos(0)) == 0.0 and float(cos(5)) == pytest.approx(0.05)
    assert float(cos(10)) == pytest.approx(0.1)
    # halfway through the decay (step 55 of 10..100): 0.1 · (1 + cos(π/2)) / 2 = 0.05
    assert float(cos(55)) == pytest.approx(0.05, rel=1e-5)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    step = train.make_schedule("step", 0.1, 100, boundaries=(0.5, 0.75), decay=0.1)
    assert [float(step(s)) for s in (0, 49, 51, 76)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert float(train.make_schedule("constant", 0.3, 10)(7)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"schedule: expected one of"):
        train.make_schedule("linear", 0.1, 10)


def test_weight_decay_skips_biases_and_clipping_bounds_the_update():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
    zero = jax.tree.map(jnp.zeros_like, params)
    opt = train.make_optimizer("sgd", 1.0, weight_decay=0.1)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1)             # −lr · wd · w
    np.testing.assert_allclose(updates["b"], 0.0)
    opt = train.make_optimizer("sgd", 1.0, clip_norm=1.0)
    big = {"w": jnp.full((2, 2), 10.0), "b": jnp.zeros((2,))}
    updates, _ = opt.update(big, opt.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-6)


def test_accuracy_only_where_labels_are_classes():
    """Class indices give an accuracy; an mse target (one-hot floats) gives none, train or eval."""
    model = get_model("seed_cnn")
    optimizer = optax.sgd(0.1)
    state = train.init_train_state(model, optimizer, jax.random.key(0), (8, 8, 1), 3)
    x, labels = jnp.ones((4, 8, 8, 1), jnp.float32), jnp.array([0, 1, 2, 0])
    _, metrics = train.make_train_step(model.apply, optimizer, donate=False)(state, x, labels)
    assert 0 <= float(metrics["accuracy"]) <= 1
    target = jax.nn.one_hot(labels, 3, dtype=jnp.float32)
    _, metrics = train.make_train_step(model.apply, optimizer, "mse", donate=False)(
        state, x, target)
    assert "accuracy" not in metrics and np.isfinite(float(metrics["loss"]))
    ev = train.evaluate(train.make_eval_step(model.apply, "mse"), state, [(x, target)])
    assert ev["accuracy"] is None and ev["count"] == 4


def test_fit_runs_a_config_and_returns_its_summary(tmp_path):
    """The library call scripts/train.py makes: the summary it returns is summary.json, the
    records it reports are metrics.jsonl, and the run directory is its own."""
    from jbp import config
    cfg = config.load(os.path.join(ROOT, "configs", "seed_example.toml"), [
        "data.train_limit=192", "data.test_limit=100", "train.epochs=2", "train.log_every=2"])
    run, seen = str(tmp_path / "run"), []
    summary = train.fit(cfg, run, on_metrics=seen.append, verbose=False)
    assert json.loads(json.dumps(summary)) == json.load(open(os.path.join(run, "summary.json")))
    assert summary["status"] == "finished" and summary["steps"] == 6
    assert summary["conv_backend"].startswith(("onednn", "xla"))
    assert seen == [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [r["epoch"] for r in seen if r["kind"] == "eval"] == [1, 2]
    with pytest.raises(train.RunDirError, match="--overwrite"):
        train.fit(cfg, run, verbose=False)
    again = train.fit(cfg, run, resume=True, verbose=False)
    assert again["status"] == "already finished"
    assert again["test_accuracy"] == summary["test_accuracy"]


def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_train_cli_end_to_end(tmp_path):
    out = tmp_path / "run"
    proc = _script("train.py", "--set", "train.epochs=2", "--set", "data.train_limit=640",
                   "--set", "data.test_limit=500", "--set", "train.log_every=5",
                   "--grad", "autodiff", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done: test accuracy" in proc.stdout and "images/s" in proc.stdout
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert sum(r["kind"] == "train" for r in records) == 4          # 20 steps, every 5
    summary = json.load(open(out / "summary.json"))
    assert summary["grad"] == "autodiff" and 0.2 < summary["test_accuracy"] <= 1.0  # chance 0.1
    assert "grad = \"autodiff\"" in (out / "config.toml").read_text()
    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").stat().st_size > 10_000
    except ImportError:
        assert "matplotlib is not installed" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--set", "optim.lrr=0.1"], "optim.lrr: unknown key"),
    (["--set", "data.dataset=npz", "--set", "data.path=/no/such.npz",
      "--set", "data.test_path=/no/test.npz"], "/no/such.npz: no such file"),
    (["--set", "model.num_classes=5"], "found label 9 but the model has num_classes=5"),
    (["--config", "configs/nope.toml"], "configs/nope.toml: config file not found"),
])
def test_train_cli_clear_errors(tmp_path, args, message):
    proc = _script("train.py", "--out", str(tmp_path / "r"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
def test_compare_cli(tmp_path):
    proc = _script("compare.py", "--config", "configs/lenet_mnist.toml", "--steps", "5",
                   "--set", "data.train_limit=640", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.load(open(tmp_path / "compare.json"))
    assert result["step0_ok"] and len(result["step0"]) == 10
    assert result["conv_backend"] in proc.stdout
    # The float32 verdict's two columns: each gradient against float64, both nonzero (float32
    # is not float64) and both at float32 rounding on LeNet-5 (no batch norm to amplify it).
    for row in result["step0"]:
        assert 0 < row["autodiff_error"] < 1e-5 and row["error"] <= row["bound"]
    assert "autodiff err" in proc.stdout and "verdict" in proc.stdout
    assert len(result["loss_manual"]) == 5


@pytest.mark.slow             # outside the fast loop (pytest -m 'not slow'); CI runs it
def test_compare_cli_exits_1_past_the_step0_tolerance(tmp_path):
    """LeNet-5's float32 step-0 gradients differ by ~1e-7 (the weight gradients sum in another
    order): a tolerance below that must fail the check, and say so."""
    proc = _script("compare.py", "--config", "configs/lenet_mnist.toml", "--steps", "1",
                   "--set", "data.train_limit=640", "--rtol", "1e-12", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout
    assert not json.load(open(tmp_path / "compare.json"))["step0_ok"]
    # Its directory is claimed as train.py's is: a second comparison into it is refused.
    again = _script("compare.py", "--config", "configs/lenet_mnist.toml", "--steps", "1",
                    "--out", str(tmp_path))
    assert again.returncode == 2 and "already holds a run" in again.stderr, again.stderr
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr

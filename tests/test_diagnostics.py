"""A short DP-SGD run through jbp.train.fit (train.dp in the config, ε in the summary), and
scripts/diagnostics.py on its checkpoints: per-example norms against vmap(grad) of the twin."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jbp
from jbp import config, train
from jbp.policy import LayerPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_dp_run_and_diagnostics_script(tmp_path):
    run = str(tmp_path / "run")
    cfg = config.load(os.path.join(ROOT, "configs", "lenet_mnist.toml"), [
        "data.train_limit=64", "data.test_limit=100", "train.batch_size=32", "train.epochs=2",
        "train.checkpoint_every=2", "train.dp={clip_norm=1.0, noise_multiplier=1.0}"])
    summary = train.fit(cfg, run, verbose=False)
    assert summary["status"] == "finished" and summary["delta"] == 1e-5
    # 4 steps at sampling rate 32/64 and σ = 1: the accountant's ε, finite and positive
    assert summary["epsilon"] == pytest.approx(train.privacy.epsilon(4, 32, 64, 1.0))
    assert 0 < summary["epsilon"] < 50

    diagnostics = _script("diagnostics")
    assert diagnostics.main([run, "--batch", "8"]) == 0
    with open(os.path.join(run, "diagnostics.json")) as f:
        points = json.load(f)["points"]
    assert [p["step"] for p in points] == [2, 4]
    assert all(np.isfinite(v) and v > 0 for p in points for v in p["snr"].values())

    # the per-example norms of the script's diagnose() against vmap(grad) of the autodiff twin
    model = jbp.models.get_model("lenet5")
    params, _ = model.init(jax.random.key(0), (28, 28, 1), 10)
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1), jnp.float32)
    y = jnp.arange(4)

    def ell(p, xn, yn):
        logits, _ = model.apply(p, {}, xn[None], train=False, layers=LayerPolicy("autodiff"))
        return jbp.autodiff.softmax_cross_entropy(logits, yn[None])
    grads = jax.vmap(jax.grad(ell), (None, 0, 0))(params, x, y)
    want = np.sqrt(sum(np.sum(np.reshape(g, (4, -1)) ** 2, 1) for g in jax.tree.leaves(grads)))
    got = diagnostics.diagnose(model.apply, params, {}, x, y)["norms"]
    np.testing.assert_allclose(got, want, rtol=2e-4)

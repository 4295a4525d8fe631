"""Data parallel on eight host devices: shard_map'd layers, sync batch norm, the sharded step.

XLA's device count is fixed when jax is first imported and all test modules share one process,
so the checks run once in a subprocess (tests/_mesh_checks.py, which sets
``--xla_force_host_platform_device_count=8``) and these tests read its JSON. References: the
same computation on the whole global batch on one device, float64.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

#: Outside the fast loop (``pytest -m 'not slow'``): 8 host devices in a subprocess. CI runs it.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-12


@pytest.fixture(scope="module")
def checks():
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "_mesh_checks.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    return result


def test_every_layer_under_shard_map_equals_the_global_batch(checks):
    layers = {k: v for k, v in checks["layers"].items() if "unsynced" not in k}
    families = {k.split(":")[1].split("[")[0] for k in layers}
    assert {"conv2d", "dense", "flatten", "relu", "leaky_relu", "sigmoid", "tanh", "softmax",
            "log_softmax", "max_pool", "avg_pool", "global_avg_pool", "batch_norm",
            "softmax_cross_entropy", "mse", "sigmoid_binary_cross_entropy", "conv_transpose2d",
            "upsample", "concat+pad"} <= families
    bad = {k: v for k, v in layers.items() if not v <= TOL}
    assert not bad, bad


def test_sync_batch_norm_manual_and_autodiff(checks):
    for ns in ("manual", "autodiff"):
        assert checks["layers"][f"{ns}:batch_norm[train, sync]"] <= TOL


def test_unsynced_batch_norm_is_not_the_global_batch(checks):
    # The control that shows the comparison can fail: per-device statistics differ.
    assert checks["layers"]["manual:batch_norm[train, unsynced]"] > 1e-3


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
@pytest.mark.parametrize("grad", ["manual", "autodiff"])
def test_sharded_step_equals_single_device_step(checks, model, grad):
    r = checks["steps"][f"{model}:{grad}"]
    assert r["params"] <= TOL and r["model_state"] <= TOL and r["opt_state"] <= TOL, r
    assert r["replicated"]


@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_manual_step_adds_no_collectives(checks, model):
    manual = checks["steps"][f"{model}:manual"]["collectives"]
    autodiff = checks["steps"][f"{model}:autodiff"]["collectives"]
    assert manual["all-reduce"] >= 1                  # the gradients are reduced at all
    for kind, count in manual.items():
        assert count <= autodiff[kind], (kind, manual, autodiff)


def test_errors_and_explicit_mesh(checks):
    err = checks["errors"]
    assert "12" in err["indivisible"] and "8" in err["indivisible"]
    assert "'data'" in err["no_data_axis"]
    assert err["explicit_mesh"] <= TOL


def test_quantities_and_dp_sgd_under_the_mesh(checks):
    """jbp.quantities.compute(mesh=) (per-example results sharded over the examples, sums over
    the devices) and the DP-SGD step with mesh= (each device clips its examples, the clipped sum
    over the devices, the same noise) equal the one-device calls."""
    q = checks["quantities"]
    for name in ("batch_grad", "batch_l2", "sum_grad_squared", "variance", "diag_ggn", "kfac",
                 "loss", "grad"):
        assert q[f"compute:{name}"] <= 1e-12, name
    assert q["batch_l2_sharded"] == "P('data',)"
    assert q["indivisible"].startswith("x: 12 examples do not split evenly over the mesh's 8")
    for noise in ("1.0",):
        assert q[f"dp:{noise}:update"] <= 1e-12 and q[f"dp:{noise}:norms"] <= 1e-12
        got, want = q[f"dp:{noise}:clipped_fraction"]
        assert got == want == 0.5          # the clip norm is the median: half are clipped

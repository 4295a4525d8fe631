"""The README's main job, scripts/gradcheck.py, as a user runs it."""

import os
import subprocess
import sys

import pytest

#: Outside the fast loop (``pytest -m 'not slow'``): the scripts in subprocesses. CI runs it.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gradcheck.py")


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_unknown_layer_is_a_clear_error():
    proc = _run("--layer", "conv3d")
    assert proc.returncode == 2
    assert "no cases for layer 'conv3d'" in proc.stderr and "conv2d" in proc.stderr


def test_one_layer_prints_table_and_passes():
    """The script on one layer: a row per case, each passing, in all four columns (PyTorch's
    where torch is installed). Every case of the grid against every reference is
    tests/test_grid.py's (autodiff in float32 and float64, finite differences, PyTorch), case
    by case across the workers, rather than this script over the whole grid in one 300 s
    process."""
    from jbp.testing.grid import CASES
    try:
        import torch  # noqa: F401
        args = ()
    except ImportError:
        args = ("--no-torch",)
    proc = _run("--layer", "relu", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("relu ")]
    n = sum(case.layer == "relu" for case in CASES)
    assert n >= 2 and len(rows) == n and all(r.rstrip().endswith("pass") for r in rows)
    if not args:
        assert "PyTorch oracle on" in proc.stdout
        assert all(" n/a" not in r for r in rows), rows
    assert f"{n} passed, 0 failed" in proc.stdout

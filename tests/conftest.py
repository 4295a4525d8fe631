"""Test configuration: float64 available everywhere (finite differences need it).

float32 tests pass float32 arrays explicitly; enabling x64 does not change their dtype.
"""

import os

# Under pytest-xdist (-n 2: one worker per core) each worker's oneDNN kernels run on one OpenMP
# thread, so two workers' teams never spin against each other on two cores (docs/onednn.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))

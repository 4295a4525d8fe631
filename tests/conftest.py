"""Test configuration: float64 available everywhere (finite differences need it).

float32 tests pass float32 arrays explicitly; enabling x64 does not change their dtype.
"""

import os

# Under pytest-xdist (-n 2: one worker per core) each worker's oneDNN kernels run on one OpenMP
# thread, so two workers' teams never spin against each other on two cores (docs/onednn.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# XLA's loop emitters instead of its newer fusion emitters for every program of the suite and of
# the processes it starts (docs/testing.md, "Compiling faster"): XLA:CPU compiles most of the
# suite's time, and this option alone cut a grid sample's CPU time from 141 to 100 s, with every
# assertion unchanged. The float32 verdict (tests/test_accuracy.py) passes under both emitters;
# .ci/run also runs it once with XLA's defaults. JBP_TEST_XLA_DEFAULTS=1 leaves XLA_FLAGS alone.
_LOOP_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
if not os.environ.get("JBP_TEST_XLA_DEFAULTS") and \
        "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_LOOP_EMITTERS}".strip()

# One persistent JAX compilation cache for the whole run (docs/testing.md): the workers and the
# scripts the tests start (train.py, compare.py, launch.py, ...) compile the same programs again
# and again; measured on the subprocess-heavy files, 178 -> 142 s. Made by the first process (the
# xdist controller, or the only one with -n 0), inherited by every other, removed at the end.
# A cache the user set up is used as it is and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jbp-test-jax-cache-")
    os.environ["JBP_TEST_OWNS_JAX_CACHE"] = str(os.getpid())
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.monitoring  # noqa: E402

jax.config.update("jax_enable_x64", True)

# Where the suite's time goes (docs/testing.md): with JBP_TEST_STATS=DIR each process of the
# run (each xdist worker) writes DIR/<worker>-<pid>.json: its wall time and the count and seconds of
# the programs it traced, lowered and compiled (docs/testing.md adds them up).
_STATS_DIR = os.environ.get("JBP_TEST_STATS")
_compile_events = {}


def _on_duration(name, seconds, **_):
    count, total = _compile_events.get(name, (0, 0.0))
    _compile_events[name] = (count + 1, total + seconds)


if _STATS_DIR:
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _START = time.perf_counter()

# Per test (with JBP_TEST_STATS): wall and CPU seconds (all threads of the process; on a shared
# machine CPU seconds are the steadier measure) and the seconds spent compiling with XLA.
_per_test = {}
_COMPILE = "/jax/core/compile/backend_compile_duration"


def _children_cpu():
    t = os.times()
    return t.children_user + t.children_system


if _STATS_DIR:
    import pytest  # noqa: E402

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        wall, cpu, child = time.perf_counter(), time.process_time(), _children_cpu()
        count, compile_s = _compile_events.get(_COMPILE, (0, 0.0))
        yield
        count2, compile_s2 = _compile_events.get(_COMPILE, (0, 0.0))
        _per_test[item.nodeid] = {"wall_s": round(time.perf_counter() - wall, 2),
                                  "cpu_s": round(time.process_time() - cpu, 2),
                                  "subprocess_cpu_s": round(_children_cpu() - child, 2),
                                  "compiles": count2 - count,
                                  "compile_s": round(compile_s2 - compile_s, 2)}


def pytest_unconfigure(config):
    if os.environ.get("JBP_TEST_OWNS_JAX_CACHE") == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_sessionfinish(session):
    if not _STATS_DIR:
        return
    os.makedirs(_STATS_DIR, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(_STATS_DIR, f"{worker}-{os.getpid()}.json"), "w") as f:
        json.dump({"wall_s": time.perf_counter() - _START, "cpu_s": time.process_time(),
                   "tests": _per_test,
                   "events": {k: {"count": c, "seconds": t}
                              for k, (c, t) in sorted(_compile_events.items())}}, f, indent=1)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject's addopts): one worker per core this process may use, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))

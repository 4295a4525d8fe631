"""scripts/bench.py and its reference models: the variants it times must be the same network.

The plain-lax reference and the PyTorch model are checked against jbp's own forward and
gradients at the same parameters; the FLOP count against a hand calculation; and a one-config
run of the benchmark against the JSON schema the issue asks for."""

import importlib.util
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jbp.models import get_model
from jbp.testing import reference_models
from jbp.train import make_loss

#: Outside the fast loop (``pytest -m 'not slow'``): benchmark models and PyTorch. CI runs it.
pytestmark = pytest.mark.slow

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "scripts")


def _load(name):
    """A script as a module (scripts/ is not a package): for bench.py's pure helpers."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup(name, shape, n=4, classes=10):
    params, state = get_model(name).init(jax.random.PRNGKey(0), shape, classes)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, (n, *shape[:2]) if name == "unet" else n),
                    jnp.int32)
    return params, state, x, y


@pytest.mark.parametrize("name,shape", [("lenet5", (28, 28, 1)), ("resnet20", (16, 16, 3)),
                                        ("unet", (16, 16, 1))])
def test_lax_reference_matches_jbp(name, shape):
    """The benchmark's plain-lax model is jbp's model: compared in float64, where neither
    summation order nor a ReLU flipped by float32 rounding can tell them apart
    (docs/precision.md: two correct float32 ResNet gradients may differ by 1e-2)."""
    params, state, x, y = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64)
                                       if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                       _setup(name, shape))
    ours = make_loss(get_model(name).apply, grad="manual")
    ref = make_loss(reference_models.lax_apply(name), reference_models.lax_loss, grad="autodiff")
    (l1, (_, s1)), g1 = jax.jit(jax.value_and_grad(ours, has_aux=True))(params, state, x, y)
    (l2, (_, s2)), g2 = jax.jit(jax.value_and_grad(ref, has_aux=True))(params, state, x, y)
    np.testing.assert_allclose(l1, l2, rtol=1e-12)
    chex.assert_trees_all_equal_shapes_and_dtypes((g1, s1), (g2, s2))   # zip would stop short
    for a, b in zip(jax.tree.leaves((g1, s1)), jax.tree.leaves((g2, s2))):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("name,shape", [("lenet5", (28, 28, 1)), ("resnet20", (16, 16, 3)),
                                        ("unet", (16, 16, 1))])
def test_torch_model_matches_jbp(name, shape):
    torch = pytest.importorskip("torch")
    params, state, x, y = _setup(name, shape)
    logits, _ = get_model(name).apply(params, state, x, train=True)
    module = reference_models.torch_model(name, params, state).train()
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    out = module(xt).detach().numpy()
    if out.ndim == 4:                         # the U-Net's per-pixel logits, NCHW -> NHWC
        out = out.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, np.asarray(logits), rtol=1e-4, atol=1e-4)


def test_forward_flops_by_hand():
    params, state, x, _ = _setup("lenet5", (28, 28, 1), n=3)
    n = 3
    conv1 = 2 * n * 28 * 28 * 6 * (5 * 5 * 1)
    conv2 = 2 * n * 10 * 10 * 16 * (5 * 5 * 6)
    fc = 2 * n * (400 * 120 + 120 * 84 + 84 * 10)
    assert reference_models.forward_flops("lenet5", params, state, x) == conv1 + conv2 + fc


def test_bench_runs_and_writes_the_json_rows(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, "bench.py"), "--configs", "lenet5_b128",
         "--steps", "2", "--warmup", "0", "--env", "default", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    variants = {r["variant"] for r in rows}
    assert {"manual", "autodiff", "lax_reference"} <= variants
    for r in rows:
        for key in ("model", "batch", "variant", "step_ms_median", "step_ms_min", "step_ms_max",
                    "temp_bytes", "gflops"):
            assert key in r
        assert r["model"] == "lenet5" and r["batch"] == 128
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert r["ratio_paired_min"] <= r["ratio_to_manual_paired"] <= r["ratio_paired_max"]
        if r["variant"] == "manual":
            assert r["ratio_to_manual_paired"] == 1.0
        assert (r["temp_bytes"] is None) == (r["variant"] == "torch")
    # Step-0 losses agree across variants (the script exits non-zero otherwise).
    losses = [r["loss0"] for r in rows]
    assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0]))
    assert "| lenet5 | 128 | manual |" in proc.stdout


def test_bench_rejects_unknown_config():
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench.py"), "--configs",
                           "vgg16"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown" in proc.stderr


def test_paired_ratios_by_hand():
    bench = _load("bench")
    # Rounds 2-3 ran 30% slower for both variants; round 5's variant block alone was slow.
    manual = [100.0, 130.0, 130.0, 100.0, 100.0]
    variant = [70.0, 91.0, 91.0, 70.0, 75.0]
    ratios = bench.paired_ratios(variant, manual)
    np.testing.assert_allclose(ratios, [0.7, 0.7, 0.7, 0.7, 0.75])
    assert float(np.median(ratios)) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="rounds"):
        bench.paired_ratios(variant[:3], manual)


def test_inverted_residual_flops_are_torchvisions():
    """The bench's FLOP count of the two inverted-residual rows: twice torchvision's documented
    multiply-adds per 224×224 image (its weights' ``_ops``: 0.301 and 0.386 G), 4 images."""
    for name, gmacs in (("mobilenet_v2", 0.301), ("efficientnet_b0", 0.386)):
        params, state = jax.eval_shape(lambda: get_model(name).init(
            jax.random.PRNGKey(0), (224, 224, 3), 1000))
        x = jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32)
        flops = reference_models.forward_flops(name, params, state, x)
        assert flops / (4 * 2e9) == pytest.approx(gmacs, abs=5e-4), name


def test_torchvision_bench_models_match_jbp():
    """The torch variant of the inverted-residual rows is torchvision's model holding jbp's
    weights (train mode, no dropout or stochastic depth), equal to jbp's float32 forward."""
    torch = pytest.importorskip("torch")
    for name in ("mobilenet_v2", "efficientnet_b0"):
        params, state, x, _ = _setup(name, (64, 64, 3), n=2)
        logits, _ = jax.jit(lambda p, s, x: get_model(name).apply(p, s, x, train=True))(
            params, state, x)
        module = reference_models.torch_model(name, params, state).train()
        out = module(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)).detach().numpy()
        np.testing.assert_allclose(out, np.asarray(logits), rtol=1e-3, atol=1e-4)


def _bench(*argv, env=None, timeout=600):
    # Loading torchvision in this process (the tests above) sets TORCHINDUCTOR_CACHE_DIR to
    # Inductor's shared default as a side effect: not passed on, so that bench's torch-compile
    # compiles afresh as it does when run by hand.
    env = {k: v for k, v in dict(os.environ, **(env or {})).items()
           if k != "TORCHINDUCTOR_CACHE_DIR"}
    return subprocess.run([sys.executable, os.path.join(SCRIPTS, "bench.py"), "--configs",
                           "lenet5_b128", "--steps", "2", "--warmup", "0", "--env", "default",
                           *argv], capture_output=True, text=True, timeout=timeout, env=env)


def _spinners():
    """Pids of live --contend spinners (their command line carries bench's mark)."""
    import glob
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"jbp-bench-spinner" in argv and b"-c" in argv:     # a spinner, not this grep
            pids.append(int(path.split("/")[2]))
    return pids


def test_bench_torch_compile_variant(tmp_path):
    """torch-compile: the eager step under torch.compile, in its own child; its compile time
    is reported apart (the "compile s" column) and its step-0 loss is the others' (the script
    exits non-zero otherwise, and the rows carry the losses)."""
    pytest.importorskip("torch")
    import shutil
    out = tmp_path / "bench.json"
    proc = _bench("--variants", "manual,torch,torch-compile", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads(out.read_text())}
    if shutil.which(os.environ.get("CXX", "g++")) is None:       # no Inductor here: a note
        assert "needs a C++ compiler" in proc.stderr and "torch-compile" not in rows
        return
    compiled, eager = rows["torch-compile"], rows["torch"]
    assert compiled["compile_s"] > 0 and eager["compile_s"] is None
    assert compiled["temp_bytes"] is None and compiled["conv_backend"] == "torch inductor"
    # a first compile (a fresh Inductor cache), in the first call or two (the optimizer's
    # momentum buffers appear at step 1)
    info = compiled["torch_compile"]
    assert info["cache_hits"] == 0 and info["cache_misses"] > 0 and 1 <= info["calls"] <= 3
    for v in ("torch", "torch-compile"):
        assert abs(rows[v]["loss0"] - rows["manual"]["loss0"]) < 1e-4 * rows["manual"]["loss0"]
    assert "torch-compile: compiled in" in proc.stderr
    line = next(l for l in proc.stdout.splitlines() if "| torch-compile |" in l)
    assert f"| {compiled['compile_s']:.1f} |" in line          # the compile column is filled


def test_bench_contend_reports_slowdown_and_leaves_no_spinner(tmp_path):
    """--contend 1: each row's slowdown under contention is its contended median over its
    quiet one, the table has the column, no spinner outlives the run. In the same run (one
    bench start for both): without a C++ compiler for Inductor, torch-compile is skipped with a
    sentence saying why, and the rest runs, no traceback."""
    before = set(_spinners())
    out = tmp_path / "bench.json"
    torch = importlib.util.find_spec("torch") is not None
    proc = _bench("--variants", "manual,torch-compile" if torch else "manual", "--contend", "1",
                  "--json", str(out), env={"CXX": "/nonexistent/c++"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["variant"] == "manual" and row["contend"] == 1
    assert row["slowdown_contended"] == pytest.approx(
        row["step_ms_median_contended"] / row["step_ms_median"])
    head = next(l for l in proc.stdout.splitlines() if l.startswith("| model |"))
    assert head.endswith("| slowdown under contention |")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("| lenet5 | 128 | manual |"))
    assert line.endswith(f" {row['slowdown_contended']:.2f} |")
    assert "with 1 spinners:" in proc.stderr
    assert set(_spinners()) <= before
    if torch:
        assert "torch.compile (Inductor, CPU) needs a C++ compiler" in proc.stderr
        assert "Traceback" not in proc.stderr and "| torch-compile |" not in proc.stdout


def test_contention_spinners_die_on_every_exit():
    """The spinners run only between run() and pause(), and are gone after the with block
    however it ends (exception, Ctrl-C, sys.exit), and when the parent is killed outright."""
    bench = _load("bench")
    for exc in (RuntimeError, KeyboardInterrupt, SystemExit):
        with pytest.raises(exc):
            with bench.Contention(2) as spinners:
                pids = [p.pid for p in spinners.procs]
                assert len(set(os.getpgid(p) for p in pids)) == 1      # one process group
                assert {bench._proc_state(p) for p in pids} <= {"T", "t"}  # start paused
                spinners.run()
                assert all(bench._proc_state(p) in ("R", "S") for p in pids)
                raise exc()
        assert all(bench._proc_state(p) is None for p in pids), exc
    # --contend-nice: the spinners take the niceness asked for (they stay paused here); one
    # below this process's needs a privilege, else it is a sentence, not a traceback
    want = os.nice(0) + 5 if os.nice(0) <= 14 else os.nice(0) - 1
    try:
        with bench.Contention(1, nice=want) as spinners:
            with open(f"/proc/{spinners.procs[0].pid}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[16]) == want   # field 19: nice
    except RuntimeError as e:
        assert want < os.nice(0) and "without privileges" in str(e)
    # SIGKILL of the parent: no finally runs; the kernel kills the spinners (PDEATHSIG).
    code = (f"import importlib.util, os, signal, sys\n"
            f"spec = importlib.util.spec_from_file_location('b', {os.path.join(SCRIPTS, 'bench.py')!r})\n"
            f"b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)\n"
            f"c = b.Contention(1).__enter__(); c.run()\n"
            f"print(c.procs[0].pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    pid = int(proc.stdout.split()[0])
    import time
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid):
    """A live process (a zombie awaiting its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_profile_exclusive_times_by_hand():
    """scripts/profile_step.py sums each event's time minus its nested events' (a conditional
    thunk holding the thunks of its branch): by hand, on one thread and two."""
    prof = _load("profile_step")
    events = [{"name": "conditional.1", "ts": 0, "dur": 10, "pid": 1, "tid": 1},
              {"name": "ffi_call.2", "ts": 1, "dur": 3, "pid": 1, "tid": 1},
              {"name": "fusion.3", "ts": 5, "dur": 4, "pid": 1, "tid": 1},
              {"name": "fusion.4", "ts": 12, "dur": 2, "pid": 1, "tid": 1},
              {"name": "fusion.4", "ts": 2, "dur": 6, "pid": 1, "tid": 2}]  # another thread
    assert prof._exclusive_times(events) == {"conditional.1": [3], "ffi_call.2": [3],
                                             "fusion.3": [4], "fusion.4": [2, 6]}


def test_profile_step_sorts_every_equation_of_a_step(tmp_path):
    """One LeNet-5 step, profiled on both sides: every thunk of jbp's trace is an instruction
    of the compiled step and lands in a kind; the three convolution equations, ReLU, pooling,
    the dense layers and the optimizer each take time on both sides; no batch norm (LeNet-5
    has none); with ``--quantity batch_l2`` the per-example weight gradients are their own
    rows."""
    prof = _load("profile_step")
    jbp_side = prof.profile_jbp("lenet5", 8, (28, 28, 1), 10, 2, str(tmp_path))
    kinds = jbp_side["kinds"]
    assert jbp_side["events_per_step"] > 10
    for kind in ("conv forward", "conv input grad", "conv weight grad", "ReLU", "pooling",
                 "dense", "optimizer"):
        assert kinds.get(kind, 0) > 0, (kind, kinds)
    assert "batch norm" not in kinds and set(kinds) <= set(prof.KINDS)
    # with batch_l2, the per-example weight gradients are tagged apart from the batch's
    q_kinds = prof.profile_jbp("lenet5", 8, (28, 28, 1), 10, 2, str(tmp_path / "q"),
                               quantity="batch_l2")["kinds"]
    assert q_kinds.get("conv weight grad [quantities]", 0) > 0, q_kinds
    assert q_kinds.get("conv weight grad", 0) > 0 and "conv forward [quantities]" not in q_kinds
    # the profiled thunks account for the step (not more than the traced wall time on the
    # main thread plus XLA's second worker)
    assert 0 < sum(kinds.values()) < 2.5 * jbp_side["traced_wall_ms"]
    torch_side = prof.profile_torch("lenet5", 8, (28, 28, 1), 10, 2, threads=1)
    for kind in ("conv forward", "conv input+weight grad", "ReLU", "pooling", "dense",
                 "optimizer"):
        assert torch_side["kinds"].get(kind, 0) > 0, (kind, torch_side["kinds"])
    assert "batch norm" not in torch_side["kinds"]

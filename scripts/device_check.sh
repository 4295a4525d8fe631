#!/usr/bin/env bash
# The prepared accelerator check: run on a machine with a GPU (jax with CUDA installed), from the
# repository root, in under 8 minutes:
#
#     bash scripts/device_check.sh                       # PYTHON=python3 by default
#     PYTHON=.venv/bin/python PEAK_TFLOPS_BF16=989 PEAK_TFLOPS_F32=67 bash scripts/device_check.sh
#
# 1. the gradient-check grid (scripts/gradcheck.py) on the GPU;
# 2. the test files that need no PyTorch, on the GPU (the CPU-only 8-device and multi-process
#    tests are left to CI);
# 3. scripts/bench.py, manual vs autodiff, for lenet5 b128/b1024, resnet20 b128/b512 and
#    resnet18 b64 (224x224), in f32 and bf16, with "% peak" (MFU) against the device: the
#    matmul peak the bench measures in the same dtype, or the datasheet peak when
#    PEAK_TFLOPS_F32 / PEAK_TFLOPS_BF16 are set (H200 SXM: 67 f32 without tensor cores,
#    989 bf16 dense);
# and prints one table at the end, with every stage's status. Each stage has its own timeout
# (60 + 180 + 2 x 105 s of work, under 8 minutes with start-up); a stage that fails or times out
# is reported and the next one still runs. Output files go to $OUT (default: a temp folder).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false          # several processes share the GPU in turn
START=$SECONDS
declare -A STATUS

stage() {   # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    STATUS[$name]="rc=$rc in $((SECONDS - t0))s"
    [ $rc -eq 124 ] && STATUS[$name]+=" (timed out)"
    echo "=== $name: ${STATUS[$name]}"
}

"$PY" - <<'EOF' || { echo "device_check: jax does not see a GPU here; nothing to check"; exit 2; }
import jax
print("jax", jax.__version__, "devices:", jax.devices())
assert jax.default_backend() == "gpu", jax.default_backend()
EOF

stage gradcheck 60 "$PY" scripts/gradcheck.py

# Test files that import no torch (scanned, so new files join automatically); the ones that
# need host CPU devices or several processes are CPU-only by design.
TESTS=$(grep -L -E "import torch|_torch|torch_oracle|bench" tests/test_*.py \
        | grep -v -E "test_data_parallel|test_multiprocess|test_scripts" | tr '\n' ' ')
stage tests 180 "$PY" -m pytest -x -q -p no:cacheprovider $TESTS

CONFIGS=lenet5_b128,lenet5_b1024,resnet20_b128,resnet20_b512,resnet18_b64
for prec in f32 bf16; do
    peak_var="PEAK_TFLOPS_${prec^^}"
    peak_arg=()
    [ -n "${!peak_var:-}" ] && peak_arg=(--peak-tflops "${!peak_var}")
    stage "bench_$prec" 105 "$PY" scripts/bench.py --device gpu --configs "$CONFIGS" \
        --variants manual,autodiff --precision "$prec" --steps 10 --warmup 2 --block 5 \
        "${peak_arg[@]}" --json "$OUT/bench_$prec.json"
done

echo
echo "=== device check: $(( SECONDS - START )) s in all; files in $OUT"
for name in gradcheck tests bench_f32 bench_bf16; do
    echo "  $name: ${STATUS[$name]:-not run}"
done
"$PY" - "$OUT" <<'EOF'
import importlib.util, json, os, sys
out = sys.argv[1]
spec = importlib.util.spec_from_file_location("bench", os.path.join("scripts", "bench.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
rows = []
for prec in ("f32", "bf16"):
    path = os.path.join(out, f"bench_{prec}.json")
    if os.path.exists(path):          # written after every config: partial runs count too
        rows += json.load(open(path))
print()
print(bench.table(rows) if rows else "(no benchmark rows)")
EOF

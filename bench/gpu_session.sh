#!/usr/bin/env bash
# One session on an H100 machine without internet: build, CUDA tests, compute-sanitizer, full benchmark.
# Usage (from the repository root, torch and the build requirements installed):
#   bash bench/gpu_session.sh OUT_DIR        (or OUT=... bash bench/gpu_session.sh)
# Every step runs even when an earlier one failed; each logs to OUT_DIR/<step>.log; the summary comes last
# and the exit status is non-zero when any step failed.
set -u
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then echo "usage: $0 OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
SUMMARY=()
FAILED=0

step() {  # step NAME COMMAND...: run, log, time, record
    local name="$1"; shift
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$OUT_DIR/session.log"
    "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        SUMMARY+=("ok     $name (${dt}s)")
    else
        SUMMARY+=("FAILED $name (exit $rc, ${dt}s): see $OUT_DIR/$name.log")
        FAILED=1
    fi
    echo "   exit $rc after ${dt}s" | tee -a "$OUT_DIR/session.log"
    return 0
}

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version; } \
    >"$OUT_DIR/machine.txt" 2>&1
git rev-parse HEAD >>"$OUT_DIR/machine.txt" 2>/dev/null

step build "$PY" -m pip install --no-build-isolation --no-deps -v .
step build_info "$PY" -c "import linmix, json; print(json.dumps(linmix.build_info())); assert linmix.build_info()['cuda'], 'no CUDA backend'"
step tests "$PY" -m pytest -q -ra tests
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SAN" ]; then
    # torch's caching allocator would hide out-of-bounds accesses inside its pools: allocate each tensor exactly
    for tool in memcheck racecheck; do
        step "sanitize_$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool "$tool" --error-exitcode 1 \
            --target-processes all "$PY" -m linmix.bench.sanitize
    done
else
    SUMMARY+=("FAILED sanitize: compute-sanitizer not found (PATH, $CUDA_HOME/bin)"); FAILED=1
fi
step bench "$PY" -m linmix.bench --device cuda --op all --out "$OUT_DIR/results"
profile_cmds() { for op in selective_scan chunk_gla fixed_point linear_scan; do "$PY" -m linmix.bench --profile-cmd --op "$op"; done; }
step profile_cmds profile_cmds

echo
echo "== summary ($OUT_DIR)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -E "^(selective_scan|chunk_gla|fixed_point|linear_scan) +linmix " "$OUT_DIR/bench.log" 2>/dev/null | head -40
exit $FAILED

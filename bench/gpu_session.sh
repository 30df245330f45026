#!/usr/bin/env bash
# One session on an H100/H200 machine without internet: build, CUDA tests, compute-sanitizer, benchmark.
# Usage (from the repository root, torch and the build requirements installed):
#   bash bench/gpu_session.sh OUT_DIR        (or OUT=... bash bench/gpu_session.sh)
# Through the device tool, whose $OUT takes at most 8 files, pack the folder (about 8 minutes in all):
#   SESSION_S=555 bash bench/gpu_session.sh /tmp/gs; rc=$?; tar czf $OUT/gs.tgz -C /tmp gs; exit $rc
# A/B against another revision on the same card: here `mkdir -p .baseline && git archive -o .baseline/main.tar
# main`, then carry [".baseline"] and prefix the command with BASELINE_SRC=.baseline/main.tar.
# flash-linear-attention as a baseline: here `python3 -m pip download --no-deps --only-binary=:all: -d .whl
# fla-core==0.6.0` (pure Python; einops and Triton are on the image), then carry [".whl"].
# Every step runs even when an earlier one failed; each logs to OUT_DIR/<step>.log; the summary comes last
# and the exit status is non-zero when any step failed.
set -u
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then echo "usage: $0 OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# A session is short (minutes of device time): build for the chip in hand only, on every core, and bound each
# step so that the summary always comes back. Override any of these from the environment.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
export PYTHONUNBUFFERED=1
# SESSION_S bounds the whole script; the benchmark gets what the earlier steps leave of it.
SESSION_S="${SESSION_S:-560}" T_BUILD="${T_BUILD:-240}" T_TESTS="${T_TESTS:-120}" T_SAN="${T_SAN:-60}"
BENCH_ARGS="${BENCH_ARGS:---quick}"
PYTEST_ARGS=""
"$PY" -c "import xdist" 2>/dev/null && PYTEST_ARGS="-n 12 --dist loadgroup"
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS="$PYTEST_ARGS --timeout=120"
left() { echo $((SESSION_S - SECONDS)); }
SUMMARY=()
FAILED_LOGS=()
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
        FAILED_LOGS+=("$OUT_DIR/$name.log")
        FAILED=1
    fi
    echo "   exit $rc after ${dt}s" | tee -a "$OUT_DIR/session.log"
    return 0
}

{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nvcc --version; "$PY" -m pip list 2>/dev/null | grep -i -E "scikit|pybind|cmake|ninja|triton|pytest"; } \
    >"$OUT_DIR/machine.txt" 2>&1
git rev-parse HEAD >>"$OUT_DIR/machine.txt" 2>/dev/null

step build timeout "$T_BUILD" "$PY" -m pip install --no-build-isolation --no-deps -v .
step build_info "$PY" -c "import linmix, json; print(json.dumps(linmix.build_info())); assert linmix.build_info()['cuda'], 'no CUDA backend'"
# Baselines missing from the GPU image (no internet there) travel as wheels in .whl/ (carried; bench/NOTES.md
# says how to fetch them): installed before the tests (which compare
# against them where present) and the benchmark.
if ls .whl/*.whl >/dev/null 2>&1; then
    step baseline_wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/linmix_wheels .whl/*.whl
    export PYTHONPATH="/tmp/linmix_wheels${PYTHONPATH:+:$PYTHONPATH}"
fi
step tests timeout "$T_TESTS" env OMP_NUM_THREADS=1 "$PY" -m pytest -q -ra --tb=short $PYTEST_ARGS tests
# again with the kernels that have not yet run on a GPU switched on (bench/results/README.md lists them)
step tests_unverified timeout "$T_TESTS" env OMP_NUM_THREADS=1 LINMIX_UNVERIFIED_KERNELS=1 "$PY" -m pytest -q -ra --tb=short $PYTEST_ARGS tests
SAN="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
if [ -x "$SAN" ]; then
    # torch's caching allocator would hide out-of-bounds accesses inside its pools: allocate each tensor exactly
    SANCMD=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --error-exitcode 1 --target-processes all)
    for tool in memcheck synccheck; do
        step "sanitize_$tool" timeout "$T_SAN" "${SANCMD[@]}" --tool "$tool" "$PY" -m linmix.bench.sanitize
    done
    # racecheck is slow (it tracks every shared-memory access): one op at a time, each with its own bound
    for op in linear_scan selective_scan chunk_gla fused_recurrent_gla fixed_point_rnn selective_state_update; do
        step "racecheck_$op" timeout "$T_SAN" "${SANCMD[@]}" --tool racecheck "$PY" -m linmix.bench.sanitize "$op"
    done
    # Unverified kernels (their tests switch LINMIX_UNVERIFIED_KERNELS=1 on themselves): the tiled selective_scan
    # backward, atomic and deterministic, L = 129, n = 17, three B/C layouts.
    for tool in memcheck racecheck synccheck; do
        step "unverified_${tool}_selective_scan" timeout "$T_SAN" "${SANCMD[@]}" --tool "$tool" "$PY" -m pytest -q \
            -p no:cacheprovider tests/test_selective_scan_tiled.py -k "cuda_tiled_matches_reference and 129-17"
    done
    for tool in memcheck racecheck; do  # the unverified fused chunk_gla, warp forward, decode kernel
        for op in chunk_gla selective_scan selective_state_update; do
            step "${tool}_${op}_unverified" timeout "$T_SAN" env LINMIX_UNVERIFIED_KERNELS=1 "${SANCMD[@]}" --tool "$tool" \
                "$PY" -m linmix.bench.sanitize "$op"
        done
    done
else
    SUMMARY+=("FAILED sanitize: compute-sanitizer not found (PATH, $CUDA_HOME/bin)"); FAILED=1
fi
# Optional A/B on the same card: BASELINE_SRC is another linmix source tree or tarball (for example
# `git archive -o .baseline/main.tar main`, with .baseline in the device call's carry); it is built beside
# this tree and its linmix rows are timed right after this tree's, into OUT_DIR/baseline.
BASE_SITE=""
if [ -n "${BASELINE_SRC:-}" ]; then
    step baseline_build timeout "$T_BUILD" env BASELINE_SRC="$BASELINE_SRC" PY="$PY" bash -c '
        set -e; rm -rf /tmp/linmix_base /tmp/linmix_base_site; mkdir -p /tmp/linmix_base
        if [ -f "$BASELINE_SRC" ]; then tar xf "$BASELINE_SRC" -C /tmp/linmix_base; else cp -r "$BASELINE_SRC"/. /tmp/linmix_base; fi
        "$PY" -m pip install --no-build-isolation --no-deps --target /tmp/linmix_base_site /tmp/linmix_base'
    [ -d /tmp/linmix_base_site/linmix ] && BASE_SITE=/tmp/linmix_base_site
fi
# one run per op, so that a slow op cannot take the others' results with it
# op+unverified: the op again with LINMIX_UNVERIFIED_KERNELS=1 (warp-per-channel forward and tiled backward of
# selective_scan; the selective_state_update kernel), into results_unverified. op+FAMILY: linmix's rows again with
# LINMIX_KERNELS=FAMILY, into results_FAMILY: chunk_gla's serial default, fla and SDPA are timed in the plain run,
# the fused family right after it on the same card.
OPS=(linear_scan selective_scan selective_scan+unverified chunk_gla chunk_gla+gla_fused
     fixed_point_rnn selective_state_update selective_state_update+unverified)
for i in "${!OPS[@]}"; do
    op="${OPS[$i]%%+*}" tag="${OPS[$i]#*+}" extra=""
    name="$op" switch="LINMIX_UNVERIFIED_KERNELS=0" results="$OUT_DIR/results"
    if [ "$tag" = unverified ]; then
        name="${op}_unverified" switch="LINMIX_UNVERIFIED_KERNELS=1" results="$OUT_DIR/results_unverified"
    elif [ "$op" != "${OPS[$i]}" ]; then
        name="${op}_$tag" switch="LINMIX_KERNELS=$tag" results="$OUT_DIR/results_$tag" extra="--impl linmix"
    fi
    share=$(( ($(left) - 10) / (${#OPS[@]} - i) ))
    [ -n "$BASE_SITE" ] && share=$((share / 2))
    if [ "$share" -lt 20 ]; then SUMMARY+=("SKIPPED bench_$name: session time spent"); continue; fi
    # shellcheck disable=SC2086
    step "bench_$name" timeout "$share" env "$switch" "$PY" -m linmix.bench --device cuda --op "$op" $BENCH_ARGS $extra --out "$results"
    if [ -n "$BASE_SITE" ] && [ "$name" = "$op" ]; then
        step "baseline_$op" timeout "$share" env PYTHONPATH="$BASE_SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m linmix.bench --device cuda --op "$op" \
            --impl linmix $BENCH_ARGS --out "$OUT_DIR/baseline"
    fi
done
# packed sequences (cu_seqlens) against one sequence of the same tokens, every op that takes them: issue 22's GPU rows
if [ $(( $(left) - 10 )) -ge 30 ]; then
    step bench_varlen timeout $(( $(left) - 10 )) "$PY" -m linmix.bench --device cuda --varlen --out "$OUT_DIR/results"
else
    SUMMARY+=("SKIPPED bench_varlen: session time spent")
fi
profile_cmds() { for op in selective_scan chunk_gla fixed_point_rnn linear_scan; do "$PY" -m linmix.bench --profile-cmd --op "$op"; done; }
step profile_cmds profile_cmds

echo
echo "== summary ($OUT_DIR)"
for line in "${SUMMARY[@]}"; do echo "$line"; done
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/tests.log" "$OUT_DIR/tests_unverified.log" 2>/dev/null | head -60
grep -E "ERROR|error" "$OUT_DIR"/sanitize_*.log "$OUT_DIR"/racecheck_*.log 2>/dev/null | head -20
grep -E "^(selective_scan|selective_state_update|chunk_gla|fixed_point_rnn|linear_scan) +linmix " "$OUT_DIR"/bench_*.log 2>/dev/null | head -40
[ -n "$BASE_SITE" ] && echo "== baseline ($BASELINE_SRC)" && \
    grep -E "^(selective_scan|selective_state_update|chunk_gla|fixed_point_rnn|linear_scan) +linmix " "$OUT_DIR"/baseline_*.log 2>/dev/null | head -40
for log in "${FAILED_LOGS[@]}"; do echo "== tail of $log"; tail -n 25 "$log"; done
exit $FAILED

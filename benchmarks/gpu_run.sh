#!/usr/bin/env bash
# The round a lent H100/H200 runs (see ../shared/GPU_RUNBOOK.md, beside the repository, not in it), from the
# repository root, writing only under $OUT:
#
# A task is lent 15 minutes of device time in all (start, idle and every call included): call 1 is
# bounded at about 8 minutes so that it fits with the machine's start; run call 2 only with time to spare.
#
#   bash benchmarks/gpu_run.sh          # call 1 (< 9 min): versions, build, the on-device check ->
#                                       #   $OUT/<gpu>-<date>-check.json and $OUT/check.log, tests ->
#                                       #   $OUT/tests.log, benchmarks -> $OUT/<gpu>-<date>.json, $OUT/bench.log
#   bash benchmarks/gpu_run.sh extra    # call 2, same warm machine (< 10 min): the torch.compile
#                                       #   benchmarks -> $OUT/<gpu>-<date>-compiled.json, and the profile of
#                                       #   pvt_v2_b2 at 2048 -> $OUT/profile/
#
# Every phase has a time limit so that a call ends inside the device tool's 10 minutes; pytest is stopped
# with SIGINT, on which pytest-benchmark still writes the benchmarks finished so far (and the check writes the
# rows it finished, marked interrupted). At most 8 files come back from $OUT: this script writes at most 5
# (call 1) or 6 (call 2). `auto` resolves to sdpa on a GPU not yet verified for the fused kernels, so the
# benchmarks and the profile ask for fused explicitly (PVT_FAST_BACKEND=fused, --backend fused).
set -uo pipefail
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
stage=${1:-main}
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0))" | tr 'A-Z' 'a-z' | tr -cs 'a-z0-9\n' '-' | sed 's/-$//')
stamp=$(date -u +%Y%m%d-%H%M)
limit() { timeout -s INT -k 30 "$@"; }

build() {
    if [ "$stage" = extra ] && $PY -c "import pvt_fast._C" 2>/dev/null; then
        echo "== extension already built"
        return
    fi
    echo "== build (TORCH_CUDA_ARCH_LIST=9.0)"
    limit 150 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps -e . \
        2>&1 | tail -n 25
}

{
    echo "== $gpu, $stamp"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| triton', triton.__version__)"
    $PY -c "import timm; print('timm', timm.__version__)" || true
    build
} 2>&1 | tee "$OUT/versions.log"

if [ "$stage" = main ]; then
    echo "== check (fused vs composite on this GPU)"
    limit 120 $PY -m pvt_fast check --json "$OUT/$gpu-$stamp-check.json" 2>&1 | tee "$OUT/check.log" | tail -n 15
    echo "== tests"
    limit 120 $PY -m pytest tests -q -ra --maxfail=20 2>&1 | tee "$OUT/tests.log" | tail -n 30
    cat "$OUT/versions.log" >> "$OUT/tests.log"
    echo "== benchmarks"
    limit 120 env PVT_FAST_BACKEND=fused $PY -m pytest benchmarks/test_bench_sra_attention.py \
        benchmarks/test_bench_patch_embed.py benchmarks/test_bench_mlp_dwconv.py benchmarks/test_bench_model.py \
        -m "not compiled" -q -rs \
        --benchmark-max-time=0.5 --benchmark-json "$OUT/$gpu-$stamp.json" --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | tail -n 60
elif [ "$stage" = extra ]; then
    echo "== compiled benchmarks"
    limit 330 env PVT_FAST_BACKEND=fused $PY -m pytest benchmarks/test_bench_model.py -m compiled -q -rs \
        --benchmark-max-time=0.5 --benchmark-json "$OUT/$gpu-$stamp-compiled.json" --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench-compiled.log" | tail -n 30
    echo "== profile"
    limit 200 $PY -m pvt_fast profile --model pvt_v2_b2 --size 2048 --backend fused --compare reference \
        --out "$OUT/profile" 2>&1 | tail -n 40
    rm -f "$OUT/profile/trace-reference.json"  # keep the returned files under 8
else
    echo "usage: OUT=DIR bash benchmarks/gpu_run.sh [main|extra]" >&2
    exit 2
fi
rm -f "$OUT/versions.log"

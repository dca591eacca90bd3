#!/usr/bin/env bash
# Every GPU measurement of the CIFAR-10 grid-search issue, as one script for a short device loan:
#   1. cifar_convnet (256, 64) seconds per epoch on the GPU, float32 and bf16-mixed (bench_precision),
#      and the cost per step of the training loss's NaN check (bench_nan_check)
#   2. the full 12-model x 40-epoch grid (experiment=cifar10_grid), default callbacks on, data
#      resident on the GPU, N_JOBS jobs sharing the GPU through the joblib launcher; wall time
#   3. the grid's summary (per-model test accuracy, seconds per epoch, Fig. 6 plot) and each
#      callback's share of the time (viz_time/* against the epoch time), from the sweep's files
#   4. occlusion on the device: its CUDA test and bench_occlusion --approximate (issue #23)
#
#   DATA_DIR=../shared/datasets bash benchmarks/gpu_grid.sh          # on the GPU machine
#   GRID_TINY=1 DATA_DIR=../shared/datasets bash benchmarks/gpu_grid.sh  # CPU dry run: 2 models, 3 batches
#
# Everything lands in ${OUT:-benchmarks/artifacts/gpu_grid} (sweep dir, logs, gpu_grid.json, and the
# benchmarks' precision.json and nan_check.json, which leave the committed ones untouched).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/artifacts/gpu_grid}"
mkdir -p "$OUT"
export BENCH_JSON_DIR="$OUT"
# all 12 models at once: each small net leaves the GPU idle between its kernels (Python and launch
# time), so more processes fill the gaps; the CPU cores are split between them
N_JOBS="${N_JOBS:-12}"

if [ -n "${GRID_TINY:-}" ]; then
  TRAINER=(trainer=cpu)
  LIMITS=(trainer.max_epochs=1 ++trainer.limit_train_batches=3 ++trainer.limit_val_batches=2
          ++trainer.limit_test_batches=2 model.c3=64 model.c4=32,64)
  PRECISION_ARGS=(--batches 5 --rounds 1 --accelerator cpu)
  N_JOBS=2
else
  TRAINER=(trainer=gpu datamodule.resident=true)
  LIMITS=()
  PRECISION_ARGS=(--batches 200 --rounds 3 --accelerator gpu)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

echo "== 1. seconds per epoch by precision ($(date -u +%H:%M:%S))"
python benchmarks/bench_precision.py "${PRECISION_ARGS[@]}" experiment=cifar10_convnet "${TRAINER[@]}" \
  2>&1 | tail -8 | tee "$OUT/precision.txt" || echo "step 1 failed: see above; going on with the grid"
echo "== 1b. the NaN check's cost per step ($(date -u +%H:%M:%S))"
python benchmarks/bench_nan_check.py "${PRECISION_ARGS[@]}" experiment=cifar10_convnet "${TRAINER[@]}" \
  2>&1 | tail -7 | tee "$OUT/nan_check.txt" || echo "step 1b failed: see above; going on with the grid"

echo "== 2. the grid ($(date -u +%H:%M:%S))"
start=$(date +%s)
set +e
OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / N_JOBS > 0 ? $(nproc) / N_JOBS : 1 ))}" python train.py -m experiment=cifar10_grid "${TRAINER[@]}" "${LIMITS[@]}" \
  hydra/launcher=joblib hydra.launcher.n_jobs="$N_JOBS" hydra.sweep.dir="$OUT/sweep" \
  > "$OUT/grid.log" 2>&1
grid_rc=$?
set -e
wall=$(( $(date +%s) - start ))
echo "grid exit code $grid_rc, wall ${wall} s"

echo "== 3. summary and the callbacks' share ($(date -u +%H:%M:%S))"
python benchmarks/grid_share.py "$OUT/sweep" --wall "$wall" --exit-code "$grid_rc" --json "$OUT/gpu_grid.json"
cat "$OUT/sweep/summary.md" 2>/dev/null || true

# issue #23: occlusion on CUDA tensors (the approximate and incremental paths, no host syncs in the
# loop): the CUDA test, then bench_occlusion --approximate (-> $OUT/occlusion_approximate.json)
echo "== 4. occlusion on the device ($(date -u +%H:%M:%S))"
if [ -n "${GRID_TINY:-}" ]; then OCCLUSION_ARGS=(--quick --nets cifar --device cpu); else OCCLUSION_ARGS=(--device cuda); fi
python -m pytest -q tests/test_occlusion_approximate.py -k cuda 2>&1 | tail -3 | tee "$OUT/occlusion_cuda_test.txt" || true
python benchmarks/bench_occlusion.py --approximate "${OCCLUSION_ARGS[@]}" 2>&1 | tail -60 | tee "$OUT/occlusion.txt" \
  || echo "step 4 failed: see above"

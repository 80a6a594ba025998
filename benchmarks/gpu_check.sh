#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md in one run, at most 8 minutes on one GPU:
#   1. the step ratio GID / (student step + teacher forward) with AMP at 512 px for the three frameworks, and the
#      GPU's busy share during GID steps (kernel time over wall time, torch.profiler);
#   2. host syncs per GID step, as CUDA's sync debug mode reports them;
#   3. the data loader's images/s against what a GID step consumes;
#   4. a 4-trial sweep with gpus_per_worker 0.25: four trials share the card.
# What it prints also goes to $OUT/gpu_check.md (default runs/gpu-check); logs and data under $WORK.
#     bash benchmarks/gpu_check.sh             # on a GPU machine
#     bash benchmarks/gpu_check.sh --dry-run   # on the CPU, every part on a tiny input (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu-check}
WORK=${WORK:-$(mktemp -d /tmp/gid-gpu-check.XXXXXX)}
mkdir -p "$OUT" "$WORK"
REPORT="$OUT/gpu_check.md"

if [[ ${1:-} == --dry-run ]]; then
  DEVICE=(--device cpu) STEP=(--image-size 64 --batch-size 2 --iters 1 --warmup 1 --busy 1 --threads 1)
  SYNCS=(--image-size 64 --batch-size 2 --steps 4 --log-every 4 --every-steps 4) THREADS=1
  LOADER=(--image-size 64 --batch-size 2 --batches 2 --workers 0,1 --steps 1 --threads 1)
  DATA=(--train 16 --val 8 --image-size 64) SWEEP_GPUS=0 SWEEP_CPUS=0.5 CONCURRENT=2 BATCH=4
elif [[ $# -eq 0 ]]; then
  python3 -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
    || { echo "gpu_check.sh: no CUDA GPU here; on a CPU run it with --dry-run" >&2; exit 2; }
  DEVICE=(--device cuda --amp) STEP=(--image-size 512 --batch-size 8 --iters 10 --warmup 3 --busy 5 --threads 4)
  SYNCS=(--image-size 512 --batch-size 8) THREADS=4
  LOADER=(--image-size 512 --batch-size 8 --batches 40 --workers 0,2,4,8 --steps 10 --threads 4)
  DATA=(--train 512 --val 128 --image-size 128) SWEEP_GPUS=0.25 SWEEP_CPUS=2 CONCURRENT=4 BATCH=16
else
  echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2
  exit 2
fi

section() { printf '\n## %s (at %d s)\n\n' "$1" "$SECONDS" | tee -a "$REPORT"; }
: > "$REPORT"
{
  echo "# gpu_check.sh ${1:-}"
  echo
  echo "- commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/- GPU: /' || true
} | tee -a "$REPORT"

section "Step ratio and GPU busy share"
timeout 240 python3 -m benchmarks.step_overhead "${DEVICE[@]}" "${STEP[@]}" | tee -a "$REPORT"

section "Host syncs per GID step"
# The counts do not depend on AMP or the thread count; CUDA's debug mode sees every sync the runtime makes.
timeout 90 python3 -m benchmarks.host_syncs "${DEVICE[0]}" "${DEVICE[1]}" --threads "$THREADS" "${SYNCS[@]}" \
  | grep -v '^  *- ' | tee -a "$REPORT"

section "Data loading against a GID step"
timeout 90 python3 -m benchmarks.loader_throughput "${DEVICE[@]}" "${LOADER[@]}" | tee -a "$REPORT"

section "A 4-trial sweep, $SWEEP_GPUS GPU per trial"
G="python3 -m gid.cli"
$G data synth --out "$WORK/data" "${DATA[@]}" --seed 0 --max-objects 4 --min-object-size 12 > /dev/null
SET=(--set data.root="$WORK/data" --set data.batch_size=$BATCH --set run.storage_path="$WORK/runs" --set train.epochs=1)
timeout 120 $G train configs/fcos_teacher.yaml "${SET[@]}" > "$WORK/teacher.log" 2>&1 \
  || { tail -20 "$WORK/teacher.log"; exit 1; }
cat > "$WORK/sweep.yaml" <<EOF
name: gpu-check
frameworks:
  fcos:
    config: $PWD/configs/fcos_gid.yaml
    overrides: ["data.root=$WORK/data", "data.batch_size=$BATCH", "train.epochs=1",
                "distill.teacher=$WORK/runs/fcos_teacher/model.pt"]
trials: 4
resources: {workers_per_trial: 1, cpus_per_worker: $SWEEP_CPUS, gpus_per_worker: $SWEEP_GPUS, max_concurrent_trials: $CONCURRENT}
tracking: {tracking_uri: "sqlite:///$WORK/mlflow.db", experiment: gpu-check}
storage_path: $WORK/sweeps
EOF
timeout 180 $G sweep "$WORK/sweep.yaml" 2>&1 | tee "$WORK/sweep.log" | grep -vE '^\s*$' | tail -25 | tee -a "$REPORT"
echo "finished in $SECONDS s; logs in $WORK" | tee -a "$REPORT"

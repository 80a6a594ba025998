#!/usr/bin/env bash
# `gid train` (teacher) and `gid distill` (GID student) for every framework as Ray Train runs on the GPU
# (CUDA, AMP, NCCL process group), one epoch each at 128 px; then two workers asked to share one GPU,
# which gid refuses before compute. Logs and a GPU utilisation trace go to $OUT (default runs/ray-train-gpu).
#     bash benchmarks/ray_train_gpu.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/ray-train-gpu}
WORK=${WORK:-/tmp/ray-train-gpu}
mkdir -p "$OUT"
G="python3 -m gid.cli"
$G data synth --out "$WORK/data" --train 1024 --val 256 --image-size 128 --seed 0 --max-objects 6 --min-object-size 12 > /dev/null || exit 1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/util.csv" &
SAMPLER=$!
C="--set data.root=$WORK/data --set run.storage_path=$WORK/runs --set data.loader_workers=4 --set scaling.cpus_per_worker=4 --set data.batch_size=16 --set train.epochs=1"
for fw in fcos faster_rcnn retinanet; do
  timeout 80 $G train configs/${fw}_teacher.yaml $C > "$OUT/${fw}_teacher.log" 2>&1; echo "$fw teacher rc=$? at $SECONDS s"
  timeout 80 $G distill configs/${fw}_gid.yaml $C --set distill.teacher=$WORK/runs/${fw}_teacher/model.pt > "$OUT/${fw}_gid.log" 2>&1
  echo "$fw gid rc=$? at $SECONDS s"
done
timeout 70 $G distill configs/retinanet_gid.yaml $C --set distill.teacher=$WORK/runs/retinanet_teacher/model.pt \
  --set scaling.num_workers=2 --set scaling.gpus_per_worker=0.5 --set run.name=two_workers_one_gpu > "$OUT/two_workers_one_gpu.log" 2>&1
echo "two workers on one GPU rc=$? (2: refused before compute)"
kill $SAMPLER
for f in "$OUT"/*.log; do echo "== $f"; grep -E "Moving model|world_size|s/it\)|val AP|error|Warning" "$f" | grep -v PlacementGroupCleaner | tail -4; done
awk -F, '$1 > 0 {u += $1; k++} $2 > m {m = $2} END {printf "GPU busy samples: mean utilisation %.0f %%, peak memory %d MiB\n", u / k, m}' "$OUT/util.csv"

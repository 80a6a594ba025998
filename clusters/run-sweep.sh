#!/usr/bin/env bash
# `gid sweep` on a running Ray cluster, with the cluster's values taken from the environment, so one
# sweep file runs on a laptop and on any cluster (launcher, KubeRay, `ray start`) without edits.
#
#   bash clusters/run-sweep.sh SWEEP.yaml [more `gid sweep` options: --resume, --set trials=40, --address ...]
#
# SWEEP.yaml and the paths inside it are relative to GID_WORKDIR (default: this checkout).
# Options given on the command line win over the environment (later --set values win).
#
# Environment, every variable optional (unset: the sweep file's own value):
#   GID_STORAGE_PATH     Ray Tune results and trial checkpoints; every node must reach it:
#                        s3://bucket/gid/sweeps, gs://bucket/gid/sweeps, or a shared mount /mnt/gid/sweeps
#   GID_BUCKET           when GID_STORAGE_PATH is unset: use $GID_BUCKET/sweeps (the launcher configs set it)
#   MLFLOW_TRACKING_URI  the MLflow server; used when the sweep file's tracking.tracking_uri is null
#   GID_WORKERS_PER_TRIAL, GID_CPUS_PER_WORKER, GID_GPUS_PER_WORKER, GID_MAX_CONCURRENT_TRIALS
#                        the sweep file's resources.* (e.g. GID_GPUS_PER_WORKER=0.5: two trials per GPU)
#   RAY_ADDRESS          the cluster; default `auto` (the cluster of this node; `ray job submit` sets it)
#   RAY_AUTH_MODE        default token: every recipe's cluster checks a token on every request, so its driver
#                        must send one (clusters/README.md, "Who can use the cluster"); `disabled` only for a
#                        cluster started without token authentication
#   RAY_AUTH_TOKEN_PATH  the file holding the cluster's token; default ~/.ray/auth_token (where the launcher
#                        configs and the `ray start` recipe put it on every node; on KubeRay the operator sets
#                        RAY_AUTH_TOKEN instead). This script never reads the token, so `bash -x` shows none.
#   GID_WORKDIR          folder to run in (default: the checkout holding this script)
#   PYTHON               interpreter with gid-search installed (default: python)
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
  echo "usage: bash clusters/run-sweep.sh SWEEP.yaml [gid sweep options]" >&2
  exit 2
fi
sweep=$1
shift

cd "${GID_WORKDIR:-$(dirname "${BASH_SOURCE[0]}")/..}"

# Token authentication, as the cluster's nodes run it; the token stays where Ray reads it from.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

args=(--address auto)
storage=${GID_STORAGE_PATH:-${GID_BUCKET:+${GID_BUCKET%/}/sweeps}}
[[ -n $storage ]] && args+=(--set "storage_path=$storage")
[[ -n ${GID_WORKERS_PER_TRIAL:-} ]] && args+=(--set "resources.workers_per_trial=$GID_WORKERS_PER_TRIAL")
[[ -n ${GID_CPUS_PER_WORKER:-} ]] && args+=(--set "resources.cpus_per_worker=$GID_CPUS_PER_WORKER")
[[ -n ${GID_GPUS_PER_WORKER:-} ]] && args+=(--set "resources.gpus_per_worker=$GID_GPUS_PER_WORKER")
[[ -n ${GID_MAX_CONCURRENT_TRIALS:-} ]] && args+=(--set "resources.max_concurrent_trials=$GID_MAX_CONCURRENT_TRIALS")

echo "gid sweep $sweep in $PWD: storage ${storage:-(sweep file)}, MLflow ${MLFLOW_TRACKING_URI:-(sweep file or local store)}, Ray auth $RAY_AUTH_MODE"
exec "${PYTHON:-python}" -m gid.cli sweep "$sweep" "${args[@]}" "$@"

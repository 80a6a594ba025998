#!/usr/bin/env bash
# Keep in the bucket what only the head node holds, so `ray down` loses nothing and a new cluster
# continues where the last one stopped:
#   MLflow's database                        $MLFLOW_HOME/mlflow.db  <->  $GID_BUCKET/mlflow/mlflow.db
#   the sweeps' driver-side files (Optuna    .gid-sweeps/            <->  $GID_BUCKET/head/gid-sweeps/
#   studies, reports) of bucket-stored sweeps
# (Tune results and checkpoints are in the bucket already, MLflow artifacts too.)
#
#   bash clusters/head-state.sh backup    # on the head, e.g. `ray exec CLUSTER.yaml '...'` before `ray down`
#   bash clusters/head-state.sh restore   # at head setup (the launcher configs run it): only what is missing
#
# Environment: GID_BUCKET (required; the launcher configs set it), MLFLOW_HOME (~/mlflow),
# GID_WORKDIR (folder `gid sweep` runs in; default: this checkout), PYTHON (python).
set -euo pipefail

: "${GID_BUCKET:?set GID_BUCKET, e.g. s3://my-gid-bucket/gid}"
bucket=${GID_BUCKET%/}
mlflow_home=${MLFLOW_HOME:-$HOME/mlflow}
workdir=${GID_WORKDIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
copy=("${PYTHON:-python}" "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/bucket_copy.py")

case ${1:-} in
  backup)
    if [[ -f $mlflow_home/mlflow.db ]]; then "${copy[@]}" "$mlflow_home/mlflow.db" "$bucket/mlflow/mlflow.db"; fi
    if [[ -d $workdir/.gid-sweeps ]]; then "${copy[@]}" "$workdir/.gid-sweeps" "$bucket/head/gid-sweeps"; fi
    ;;
  restore)
    if [[ ! -f $mlflow_home/mlflow.db ]]; then "${copy[@]}" "$bucket/mlflow/mlflow.db" "$mlflow_home/mlflow.db" --missing-ok; fi
    if [[ ! -d $workdir/.gid-sweeps ]]; then "${copy[@]}" "$bucket/head/gid-sweeps" "$workdir/.gid-sweeps" --missing-ok; fi
    ;;
  *)
    echo "usage: bash clusters/head-state.sh backup|restore" >&2
    exit 2
    ;;
esac

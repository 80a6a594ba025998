#!/usr/bin/env bash
# The sweeps' MLflow tracking server on this machine (the Ray head node), listening on 127.0.0.1 only.
# The sweep driver runs on the same machine; people reach the UI through a port-forward
# (`ray attach CLUSTER.yaml -p 5000`, `ssh -L 5000:127.0.0.1:5000 HEAD`, `kubectl port-forward`), never a public port.
#
#   bash clusters/mlflow-server.sh start     # in the background; waits until it answers, prints its URI
#   bash clusters/mlflow-server.sh stop
#   bash clusters/mlflow-server.sh restart
#   bash clusters/mlflow-server.sh status
#   bash clusters/mlflow-server.sh run       # in the foreground (a container's main process)
#
# Environment:
#   MLFLOW_PORT                    5000
#   MLFLOW_HOME                    ~/mlflow: the server's log and pid file, and the default stores below
#   MLFLOW_BACKEND_STORE_URI       sqlite:///$MLFLOW_HOME/mlflow.db: runs, params, metrics, tags.
#                                  SQLite suits one person's sweeps; a team's MLflow, or one that must outlive the
#                                  head, keeps them in PostgreSQL, with its driver installed beside gid-search
#                                  (pip install -c constraints.txt -e '.[postgres]', psycopg 3):
#                                    postgresql+psycopg://gid:PASSWORD@db.internal:5432/mlflow
#                                  (an empty database; the server creates its tables on the first start). Any other
#                                  SQLAlchemy URL works with its own driver. The URI is printed with its password hidden.
#   MLFLOW_ARTIFACTS_DESTINATION   $MLFLOW_HOME/artifacts: artifact files (config.yaml, GI pictures, reports);
#                                  a bucket URI on clouds: s3://bucket/gid/mlflow-artifacts (boto3),
#                                  gs://bucket/gid/mlflow-artifacts (google-cloud-storage). The server proxies
#                                  artifact traffic, so only this machine needs bucket credentials.
#   MLFLOW_WORKERS                 2: server worker processes
#   PYTHON                         python (the interpreter with gid-search, hence mlflow, installed)
set -euo pipefail

port=${MLFLOW_PORT:-5000}
home=${MLFLOW_HOME:-$HOME/mlflow}
mkdir -p "$home"
home=$(cd "$home" && pwd)
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$home/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-$home/artifacts}
python=${PYTHON:-python}
pidfile=$home/server.pid
logfile=$home/server.log
uri=http://127.0.0.1:$port

shown=${backend/\/\/*@/\/\/***@}  # scheme://user:secret@host -> scheme://***@host, as gid logs URLs

server=("$python" -m mlflow server --host 127.0.0.1 --port "$port" --workers "${MLFLOW_WORKERS:-2}"
        --backend-store-uri "$backend" --artifacts-destination "$artifacts")

running() { [[ -f $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

wait_healthy() {
  "$python" - "$uri" "$pidfile" <<'EOF'
import os, sys, time, urllib.request
uri, pidfile = sys.argv[1], sys.argv[2]
deadline = time.time() + 120
while time.time() < deadline:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
    try:
        os.kill(int(open(pidfile).read()), 0)
    except (OSError, ValueError):
        break  # the server exited
    time.sleep(0.5)
sys.exit(1)
EOF
}

# A PostgreSQL store needs its driver: say which, instead of the server's traceback.
check_driver() {
  local module=
  case $backend in
    postgresql+psycopg://*|postgres+psycopg://*) module=psycopg ;;
    postgresql://*|postgres://*|postgresql+psycopg2://*) module=psycopg2 ;;  # SQLAlchemy's default driver
  esac
  [[ -z $module ]] && return
  if ! "$python" -c "import $module" 2>/dev/null; then
    echo "MLFLOW_BACKEND_STORE_URI $shown needs the $module driver, which $python cannot import;" \
         "install gid-search's postgres extra (pip install -c constraints.txt -e '.[postgres]')" \
         "and use a postgresql+psycopg:// URI" >&2
    exit 2
  fi
}

start() {
  if running; then
    echo "MLflow is already running at $uri (pid $(cat "$pidfile"))"
    return
  fi
  check_driver
  # Its own session, so `stop` ends the server together with its worker processes.
  setsid "${server[@]}" >>"$logfile" 2>&1 </dev/null &
  echo $! >"$pidfile"
  if ! wait_healthy; then
    echo "MLflow did not start; the end of $logfile:" >&2
    tail -n 30 "$logfile" >&2
    exit 1
  fi
  echo "MLflow tracking server at $uri (store $shown, artifacts $artifacts; log $logfile)"
}

stop() {
  if ! running; then
    rm -f "$pidfile"
    echo "MLflow is not running"
    return
  fi
  local pid
  pid=$(cat "$pidfile")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 40); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$pidfile"
  echo "MLflow stopped"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status)
    if running; then echo "MLflow is running at $uri (pid $(cat "$pidfile"))"; else echo "MLflow is not running"; exit 1; fi ;;
  run)
    check_driver
    echo "MLflow tracking server at $uri (store $shown, artifacts $artifacts)"
    exec "${server[@]}" ;;
  *)
    echo "usage: bash clusters/mlflow-server.sh start|stop|restart|status|run" >&2
    exit 2 ;;
esac

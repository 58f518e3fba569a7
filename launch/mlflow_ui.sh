#!/usr/bin/env bash
# Open the MLflow UI on the embedded store a training run writes when no tracking URI is set:
# ./mlflow.db (SQLite) and ./mlartifacts in the directory the trainer was started from.
#
#   launch/mlflow_ui.sh                              # store in the current directory
#   STORE_DIR=/runs PORT=5001 launch/mlflow_ui.sh
#   HOST=0.0.0.0 launch/mlflow_ui.sh                 # reachable from other machines (see below)
#
# Environment: STORE_DIR (default: .), HOST (default: 127.0.0.1), PORT (default: 5000).
#
# It binds to 127.0.0.1 by default because the UI has no login: anyone who can reach the port can
# read, change and delete runs. For a server shared by several people, start it with MLflow's
# built-in authentication instead, e.g.
#   mlflow server --app-name basic-auth --host 0.0.0.0 --backend-store-uri ... \
#       --artifacts-destination ...
# (users and the admin password are set in MLflow's basic_auth.ini; see MLflow's docs), and
# have clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail

STORE_DIR="${STORE_DIR:-.}"
HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-5000}"
STORE_DIR="$(cd "$STORE_DIR" && pwd)" || {
    echo "$(basename "$0"): STORE_DIR not found: ${STORE_DIR}" >&2
    exit 2
}
if [[ ! -f "$STORE_DIR/mlflow.db" ]]; then
    echo "$(basename "$0"): no mlflow.db in $STORE_DIR (run training there first, or set STORE_DIR)" >&2
    exit 2
fi
if [[ "$HOST" != "127.0.0.1" && "$HOST" != "localhost" ]]; then
    echo "$(basename "$0"): warning: serving on $HOST without authentication;" \
        "see the comment at the top of this script" >&2
fi

exec mlflow ui --host "$HOST" --port "$PORT" \
    --backend-store-uri "sqlite:///$STORE_DIR/mlflow.db" \
    --default-artifact-root "$STORE_DIR/mlartifacts"

#!/usr/bin/env bash
# Start the team's MLflow tracking server: runs in PostgreSQL, artifacts stored by the server
# (jobs on other machines log through it, no shared disk needed). Then run sweeps with
#   python train.py -m tracking=server tracking.uri=http://<this host>:5000
#
#   BACKEND_STORE_URI=postgresql://mlflow:secret@db.internal:5432/mlflow \
#   ARTIFACTS_DESTINATION=/srv/mlflow-artifacts \
#   HOST=0.0.0.0 ALLOWED_HOSTS=mlflow.internal:5000 scripts/mlflow_server.sh
#
# Needs the `server` extra (pip install -e '.[server]': the PostgreSQL driver). The database must
# exist; MLflow creates its tables on the first start. ARTIFACTS_DESTINATION may be a folder or an
# object store URI (s3://..., gs://...). Without BACKEND_STORE_URI the project's SQLite store is used.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
backend="${BACKEND_STORE_URI:-sqlite:///$root/mlruns/mlflow.db}"
artifacts="${ARTIFACTS_DESTINATION:-$root/mlruns/server-artifacts}"
mlflow="$root/.venv/bin/mlflow"
[ -x "$mlflow" ] || mlflow="mlflow"
host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
extra=()
[ -n "${ALLOWED_HOSTS:-}" ] && extra+=(--allowed-hosts "$ALLOWED_HOSTS")
echo "MLflow server on http://$host:$port (runs: ${backend%%:*}, artifacts: $artifacts)"
exec "$mlflow" server --backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts \
  --host "$host" --port "$port" "${extra[@]}" "$@"

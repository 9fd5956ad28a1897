#!/usr/bin/env bash
# Start the MLflow UI on 127.0.0.1 against the workbench's store.
#   scripts/mlflow_ui.sh                 # http://127.0.0.1:5000, store mlruns/mlflow.db
#   PORT=5001 scripts/mlflow_ui.sh       # another port
#   MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db scripts/mlflow_ui.sh   # another store
# Search runs in the UI with e.g.  tags.method = 'magnitude' and metrics.acc_drop < 0.5
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
uri="${MLFLOW_TRACKING_URI:-sqlite:///$root/mlruns/mlflow.db}"
mlflow="$root/.venv/bin/mlflow"
[ -x "$mlflow" ] || mlflow="mlflow"
if [[ "$uri" == sqlite:///* ]] && [ ! -f "${uri#sqlite:///}" ]; then
  echo "No store at ${uri#sqlite:///} yet: run 'python train.py -m' first (or set MLFLOW_TRACKING_URI)." >&2
  exit 1
fi
echo "MLflow UI for $uri on http://127.0.0.1:${PORT:-5000}"
exec "$mlflow" ui --backend-store-uri "$uri" --host 127.0.0.1 --port "${PORT:-5000}" "$@"

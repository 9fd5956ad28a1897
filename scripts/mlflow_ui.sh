#!/usr/bin/env bash
# Start the MLflow UI against the workbench's store and print the address of the workbench
# experiment's runs table (what to open: MLflow 3's front page is made for GenAI traces).
#   scripts/mlflow_ui.sh                 # http://127.0.0.1:5000, store mlruns/mlflow.db
#   PORT=5001 scripts/mlflow_ui.sh       # another port
#   HOST=0.0.0.0 scripts/mlflow_ui.sh --allowed-hosts "$(hostname):5000"   # from other machines
#                                       (no login: think first; arguments go to `mlflow server`)
#   MLFLOW_TRACKING_URI=sqlite:////path/to/mlflow.db scripts/mlflow_ui.sh   # another store
# Search runs in the UI with e.g.  tags.method = 'magnitude' and metrics.acc_drop < 0.5
#
# A lean server for one reader: one uvicorn worker, and MLflow's job runner off (its huey
# consumers run GenAI scorers and trace jobs the workbench never starts). As shipped, `mlflow ui`
# here starts 15 processes holding 3.2 GB; this starts 2 holding about 0.5 GB.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
uri="${MLFLOW_TRACKING_URI:-sqlite:///$root/mlruns/mlflow.db}"
mlflow="$root/.venv/bin/mlflow"
[ -x "$mlflow" ] || mlflow="mlflow"
python="$root/.venv/bin/python"
[ -x "$python" ] || python="python3"
host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
if [[ "$uri" == sqlite:///* ]] && [ ! -f "${uri#sqlite:///}" ]; then
  echo "No store at ${uri#sqlite:///} yet: run 'python train.py -m' first (or set MLFLOW_TRACKING_URI)." >&2
  exit 1
fi
# where users open it, and where this script asks it (itself, when it listens everywhere)
case "$host" in 0.0.0.0 | :: ) shown="$(hostname)" local=127.0.0.1 ;; *) shown="$host" local="$host" ;; esac
address="http://$shown:$port"
echo "MLflow UI for $uri on $address (starting)"

# Once the server answers, ask it for the experiment's id and print its runs page. The server
# keeps this script's pid (exec below); the helper, detached so that it leaves no zombie, gives
# up when that pid is gone.
(PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$python" - "$address" "http://$local:$port" "$$" <<'EOF' &
import json, os, sys, time, urllib.error, urllib.parse, urllib.request

from lightning_modules.contract import EXPERIMENT

address, local, server_pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
query = urllib.parse.urlencode({"experiment_name": EXPERIMENT})
while True:
    try:
        os.kill(server_pid, 0)
    except ProcessLookupError:
        sys.exit(0)
    try:
        with urllib.request.urlopen(f"{local}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=5) as answer:
            experiment_id = json.load(answer)["experiment"]["experiment_id"]
        break
    except urllib.error.HTTPError as error:  # the server is up and says no
        found = "is not in this store yet" if error.code == 404 else f"could not be looked up (HTTP {error.code})"
        print(f"Experiment '{EXPERIMENT}' {found}: open {address}", flush=True)
        sys.exit(0)
    except OSError:  # not listening yet
        time.sleep(0.5)
# workflowType: MLflow 3's UI shows the GenAI pages unless told this is model training
print(f"Runs table of experiment '{EXPERIMENT}': "
      f"{address}/#/experiments/{experiment_id}/runs?workflowType=machine_learning", flush=True)
EOF
)

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec "$mlflow" server --backend-store-uri "$uri" --host "$host" --port "$port" --workers 1 "$@"

"""tracking=server: a sweep of parallel jobs logging to a real MLflow server backed by PostgreSQL.

A throwaway PostgreSQL cluster is created in a temporary folder (skipped where no PostgreSQL
binaries or no psycopg are installed: `pip install -e '.[server]'` and the distribution's
postgresql package), then `scripts/mlflow_server.sh` serves it with its artifacts.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lightning_modules.contract import EXPERIMENT, FINGERPRINT_TAG, JOB_TAG, MODEL_ARTIFACT, MODEL_FOLDER
from tests.conftest import FAST, ROOT, run_train
from tests.test_mlflow_server import die_with_parent, free_port, stop, wait_until_healthy

pytestmark = pytest.mark.slow


def postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    return Path(found).parent if found else None


def as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` system user."""
    if os.geteuid() != 0:
        return command
    return ["runuser", "-u", "postgres", "--", *command]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install -e '.[server]'")
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb) on this machine")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("running as root without runuser: PostgreSQL cannot be started")
    folder = Path(tempfile.mkdtemp(prefix="pg-"))  # short: the socket path must fit in 107 bytes
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    pg_ctl = as_postgres_user([str(bin_dir / "pg_ctl"), "-D", str(data)])
    try:
        subprocess.run(as_postgres_user([str(bin_dir / "initdb"), "-D", str(data), "-U", "workbench", "--auth=trust",
                                         "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
        subprocess.run([*pg_ctl, "-w", "-t", "60", "-l", str(folder / "log"), "-o",
                        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                       check=True, capture_output=True, timeout=90)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="workbench", dbname="postgres", autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        yield f"postgresql://workbench@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def server_url(postgres_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log_file = tmp_path / "server.log"
    env = {**os.environ, "BACKEND_STORE_URI": postgres_url, "ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
           "PORT": str(port)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log_file.open("w") as log:
        server = subprocess.Popen([str(ROOT / "scripts" / "mlflow_server.sh")], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True, preexec_fn=die_with_parent)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, log_file)
        yield url
    finally:
        stop(server)


def test_parallel_sweep_into_a_postgresql_server(tmp_path: Path, server_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = ["-m", *FAST, "tracking=server", f"tracking.uri={server_url}", "model=lenet300",
             "method=baseline,magnitude", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking.claim_settle_s=2"]
    result = run_train(sweep, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    client = MlflowClient(server_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert all(run.info.status == "FINISHED" for run in runs)
    baselines = [run for run in runs if FINGERPRINT_TAG in run.data.tags]
    assert len(baselines) == 1  # the two parallel jobs needed it; one trained it
    pruned = next(run for run in runs if run.data.tags.get("method") == "magnitude")
    assert pruned.data.tags["baseline_run_id"] == baselines[0].info.run_id
    assert pruned.data.metrics["compression_ratio"] > 1.0
    # the artifacts went through the server (no shared disk): the model file can be fetched back
    assert MODEL_ARTIFACT in [a.path for a in client.list_artifacts(pruned.info.run_id, MODEL_FOLDER)]
    assert (tmp_path / "artifacts").is_dir()

    # relaunching the same sweep folder resumes it: nothing is rerun
    again = run_train(sweep, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(client.search_runs([experiment.experiment_id], filter_string=f"tags.{JOB_TAG} != ''")) == 2


def test_an_unreachable_server_stops_the_sweep_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    result = run_train(["-m", *FAST, "tracking=server", f"tracking.uri={url}", "model=lenet300",
                        "method=baseline,magnitude"], tmp_path)
    assert result.returncode == 2
    assert f"no MLflow server answers at {url}/health" in result.stderr
    assert "start one with scripts/mlflow_server.sh" in result.stderr
    assert not (tmp_path / "sweep" / "mlflow_sweep.json").exists()

"""A real MLflow tracking server on the sweep's store: the runs, metrics, tags and artifacts over REST.

What a user sees through `scripts/mlflow_ui.sh` (the same server behind the UI), checked with the
REST API the UI itself calls. The server is started on a free port of 127.0.0.1 and always
terminated, with every wait bounded.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from lightning_modules.contract import EXPERIMENT
from tests.conftest import ROOT
from tests.test_notebooks import DigitsSweep, build_digits_sweep
from tests.test_workbench import CONTRACT, TAGS

pytestmark = pytest.mark.slow

MLFLOW = ROOT / ".venv" / "bin" / "mlflow"
START_TIMEOUT_S = 90.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory: pytest.TempPathFactory) -> DigitsSweep:
    return build_digits_sweep(tmp_path_factory)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(url: str, server: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_file.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S:.0f}s:\n{log_file.read_text()[-3000:]}")


def die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when pytest dies, even killed outright, so no server is
    left behind; mlflow forwards SIGTERM to its uvicorn child."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it runs uvicorn as a child), SIGKILL if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)


@pytest.fixture(scope="module")
def server(digits_sweep: DigitsSweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    log_file = folder / "server.log"
    port = free_port()
    command = [str(MLFLOW if MLFLOW.exists() else "mlflow"), "server", "--backend-store-uri", digits_sweep.uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log_file.open("w") as log:
        process = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=die_with_parent)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(url, process, log_file)
        yield url
    finally:
        stop(process)


def get(url: str, route: str, **query: Any) -> bytes:
    with urllib.request.urlopen(f"{url}{route}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return response.read()


def api(url: str, endpoint: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
    """GET (no body) or POST (JSON body) on /api/2.0/mlflow/<endpoint>."""
    if body is None:
        return json.loads(get(url, f"/api/2.0/mlflow/{endpoint}", **query))
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def search(url: str, filter_string: str) -> list[dict[str, Any]]:
    experiment = api(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    found = api(url, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "filter": filter_string,
                                     "max_results": 1000})
    return found.get("runs", [])


def as_dict(entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {entry["key"]: entry["value"] for entry in entries}


def test_search_by_tag_and_metric_finds_the_pruned_runs(server: str, digits_sweep: DigitsSweep) -> None:
    # (no layer is spared: a 4-batch lenet5 pruned to 80% can lose over half its accuracy)
    runs = search(server, "tags.method = 'magnitude' and metrics.acc_drop < 95")

    client = MlflowClient(digits_sweep.uri)
    expected = {r.info.run_id for r in client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id], "tags.method = 'magnitude'")
        if r.data.metrics["acc_drop"] < 95}
    assert {run["info"]["run_id"] for run in runs} == expected and len(expected) == 4
    for run in runs:
        metrics, tags = as_dict(run["data"]["metrics"]), as_dict(run["data"]["tags"])
        assert [name for name in CONTRACT if name not in metrics] == []
        assert all(tags.get(tag) for tag in TAGS)
        assert tags["sweep"] == digits_sweep.name and tags["mlflow.parentRunId"] == digits_sweep.parent_run_id
        assert metrics["acc_drop"] < 95 and metrics["sparsity"] > 0.4
        assert run["info"]["status"] == "FINISHED"
    assert {as_dict(r["data"]["tags"])["model"] for r in runs} == {"lenet300", "lenet5"}


def test_filters_narrow_the_grid(server: str) -> None:
    assert len(search(server, "tags.method = 'baseline'")) == 4
    assert len(search(server, "tags.model = 'lenet5' and tags.seed = '1'")) == 2
    assert search(server, "tags.method = 'magnitude' and metrics.acc_drop > 1000") == []
    assert len(search(server, "tags.role = 'sweep'")) == 1


def test_metric_history_matches_the_store(server: str, digits_sweep: DigitsSweep) -> None:
    run = search(server, "tags.method = 'magnitude' and tags.model = 'lenet300' and tags.seed = '0'")[0]
    history = api(server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="test_acc")["metrics"]
    stored = MlflowClient(digits_sweep.uri).get_run(run["info"]["run_id"]).data.metrics["test_acc"]
    assert [m["value"] for m in history] == [pytest.approx(stored)]


def test_run_artifacts_are_served(server: str) -> None:
    run_id = search(server, "tags.method = 'magnitude' and tags.model = 'lenet5' and tags.seed = '0'")[0]["info"]["run_id"]
    files = {f["path"] for f in api(server, "artifacts/list", run_id=run_id)["files"]}
    assert {"config.yaml", "layers.csv", "encoding.csv", "magnitude_summary.csv", "model"} <= files
    model = api(server, "artifacts/list", run_id=run_id, path="model")["files"]
    sizes = {f["path"]: int(f["file_size"]) for f in model}
    assert "model/model.pt" in sizes and sizes["model/model.pt"] > 1000
    layers = get(server, "/get-artifact", path="layers.csv", run_uuid=run_id).decode()
    assert layers.startswith("layer,") and "features.0" in layers
    assert b"digits" in get(server, "/get-artifact", path="config.yaml", run_uuid=run_id)


def test_the_sweep_parent_run_shows_the_grid_figures(server: str, digits_sweep: DigitsSweep) -> None:
    parent = digits_sweep.parent_run_id
    files = {f["path"] for f in api(server, "artifacts/list", run_id=parent, path="figures")["files"]}
    pngs = {"figures/accuracy_vs_compression.png", "figures/accuracy_vs_latency.png", "figures/heatmaps.png"}
    assert pngs <= files and "figures/pareto_accuracy_vs_compression.csv" in files
    for path in pngs:
        assert get(server, "/get-artifact", path=path, run_uuid=parent).startswith(PNG_MAGIC)
    assert "grid.csv" in {f["path"] for f in api(server, "artifacts/list", run_id=parent)["files"]}

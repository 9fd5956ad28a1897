"""The MLflow UI as a user meets it: the experiment is marked as model training, and
`scripts/mlflow_ui.sh` prints the address of its runs table, which a real headless browser (Debian's
chromium, driven by selenium through chromium-driver) opens to find the runs by name.

The browser test is skipped only where chromium or its driver is not installed
(`apt-get install chromium chromium-driver`). The server is started on a free port of 127.0.0.1 and
always terminated, with every wait bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from lightning_modules.contract import EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from lightning_modules.tracking import Store, tracked_run
from tests.conftest import ROOT
from tests.test_mlflow_server import START_TIMEOUT_S, die_with_parent, free_port, stop

RUN_NAMES = ("lenet5-magnitude-cpu-s0", "lenet300-agp-cpu-s1")
PAGE_TIMEOUT_S = 60.0
# the browser as the closed network and a root user need it: no sandbox, nothing fetched in the background
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1400,900")


def test_a_new_experiment_is_marked_as_model_training(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", EXPERIMENT)
    tags = store.client.get_experiment(store.experiment_id).tags
    assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_older_store_gets_the_mark_and_a_chosen_kind_stays(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment(EXPERIMENT)  # as the workbench made it before the mark
    chosen = client.create_experiment("someone-elses", tags={EXPERIMENT_KIND_TAG: "genai_development"})

    assert Store(uri, EXPERIMENT).experiment_id == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert Store(uri, "someone-elses").experiment_id == chosen
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


# ----------------------------------------------------------------------------- the browser


def browser_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no chromium or chromedriver on this machine: apt-get install chromium chromium-driver")
    return browser, driver


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store with a few finished runs, written by the workbench's own tracking code."""
    store = Store(f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}", EXPERIMENT)
    for name in RUN_NAMES:
        with tracked_run(store, name, {"method": name.split("-")[1]}, parent_run_id=None) as run:
            run.log_metrics({"test_acc": 0.9})
    return store


def printed_address(log_file: Path, server: subprocess.Popen) -> str:
    """The runs page address the script prints once its server answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if found := re.search(r"^Runs table of experiment .*: (http://\S+)$", log_file.read_text(), re.MULTILINE):
            return found.group(1)
        if server.poll() is not None:
            pytest.fail(f"scripts/mlflow_ui.sh exited with {server.returncode}:\n{log_file.read_text()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"scripts/mlflow_ui.sh printed no runs address in {START_TIMEOUT_S:.0f}s:\n"
                f"{log_file.read_text()[-3000:]}")


@pytest.fixture
def ui(store: Store, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """scripts/mlflow_ui.sh on a free port: (the address it printed, the port)."""
    port, log_file = free_port(), tmp_path / "ui.log"
    # the venv's mlflow and python, where the checkout has no .venv of its own
    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri, "PORT": str(port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log_file.open("w") as log:
        server = subprocess.Popen([str(ROOT / "scripts" / "mlflow_ui.sh")], stdout=log, stderr=subprocess.STDOUT,
                                  env=env, start_new_session=True, preexec_fn=die_with_parent)
    try:
        yield printed_address(log_file, server), port
    finally:
        stop(server)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    binary, driver = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(service=Service(driver), options=options)  # a given driver: nothing downloaded
    chrome.set_page_load_timeout(PAGE_TIMEOUT_S)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.mark.slow
def test_the_printed_address_opens_the_runs_table_with_the_runs_by_name(
        browser: webdriver.Chrome, ui: tuple[str, int], store: Store) -> None:
    address, port = ui
    runs_page = f"http://127.0.0.1:{port}/#/experiments/{store.experiment_id}/runs"
    assert address.startswith(f"{runs_page}?") and "workflowType=machine_learning" in address

    browser.get(address)
    try:  # the names are links in the table's rows once the runs have loaded
        WebDriverWait(browser, PAGE_TIMEOUT_S).until(
            lambda page: all(page.find_elements(By.LINK_TEXT, name) for name in RUN_NAMES))
    except TimeoutException:
        pytest.fail(f"runs {RUN_NAMES} not shown at {browser.current_url}:\n"
                    f"{browser.find_element(By.TAG_NAME, 'body').text[:2000]}")

    # still the runs table, in the model-training view: not redirected to the GenAI overview
    # ("Traces 0", token usage) nor showing the GenAI navigation (sessions, judges, playground)
    assert browser.current_url.startswith(f"{runs_page}?")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Run Name" in text and "Token Usage" not in text
    assert not {"Sessions", "Judges", "Playground"} & set(text.splitlines()), text[:2000]

"""The notebooks: kept without outputs, and run top to bottom (headless, nbclient) against a fresh sweep.

The sweep (`digits`, two models, magnitude pruning, two seeds: 4 compressed runs and the 4 dense
baselines they train) is generated once per test session by `build_digits_sweep`, which
test_mlflow_server.py shares.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient
from nbformat import NotebookNode

from lightning_modules.analysis import NO_SENSITIVITY_MESSAGE
from lightning_modules.contract import ROLE_SWEEP, ROLE_TAG, SWEEP_FILE
from lightning_modules.search import NO_STUDY_MESSAGE
from tests.conftest import FAST, FAST_SHIPPED, ROOT, all_runs, run_train
from tests.test_deep_compression import SHORT as SHORT_DEEP_COMPRESSION

NOTEBOOKS = ROOT / "notebooks"
NOTEBOOK_NAMES = ["01_grid_overview.ipynb", "02_run_in_depth.ipynb", "03_pruning_curves.ipynb",
                  "04_seeds_significance.ipynb", "05_deep_compression.ipynb"]
SWEEP_ARGS = ["-m", *FAST_SHIPPED, "model=lenet300,lenet5", "method=magnitude", "seed=0,1", "method.fine_tune.epochs=1"]
KERNEL = "workbench-test-venv"


# ----------------------------------------------------------------------------- the shared sweep


@dataclass(frozen=True)
class DigitsSweep:
    uri: str
    name: str
    parent_run_id: str


_SWEEP: DigitsSweep | None = None


def build_digits_sweep(tmp_path_factory: pytest.TempPathFactory) -> DigitsSweep:
    """Run the small sweep once per session into its own store (later calls return the same one)."""
    global _SWEEP
    if _SWEEP is None:
        folder = tmp_path_factory.mktemp("digits-sweep")
        uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_URI", uri)
            patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            result = run_train(SWEEP_ARGS, folder)
        assert result.returncode == 0, result.stderr[-3000:]
        info = json.loads((folder / "sweep" / SWEEP_FILE).read_text())
        _SWEEP = DigitsSweep(uri, info["name"], info["parent_run_id"])
    return _SWEEP


@pytest.fixture(scope="session")
def digits_sweep(tmp_path_factory: pytest.TempPathFactory) -> DigitsSweep:
    return build_digits_sweep(tmp_path_factory)


# ----------------------------------------------------------------------------- running a notebook


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A kernel spec for this very interpreter, first on JUPYTER_PATH: no other Python can be picked up."""
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "workbench tests", "language": "python",
    }))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(folder))
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        yield KERNEL


def inject_parameters(notebook: NotebookNode, parameters: dict[str, Any]) -> None:
    """As papermill does: a cell tagged `injected-parameters` right after the one tagged `parameters`."""
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def execute(name: str, kernel: str, parameters: dict[str, Any]) -> NotebookNode:
    """Run the notebook top to bottom; a cell that raises fails the test (CellExecutionError)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    inject_parameters(notebook, parameters)
    NotebookClient(notebook, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(ROOT)}}).execute()
    return notebook


def outputs(notebook: NotebookNode, mime: str) -> list[str]:
    """Every output of this MIME type (text/plain, image/png, text/markdown, text/html) or stream text ('stream')."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if mime == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif mime in output.get("data", {}):
                found.append(output.data[mime])
    return found


# ----------------------------------------------------------------------------- the files in git


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_kept_without_outputs_and_has_parameters(name: str) -> None:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    assert "tracking_uri = None" in code[0].source and "sweep = None" in code[0].source
    assert set(notebook.metadata) <= {"kernelspec", "language_info"}  # no widget state, no run metadata


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_notebook_is_already_what_nbstripout_makes_of_it(name: str) -> None:
    path = NOTEBOOKS / name
    stripped = subprocess.run([sys.executable, "-m", "nbstripout", "--textconv", str(path)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    assert stripped == path.read_text()


def test_every_notebook_is_listed() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == NOTEBOOK_NAMES


def test_inject_parameters_follows_the_parameters_cell() -> None:
    notebook = nbformat.read(NOTEBOOKS / NOTEBOOK_NAMES[0], as_version=4)
    inject_parameters(notebook, {"sweep": "s1", "budget": 0.5})
    tags = [cell.metadata.get("tags", []) for cell in notebook.cells[1:3]]
    assert tags == [["parameters"], ["injected-parameters"]]
    assert notebook.cells[2].source == "sweep = 's1'\nbudget = 0.5"


# ----------------------------------------------------------------------------- run against the sweep


@pytest.mark.slow
def test_grid_overview_notebook(digits_sweep: DigitsSweep, kernel: str) -> None:
    notebook = execute("01_grid_overview.ipynb", kernel, {"tracking_uri": digits_sweep.uri, "sweep": digits_sweep.name,
                                                          "budget": 100.0, "register_as": "grid-best"})

    assert len(outputs(notebook, "image/png")) == 3
    printed = "".join(outputs(notebook, "stream"))
    assert "8 runs; data: digits; model: lenet300, lenet5" in printed
    assert "every run of the grid FINISHED: none left out" in printed and "no run here was distilled" in printed
    tables = outputs(notebook, "text/html")
    assert len(tables) == 5  # the configurations, the grid, two fronts, the best runs
    configs = tables[0]  # magnitude has no knob that varies: one configuration per model, over seeds 0 and 1
    assert configs.count("<td>magnitude</td>") == 2 and configs.count("<td>0,1</td>") == 4
    best = tables[-1]
    # with a 100-point budget every run fits: the best per model is its most compressed, a magnitude run
    assert best.count("<td>magnitude</td>") == 2 and "<td>lenet300</td>" in best and "<td>lenet5</td>" in best
    # the last cell registers the sweep's most compressed run (clear of chance) with how it was measured
    assert "registered grid-best version 1: models:/grid-best/1" in printed
    version = MlflowClient(digits_sweep.uri).get_model_version("grid-best", "1")
    assert version.description in printed and version.tags["objective"] == "compression"
    # no search in this store: the last section says how to run one (test_search.py compares real fronts)
    assert NO_STUDY_MESSAGE in printed


@pytest.mark.slow
def test_run_in_depth_notebook(digits_sweep: DigitsSweep, kernel: str) -> None:
    notebook = execute("02_run_in_depth.ipynb", kernel, {"tracking_uri": digits_sweep.uri, "sweep": digits_sweep.name})

    assert len(outputs(notebook, "image/png")) == 3  # per-layer facts, histograms, confusion matrices
    printed = "".join(outputs(notebook, "stream"))
    run_id = re.search(r"run ([0-9a-f]{32}): ", printed).group(1)
    run = MlflowClient(digits_sweep.uri).get_run(run_id)
    assert run.data.tags["method"] == "magnitude"
    finalized, baseline = map(float, re.search(r"baseline\): ([\d.]+)%, ([\d.]+)%", printed).groups())
    # the confusion matrices reproduce the accuracies the run logged
    assert finalized == pytest.approx(run.data.metrics["test_acc"], abs=0.01)
    assert baseline == pytest.approx(run.data.metrics["baseline_test_acc"], abs=0.01)
    assert any("sparsity" in table for table in outputs(notebook, "text/html"))  # the method's per-layer columns


@pytest.mark.slow
def test_pruning_curves_notebook_says_when_there_is_no_sensitivity(digits_sweep: DigitsSweep, kernel: str) -> None:
    notebook = execute("03_pruning_curves.ipynb", kernel, {"tracking_uri": digits_sweep.uri, "sweep": digits_sweep.name})

    assert len(outputs(notebook, "image/png")) == 1
    assert outputs(notebook, "text/markdown") == [NO_SENSITIVITY_MESSAGE]
    spread = outputs(notebook, "text/html")[0]
    assert spread.count("<td>magnitude</td>") == 2 and spread.count("<td>baseline</td>") == 2


@pytest.mark.slow
def test_seeds_notebook_reads_the_default_store(digits_sweep: DigitsSweep, kernel: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", digits_sweep.uri)  # tracking_uri stays None: the kernel inherits it
    notebook = execute("04_seeds_significance.ipynb", kernel, {"sweep": "latest"})

    assert len(outputs(notebook, "image/png")) == 1
    summary, comparison, noise = outputs(notebook, "text/html")
    assert summary.count("0,1") == 4  # 2 models x 2 methods, each over seeds 0 and 1
    assert comparison.count("paired t") == 2
    assert noise.count("acc_drop_ci95_low") == 1
    finished = [r for r in all_runs(digits_sweep.uri) if r.data.tags.get(ROLE_TAG) != ROLE_SWEEP]
    assert len(finished) == 8


@pytest.mark.slow
def test_deep_compression_notebook_sets_the_stages_beside_the_papers(tmp_path: Path, kernel: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = run_train([*FAST, "model=lenet300", *SHORT_DEEP_COMPRESSION], tmp_path)  # one short run on digits
    assert result.returncode == 0, result.stderr[-3000:]
    run = next(r for r in all_runs(uri) if r.data.tags.get("method") == "deep_compression")

    notebook = execute("05_deep_compression.ipynb", kernel, {"tracking_uri": uri})

    assert len(outputs(notebook, "image/png")) == 1
    stages, layers = outputs(notebook, "text/html")
    assert "<td>paper</td>" in stages and "<td>digits cpu_1t</td>" in stages
    assert "<td>40.00</td>" in stages and "<td>1.64</td>" in stages  # the paper's LeNet-300-100 row
    assert f"<td>{run.data.metrics['compression_ratio_huffman']:.2f}</td>" in stages
    assert "<td>total</td>" in layers
    # layer, weights, kept %, the paper's kept % (8% for LeNet-300-100's first layer)
    assert re.search(r"<td>classifier\.1</td>\s*<td>\d+</td>\s*<td>[\d.]+</td>\s*<td>8\.0</td>", layers)
    assert f"run {run.info.run_id}: lenet300 seed 0" in "".join(outputs(notebook, "stream"))

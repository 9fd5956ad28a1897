"""The contract module: its key builders, the store-URI resolver, and that it imports nothing of the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest

from lightning_modules import analysis, contract
from tests.conftest import ROOT


def test_key_builders_spell_the_contract_names() -> None:
    assert contract.latency_ms_p50(32) == "latency_ms_p50_bs32"
    assert contract.speedup(1) == "speedup_bs1"
    assert contract.vs_teacher(contract.speedup(32)) == "speedup_bs32_vs_teacher"
    assert contract.labelled(contract.DEQUANTIZED, contract.latency_ms_p50(1)) == "dequantized_latency_ms_p50_bs1"
    assert contract.summary_table("agp") == "agp_summary.csv"
    assert contract.size_bytes_of(".onnx") == "size_bytes_onnx"
    assert contract.run_model_uri("abc") == "runs:/abc/model/model.pt"
    assert contract.figure_artifact(contract.HEATMAPS) == "figures/heatmaps.png"
    metrics = contract.contract_metrics()
    assert {"macs_dense", "macs_effective", "macs_effective_theoretical", "throughput_bs32"} <= set(metrics)
    assert not [name for name in metrics if name.startswith("flops")]  # the MAC counts are named for what they hold


def test_the_store_uri_resolver_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(contract.URI_ENV, raising=False)
    assert contract.resolve_store_uri(store_dir=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert contract.resolve_store_uri(configured="http://server:5000", store_dir=tmp_path) == "http://server:5000"
    monkeypatch.setenv(contract.URI_ENV, "sqlite:////env/mlflow.db")
    assert contract.resolve_store_uri(configured="http://server:5000") == "sqlite:////env/mlflow.db"
    assert contract.resolve_store_uri("sqlite:////given/mlflow.db") == "sqlite:////given/mlflow.db"
    assert contract.sqlite_path("sqlite:////given/mlflow.db") == Path("/given/mlflow.db")
    assert contract.sqlite_path("http://server:5000") is None


def test_contract_imports_nothing_of_the_package() -> None:
    tree = ast.parse((ROOT / "lightning_modules" / "contract.py").read_text())
    modules = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    modules += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [module for module in modules if module.startswith("lightning_modules")]


def test_last_attempts_keeps_one_run_per_sweep_job() -> None:
    runs = pd.DataFrame({
        "run_id": ["a", "b", "c", "d"],
        contract.JOB_TAG: ["job1", "job1", "job2", ""],
        "start_time": pd.to_datetime([1, 2, 3, 4], unit="s"),
        "status": ["FAILED", "FINISHED", "FINISHED", "FINISHED"],
    })
    kept = analysis.last_attempts(runs)
    assert kept["run_id"].tolist() == ["b", "c", "d"]  # a resumed job shows its last attempt; untagged runs stay

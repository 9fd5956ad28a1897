"""Sensitivity analysis: each layer pruned alone, the model given back unchanged, logged on a role=sensitivity run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lightning_modules.compression.pruning import sparsity_sensitivity
from lightning_modules.models import LeNet300
from tests.conftest import FAST, ROOT, all_runs


def test_each_layer_is_pruned_alone_and_restored() -> None:
    torch.manual_seed(0)
    model = LeNet300(1, 8, 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: list[float] = []

    def evaluate(m: torch.nn.Module) -> float:  # "accuracy" = percent of nonzero weights in the whole model
        weights = [layer.weight for layer in (m.classifier[1], m.classifier[3], m.classifier[5])]
        seen.append(100.0 * sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights))
        return seen[-1]

    rows = sparsity_sensitivity(model, evaluate, [0.5, 0.9], layers=["classifier.1", "classifier.3"])
    assert [(r["layer"], r["sparsity"]) for r in rows] == [("classifier.1", 0.5), ("classifier.1", 0.9),
                                                          ("classifier.3", 0.5), ("classifier.3", 0.9)]
    assert rows[1]["acc_drop"] == pytest.approx(100.0 * 0.9 * 64 * 300 / (64 * 300 + 300 * 100 + 100 * 10), abs=0.01)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"criterion": "taylor"}, r"criterion='taylor' is not valid; allowed: magnitude, random"),
        ({"layers": ["fc7"]}, r"layers has unknown layers \['fc7'\]; allowed: classifier.1"),
    ],
)
def test_sensitivity_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sparsity_sensitivity(LeNet300(1, 8, 10), lambda m: 0.0, [0.5], **kwargs)


def test_sensitivity_rejects_a_bad_sparsity() -> None:
    with pytest.raises(ValueError, match=r"sparsities=1.2 is not valid; allowed: a fraction in \[0, 1\)"):
        sparsity_sensitivity(LeNet300(1, 8, 10), lambda m: 0.0, [1.2])


@pytest.mark.slow
def test_script_logs_the_table_and_plot_on_a_sensitivity_run(store_uri: str) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "sensitivity.py"), *FAST, "model=lenet300",
                             "+sparsities=[0.5,0.9]"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = [r for r in all_runs(store_uri) if r.data.tags.get("role") == "sensitivity"]
    assert len(runs) == 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri)
    names = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"sensitivity.csv", "sensitivity.png"} <= names
    table = client.download_artifacts(runs[0].info.run_id, "sensitivity.csv")
    header = open(table).readline().strip()
    assert header == "layer,sparsity,test_acc,acc_drop"

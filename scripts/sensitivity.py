"""Per-layer pruning sensitivity of a trained baseline, logged to MLflow on a run tagged role=sensitivity.

    .venv/bin/python scripts/sensitivity.py model=lenet300 data=mnist5k [seed=0] [+sparsities=[0.5,0.8,0.9,0.95]]

Takes the dense baseline of (data, model, seed) from the store (training it first if it is not
there, exactly as a pipeline run would), prunes each Linear/Conv layer alone at each sparsity by
magnitude, without fine-tuning, and scores the test split. Logs `sensitivity.csv` (layer,
sparsity, test_acc, acc_drop) and `sensitivity.png` (accuracy drop per layer against sparsity).
Any config override of train.py works (data=, model=, seed=, hardware=, tracking=).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.compression.pruning import sparsity_sensitivity  # noqa: E402
from lightning_modules.config import validate  # noqa: E402
from lightning_modules.evaluation.accuracy import predict  # noqa: E402
from lightning_modules.contract import (  # noqa: E402
    BASELINE_RUN_TAG, METHOD_TAG, ROLE_SENSITIVITY, ROLE_TAG, SENSITIVITY_ARTIFACT,
)
from lightning_modules.experiment import obtain_baseline, open_context  # noqa: E402
from lightning_modules.tracking import Store, run_tags, scratch_dir, tracked_run  # noqa: E402

DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def sensitivity(cfg: DictConfig, sparsities: list[float]) -> pd.DataFrame:
    """Run the analysis for `cfg` (a composed workbench config) and log it; returns the table."""
    validate(cfg)
    ctx = open_context(cfg, Store.from_config(cfg.tracking), sweep=None, job=None)
    baseline = obtain_baseline(ctx)
    device = ctx.device
    model = baseline.model.to(device).eval()
    test = ctx.data.split("test")
    rows = sparsity_sensitivity(model, lambda m: 100.0 * predict(m, test, device).accuracy, sparsities)
    table = pd.DataFrame(rows)
    tags = {**run_tags(cfg, None), ROLE_TAG: ROLE_SENSITIVITY, METHOD_TAG: ROLE_SENSITIVITY,
            BASELINE_RUN_TAG: baseline.run_id}
    with tracked_run(ctx.store, f"sensitivity-{cfg.model.name}-{cfg.data.name}-s{cfg.seed}", tags, None) as run:
        run.log_table(rows, SENSITIVITY_ARTIFACT)
        run.log_metrics({f"acc_drop_{row['layer']}_s{int(round(100 * row['sparsity']))}": row["acc_drop"] for row in rows})
        with scratch_dir() as folder:
            figure = plot(table, f"{cfg.model.name} on {cfg.data.name}: each layer pruned alone, no fine-tuning")
            path = Path(folder) / "sensitivity.png"
            figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(figure)
            run.log_folder(folder)
    return table


def plot(table: pd.DataFrame, title: str) -> plt.Figure:
    figure, axis = plt.subplots(figsize=(6, 4))
    for layer, rows in table.groupby("layer", sort=False):
        axis.plot(100 * rows["sparsity"], rows["acc_drop"], marker="o", label=layer)
    axis.set_xlabel("sparsity of the layer (%)")
    axis.set_ylabel("accuracy drop (points)")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    axis.grid(alpha=0.3)
    return figure


def main(argv: list[str]) -> None:
    sparsities = list(DEFAULT_SPARSITIES)
    overrides = []
    for argument in argv:
        if argument.startswith("+sparsities=") or argument.startswith("sparsities="):
            sparsities = [float(v) for v in argument.split("=", 1)[1].strip("[]").split(",")]
        else:
            overrides.append(argument)
    os.environ.setdefault("WORKBENCH_ROOT", str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    table = sensitivity(cfg, sparsities)
    print(table.pivot(index="layer", columns="sparsity", values="acc_drop").round(2).to_string())


if __name__ == "__main__":
    main(sys.argv[1:])

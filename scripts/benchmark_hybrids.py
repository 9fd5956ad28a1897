"""Benchmark of the hybrids (issue 14, "What to measure") on mnist5k, seeds 0,1,2:

    agp_qat vs agp followed by ptq_static (method=agp_ptq), with agp and qat alone beside them,
        on lenet300 and lenet5: sparsity kept, accuracy and size of each;
    channel_kd vs channel at 50% of the channels on lenet5: drop and speedup.

    PYTHONPATH=. .venv/bin/python scripts/benchmark_hybrids.py --store /tmp/hybrid/bench \
        --baselines-from /work/seed_store/mlflow.db
    ... --report-only --store DIR      # the table from the runs already in the store
    ... --groups channel               # a subset: quantized, channel (names below)

Every run goes through `train.py -m` (Hydra's basic launcher: one training process at a time) into
one MLflow store, so each dense baseline is trained once or found there (`--baselines-from` copies
a store holding them, as scripts/scorecard.py does). Pruning and distillation run on cpu_1t, the int8
methods on their shipped hardware (cpu_ort: ONNX Runtime's int8 kernels). Running again into the
same store resumes (jobs with a FINISHED run are skipped). Latency on a shared machine is indicative
only: compare speedups (each timed beside its own baseline in one process), not milliseconds.

The printed table: one row per (model, method), means over the FINISHED seeds, with the per-seed
drops; `size` is the deployable file (model.pt for sparse codes, which ONNX's file would store dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from lightning_modules.contract import EXPERIMENT, sqlite_uri
from lightning_modules.tracking import copy_baselines

ROOT = Path(__file__).resolve().parents[1]
SEEDS = "0,1,2"
PRUNING_HARDWARE = "cpu_1t"
INT8_HARDWARE = "cpu_ort"

# group -> [(models, method, hardware, overrides)], cheap runs first so a partial store is useful
GROUPS: dict[str, list[tuple[str, str, str, tuple[str, ...]]]] = {
    "channel": [
        ("lenet5", "channel", PRUNING_HARDWARE, ("method.sparsity=0.5",)),
        ("lenet5", "channel_kd", PRUNING_HARDWARE, ("method.sparsity=0.5",)),
    ],
    "quantized": [
        ("lenet300,lenet5", "qat", INT8_HARDWARE, ()),
        ("lenet300,lenet5", "agp_qat", INT8_HARDWARE, ()),
        ("lenet300,lenet5", "agp_ptq", INT8_HARDWARE, ()),
        ("lenet300,lenet5", "agp", PRUNING_HARDWARE, ()),
    ],
}
COLUMNS = (("test_acc", "{:.2f}"), ("acc_drop", "{:+.2f}"), ("sparsity", "{:.3f}"), ("size_bytes", "{:.0f}"),
           ("compression_ratio", "{:.2f}"), ("speedup_bs1", "{:.2f}"), ("speedup_bs32", "{:.2f}"))


def run_group(uri: str, store: Path, name: str) -> None:
    for models, method, hardware, overrides in GROUPS[name]:
        folder = store / "sweeps" / f"{method}-{models.replace(',', '_')}"
        command = [sys.executable, str(ROOT / "train.py"), "-m", "data=mnist5k", f"model={models}", f"method={method}",
                   f"hardware={hardware}", f"seed={SEEDS}", "trainer.enable_progress_bar=false",
                   f"tracking.uri={uri}", f"hydra.sweep.dir={folder}", *overrides]
        print(f"running {method} on {models} ({hardware}) ...", flush=True)
        with open(store / f"{method}-{models.replace(',', '_')}.log", "w") as log:
            result = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdout=log, stderr=subprocess.STDOUT, check=False)
        if result.returncode != 0:
            print(f"  {method} on {models} failed (rc {result.returncode}): see {log.name}", flush=True)


def newest_runs(uri: str, store: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(model, method, seed): metrics} of the newest FINISHED run of each made in `store` (not one copied in
    with the baselines, whose artifacts stay in the source store), baselines left out."""
    own_artifacts = (store.resolve() / "artifacts").as_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'", max_results=5000,
                              order_by=["attributes.start_time ASC"])
    found = {}
    for run in runs:
        tags = run.data.tags
        if not run.info.artifact_uri.startswith(own_artifacts):
            continue
        if tags.get("method") not in {method for group in GROUPS.values() for _, method, _, _ in group}:
            continue
        found[(tags["model"], tags["method"], tags["seed"])] = dict(run.data.metrics)
    return found


def print_table(uri: str, store: Path, groups: list[str]) -> None:
    found = newest_runs(uri, store)
    header = f"{'model':<9} {'method':<11} {'hw':<8} {'seeds':<5} " + " ".join(f"{c:>17}" for c, _ in COLUMNS) + "  drops per seed"
    print(header)
    for name in groups:
        for models, method, hardware, _ in GROUPS[name]:
            for model in models.split(","):
                seeds = [found[(model, method, seed)] for seed in SEEDS.split(",") if (model, method, seed) in found]
                if not seeds:
                    print(f"{model:<9} {method:<11} {hardware:<8} none")
                    continue
                cells = []
                for column, form in COLUMNS:
                    values = [run[column] for run in seeds if column in run]
                    cells.append(form.format(statistics.mean(values)) if values else "-")
                drops = " / ".join(f"{run['acc_drop']:+.1f}" for run in seeds)
                print(f"{model:<9} {method:<11} {hardware:<8} {len(seeds):<5} " + " ".join(f"{c:>17}" for c in cells)
                      + f"  {drops}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=Path("/tmp/workbench-hybrids"))
    parser.add_argument("--baselines-from", type=Path, default=None, help="an MLflow SQLite file holding the baselines")
    parser.add_argument("--groups", default=",".join(GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    groups = args.groups.split(",")
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"--groups has unknown {unknown}; allowed: {', '.join(GROUPS)}")
    args.store.mkdir(parents=True, exist_ok=True)
    if args.baselines_from is not None:
        print(copy_baselines(args.store, args.baselines_from) or f"{args.store} has every baseline of {args.baselines_from}")
    uri = sqlite_uri(args.store)
    if not args.report_only:
        for name in groups:
            run_group(uri, args.store, name)
    print_table(uri, args.store, groups)


if __name__ == "__main__":
    main()

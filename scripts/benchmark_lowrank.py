"""Low-rank benchmark: parameter and MAC reduction against the accuracy drop after fine-tuning, and
the latency speedup measured at batch 32 on one CPU thread against the MAC reduction.

Runs `train.py -m` on mnist5k with hardware=cpu_1t into a scratch MLflow store (the shipped recipes unless
shortened; lenet300/lenet5 take seconds a run, resnet20 minutes), reads the runs back and prints one row per run:

    python scripts/benchmark_lowrank.py [--out /tmp/lowrank_bench] [--seeds 0,1,2] [--baseline-epochs 4]
                                        [--fine-tune-epochs 2] [--models lenet300 lenet5] [--read-only] [--profile lenet5]

`speedup_bs32` is the pipeline's own figure: the baseline and the finalized model timed interleaved
in the same process. realized/theoretical = speedup_bs32 / (baseline MACs / MACs).

Measured 2026-11-30 (shared 2-core machine, load ~11), the shipped defaults, mnist5k, cpu_1t, mean of seeds 0-2:
lenet300 svd 2.83x smaller, drop 0.17, speedup_bs32 1.62; tucker 2.61x, 0.17, 1.57; cp 2.83x, -0.10, 1.59 (tucker
and cp factor its Linear layers by SVD: it has no convolutions). lenet5 svd 2.01x, 0.13, 0.94 (1.04, 0.71, 1.07);
tucker 1.95x, -0.03, 1.05; cp 2.01x, -0.03, 2.50 (1.43, 5.84, 0.23): whole-model bs32 figures of one structure
swing that much under that load, min_speedup's paired per-layer ratios far less (resnet20 tucker 16x16 layers
1.50-1.71 on two runs). resnet20 seed 0 (structure only, 10-batch baseline): tucker 2.58x, speedup_bs32 1.06;
cp (NHWC) 2.47x, 1.13, bs1 0.47.

`--profile MODEL` then shows where the time goes: torch.profiler's self CPU time per operator, in ms
per forward pass at batch 32 on one thread, for that model's baseline and each of its runs (their
deployed artifacts). Run it under the same lock as any timing.

Measured 2026-11-23 (2 shared cores, two runs of the grid; speedups swing 10-50% between runs on that
machine, lenet5 cp 0.56x..2.19x): resnet20 tucker with ranks rounded to 16 realizes 0.62-0.67 of its
MAC reduction (1.7-1.9x). Again on a quiet machine, the eager runtime folding BatchNorm: rank 0.25
0.63 (MACs /1.90, drop -0.1), rank 0.5 0.68 (/1.66, drop 1.1).
lenet5 does not reach 0.6 with any setting that cuts its convolutions: max pooling, which has no MACs,
takes most of its time at batch 32, and each Tucker chain was timed 0.82-0.91x of its dense convolution
(quiet machine: rank 2x1 0.84x, rank 4x2 0.91x), so min_speedup=1.0 keeps both convolutions dense and
factors the first Linear layer only (1.04-1.08x fewer MACs). Rank 0.5 laid out NHWC shows 0.60 (1.32x
for MACs /2.19), all of it from the layout: the dense NHWC control alone is 1.36-1.44x faster than the
baseline.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient
from torch.profiler import ProfilerActivity, profile

from lightning_modules.contract import (
    BASELINE_MACS_DENSE, BASELINE_METHOD, BASELINE_RUN_TAG, EXPERIMENT, MACS_DENSE, MODEL_ARTIFACT, sqlite_uri,
)
from lightning_modules.evaluation.artifact import load_deployable

ROOT = Path(__file__).resolve().parents[1]

# (model, method, overrides swept by Hydra); every group adds data, hardware, seeds and the recipes
GRID: list[tuple[str, str, list[str]]] = [
    # what ships: each method's defaults on each model (tucker/cp also factor the Linear layers by SVD,
    # and min_speedup=1.0 keeps every layer dense whose chain is timed slower)
    ("lenet300", "svd", []), ("lenet300", "tucker", []), ("lenet300", "cp", []),
    ("lenet5", "svd", []), ("lenet5", "tucker", []), ("lenet5", "cp", []),
    ("resnet20", "tucker", []), ("resnet20", "cp", []),
    # the rank axis
    ("lenet300", "svd", ["method.rank=0.1,0.5"]),
    # min_speedup off: every layer factored whatever its time (the defaults before issue 12)
    ("lenet5", "tucker", ["method.min_speedup=null"]),
    ("resnet20", "tucker", ["method.min_speedup=null"]),
    ("resnet20", "cp", ["method.min_speedup=null"]),
]
COLUMNS = ["model", "method", "seed", "rank", "rank_multiple", "channels_last", "min_speedup", "layers_skipped",
           "baseline_test_acc", "test_acc", "acc_drop", "compression_ratio",
           "acc_drop_ci95_low", "acc_drop_ci95_high", "params_reduction", "mac_reduction", "speedup_bs32",
           "realized_over_theoretical", "speedup_bs1"]


def run_grid(out: Path, baseline_epochs: int | None, fine_tune_epochs: int | None, seeds: str,
             models: list[str] | None = None) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(out),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    for number, (model, method, sweep) in enumerate(GRID):
        if models is not None and model not in models:
            continue
        recipes = ([] if baseline_epochs is None else [f"baseline.epochs={baseline_epochs}"]) + \
                  ([] if fine_tune_epochs is None else [f"method.fine_tune.epochs={fine_tune_epochs}"])
        command = [sys.executable, str(ROOT / "train.py"), "-m", "data=mnist5k", "hardware=cpu_1t", f"model={model}",
                   f"method={method}", f"seed={seeds}", *recipes, "trainer.enable_progress_bar=false", *sweep,
                   f"hydra.sweep.dir={out / 'sweeps' / str(number)}"]
        started = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        print(f"{model} {method}: exit {result.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)


def read_rows(out: Path) -> list[dict[str, object]]:
    client = MlflowClient(sqlite_uri(out))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    rows = []
    for run in client.search_runs([experiment.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]):
        tags, metrics, params = run.data.tags, run.data.metrics, run.data.params
        if tags.get("method") in (None, BASELINE_METHOD) or MACS_DENSE not in metrics:
            continue
        theoretical = metrics[BASELINE_MACS_DENSE] / metrics[MACS_DENSE]
        baseline_params = client.get_run(tags[BASELINE_RUN_TAG]).data.metrics["params_total"]
        rows.append({
            "model": tags["model"], "method": tags["method"] + ("+svd" if "method.callbacks.linear.decomposition" in params else ""),
            "seed": tags.get("seed"),
            "rank": params.get("method.rank"), "rank_multiple": params.get("method.rank_multiple"),
            "channels_last": params.get("method.callbacks.factor.channels_last"),
            "min_speedup": params.get("method.min_speedup"),
            "layers_skipped": sum(value for key, value in metrics.items() if key.startswith("layers_skipped_")),
            **{key: metrics[key] for key in ("baseline_test_acc", "test_acc", "acc_drop", "compression_ratio", "acc_drop_ci95_low",
                                             "acc_drop_ci95_high", "speedup_bs32", "speedup_bs1")},
            "params_reduction": baseline_params / metrics["params_total"],
            "mac_reduction": theoretical,
            "realized_over_theoretical": metrics["speedup_bs32"] / theoretical,
        })
    return rows


def operator_times(model: torch.nn.Module, input_shape: tuple[int, ...], batch: int = 32,
                   forwards: int = 50) -> dict[str, float]:
    """Self CPU time per operator, ms per forward pass, after a warm-up."""
    inputs = torch.randn(batch, *input_shape)
    with torch.inference_mode():
        for _ in range(10):
            model(inputs)
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            for _ in range(forwards):
                model(inputs)
    return {event.key: event.self_cpu_time_total / 1000.0 / forwards for event in profiler.key_averages()}


def print_profile(out: Path, model_name: str, top: int = 6) -> None:
    """The top operators of the model's baseline and of each of its low-rank runs, one thread, batch 32."""
    torch.set_num_threads(1)  # cpu_1t, as the grid ran
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    client = MlflowClient(sqlite_uri(out))
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], f"tags.model = '{model_name}'", max_results=1000,
                              order_by=["attributes.start_time ASC"])
    for run in runs:
        if MACS_DENSE not in run.data.metrics:
            continue
        params = run.data.params
        label = (f"{run.data.tags['method']} rank={params.get('method.rank')} min_speedup={params.get('method.min_speedup')} "
                 f"channels_last={params.get('method.callbacks.factor.channels_last')}")
        model = load_deployable(client.download_artifacts(run.info.run_id, MODEL_ARTIFACT, str(out / "profile")))
        times = operator_times(model, (1, 28, 28))
        ranked = sorted(times.items(), key=lambda item: -item[1])[:top]
        print(f"{label}: {sum(times.values()):.3f} ms/forward; " + ", ".join(f"{op} {ms:.3f}" for op, ms in ranked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/lowrank_bench"))
    parser.add_argument("--baseline-epochs", type=int, default=None, help="default: the shipped baseline recipe")
    parser.add_argument("--fine-tune-epochs", type=int, default=None, help="default: each method's shipped recipe")
    parser.add_argument("--seeds", default="0", help="Hydra sweep value, e.g. 0,1,2")
    parser.add_argument("--models", nargs="*", default=None, help="run only these models of the grid")
    parser.add_argument("--read-only", action="store_true", help="only read an existing store")
    parser.add_argument("--profile", default=None, help="then profile this model's runs per operator (e.g. lenet5)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.read_only:
        run_grid(args.out, args.baseline_epochs, args.fine_tune_epochs, args.seeds, args.models)
    rows = read_rows(args.out)
    with open(args.out / "lowrank_benchmark.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS) + " |")
    print(f"(table also in {args.out / 'lowrank_benchmark.csv'})")
    if args.profile is not None:
        print_profile(args.out, args.profile)


if __name__ == "__main__":
    main()

"""Benchmark of the pruning family, in one scratch store, with the figures the issue asks for.

    .venv/bin/python scripts/benchmark_pruning.py [--store DIR] [--sparsities 0.5,0.7,0.8,0.9,0.95]
        [--parts accuracy,lottery,channel] [--lottery-sparsities 0.8,0.9,0.95] [--lottery-epochs 5] [--seeds 0]

1. Accuracy vs sparsity on mnist5k for lenet300 and lenet5: magnitude (one-shot), agp, random and
   Lightning's own ModelPruning (`method=lightning`) at the same fine-tuning epochs, all with
   global scope and no skipped layers, so the measured sparsity is the target for every method.
   Every run goes through `train.py -m` (the real pipeline: baseline from the store, fine-tune,
   finalize, evaluate); latency loops are shortened here because accuracy is the point.
2. The lottery ticket on lenet300 (mnist5k): `lottery` (rewinding to the initialization),
   `lottery_reinit` (the same masks, the last round from a fresh random init: Frankle & Carbin's
   control) and one-shot `magnitude` from the trained baseline, at 80/90/95%, global scope, no
   skipped layers. Every lottery round trains `--lottery-epochs` epochs; magnitude fine-tunes as
   long as one round; `lottery` at sparsity 0 is the dense network trained one round the same way.
3. Channel pruning at 50% of channels on lenet5 and resnet20: MACs and latency at batch 32 on one
   thread, the pruned and dense models timed interleaved in this one process (as the pipeline's
   speedup_bs32 does), plus the trained lenet5 run through the pipeline on hardware=cpu_1t.
Prints the tables and writes them as CSV beside the store.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_modules.compression.pruning import ChannelPruning, iterative_sparsities  # noqa: E402
from lightning_modules.evaluation.complexity import count_macs  # noqa: E402
from lightning_modules.evaluation.latency import measure_latency  # noqa: E402
from lightning_modules.models import LeNet5, resnet20  # noqa: E402

EPOCHS = 4  # fine-tuning epochs of every unstructured method (agp ramps over the first 2)
SHORT_LATENCY = ["hardware.latency.warmup=2", "hardware.latency.repeats=5"]


def train(args: list[str], store: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    command = [sys.executable, str(ROOT / "train.py"), "-m", *args, "trainer.enable_progress_bar=false",
               f"hydra.sweep.dir={store / 'sweeps' / str(time.time_ns())}"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        raise SystemExit(f"train.py failed: {' '.join(args)}")


def runs_table(store: Path) -> pd.DataFrame:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("workbench")
    rows = []
    for run in client.search_runs([experiment.experiment_id], max_results=5000):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        if "method" not in tags or "test_acc" not in metrics:
            continue
        rows.append({"model": tags["model"], "method": tags["method"], "hardware": tags.get("hardware"),
                     "seed": int(tags.get("seed", 0)),
                     "target": float(params.get("method.sparsity", 0.0)), **metrics})
    return pd.DataFrame(rows)


def accuracy_vs_sparsity(store: Path, sparsities: str) -> pd.DataFrame:
    common = lambda methods: [f"method={methods}", "data=mnist5k", "model=lenet300,lenet5", f"method.sparsity={sparsities}", f"method.fine_tune.epochs={EPOCHS}",
              "method.callbacks.prune.skip_layers=[]", *SHORT_LATENCY]
    for method in ("magnitude", "random", "agp"):  # one method per sweep: its keys exist when Hydra composes it
        train([*common(method), "method.callbacks.prune.scope=global"], store)
    train(common("lightning"), store)
    table = runs_table(store)
    table = table[table.method.isin(["magnitude", "random", "agp", "lightning"])]
    return table[["model", "method", "target", "sparsity", "test_acc", "baseline_test_acc", "acc_drop",
                  "acc_drop_ci95_low", "acc_drop_ci95_high", "compression_ratio"]].sort_values(["model", "method", "target"])


def lottery_runs(store: Path, sparsities: list[float], epochs_per_round: int, seeds: str) -> pd.DataFrame:
    common = ["data=mnist5k", "model=lenet300", f"seed={seeds}", "method.callbacks.prune.skip_layers=[]",
              "method.callbacks.prune.scope=global", *SHORT_LATENCY]
    for sparsity in [0.0, *sparsities]:  # one sweep per sparsity: the number of rounds depends on it
        rounds = len(iterative_sparsities(sparsity, 0.5)) + 1 if sparsity > 0 else 1
        methods = "lottery,lottery_reinit" if sparsity > 0 else "lottery"
        train([f"method={methods}", f"method.sparsity={sparsity}", "method.callbacks.prune.fraction_per_cycle=0.5",
               f"method.callbacks.prune.epochs_per_cycle={epochs_per_round}",
               f"method.fine_tune.epochs={rounds * epochs_per_round}", *common], store)
    train(["method=magnitude", f"method.sparsity={','.join(map(str, sparsities))}",
           f"method.fine_tune.epochs={epochs_per_round}", *common], store)
    table = runs_table(store)
    table = table[table.method.isin(["lottery", "lottery_reinit", "magnitude"]) & (table.model == "lenet300")]
    return table[["method", "seed", "target", "sparsity", "test_acc", "baseline_test_acc", "acc_drop",
                  "acc_drop_ci95_low", "acc_drop_ci95_high", "train_time_s"]].sort_values(["target", "method", "seed"])


def channel_speedups() -> pd.DataFrame:
    torch.set_num_threads(1)
    rows = []
    for name, model in (("lenet5", LeNet5(1, 28, 10)), ("resnet20", resnet20(1, 10))):
        shape = (1, 28, 28)
        model.eval()
        callback = ChannelPruning(0.5)
        callback.analyse(model, torch.zeros(1, *shape))
        pruned = copy.deepcopy(model)
        callback.cut(pruned, 0.5)
        pruned = callback.finalize(pruned).eval()
        latency = measure_latency({"dense": model, "pruned": pruned}, shape, [32], torch.device("cpu"), warmup=10, repeats=100)
        speedup = latency["dense"]["latency_ms_p50_bs32"] / latency["pruned"]["latency_ms_p50_bs32"]
        mac_reduction = count_macs(model, shape)["macs_dense"] / count_macs(pruned, shape)["macs_dense"]
        rows.append({"model": name, "params_dense": sum(p.numel() for p in model.parameters()),
                     "params_pruned": sum(p.numel() for p in pruned.parameters()),
                     "latency_ms_dense_bs32": latency["dense"]["latency_ms_p50_bs32"],
                     "latency_ms_pruned_bs32": latency["pruned"]["latency_ms_p50_bs32"],
                     "speedup_bs32": speedup, "mac_reduction": mac_reduction,
                     "realized_over_mac": speedup / mac_reduction})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=ROOT / "outputs" / "benchmark_pruning")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--parts", default="accuracy,lottery,channel", help="which sections to run")
    parser.add_argument("--lottery-sparsities", default="0.8,0.9,0.95")
    parser.add_argument("--lottery-epochs", type=int, default=5, help="training epochs of every lottery round")
    parser.add_argument("--seeds", default="0", help="seeds of the lottery runs, e.g. 0,1")
    args = parser.parse_args()
    store = args.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    pd.set_option("display.width", 200)
    started = time.perf_counter()

    parts = args.parts.split(",")
    if "accuracy" in parts:
        accuracy = accuracy_vs_sparsity(store, args.sparsities)
        accuracy.to_csv(store / "accuracy_vs_sparsity.csv", index=False)
        print(f"\n== accuracy vs sparsity (mnist5k, {EPOCHS} fine-tuning epochs, global scope, no skipped layers)")
        print(accuracy.round(3).to_string(index=False))
        pivot = accuracy.pivot_table(index=["model", "target"], columns="method", values="test_acc")
        print("\n== test_acc by method\n" + pivot.round(2).to_string())

    if "lottery" in parts:
        lottery = lottery_runs(store, [float(s) for s in args.lottery_sparsities.split(",")], args.lottery_epochs, args.seeds)
        lottery.to_csv(store / "lottery.csv", index=False)
        print(f"\n== lottery ticket, lenet300 on mnist5k, {args.lottery_epochs} epochs per round, global scope, no skipped layers")
        print(lottery.round(3).to_string(index=False))
        pivot = lottery.pivot_table(index="target", columns="method", values="test_acc", aggfunc=["mean", "count"])
        print("\n== test_acc by method (mean over seeds, count)\n" + pivot.round(2).to_string())

    if "channel" in parts:
        channels = channel_speedups()
        channels.to_csv(store / "channel_speedups.csv", index=False)
        print("\n== channel pruning, 50% of channels, batch 32, one thread, timed interleaved in one process")
        print(channels.round(3).to_string(index=False))

        train(["data=mnist5k", "model=lenet5", "method=channel", "method.sparsity=0.5", "hardware=cpu_1t"], store)
        channel_run = runs_table(store).query("method == 'channel'")
        print("\n== lenet5 channel 50% through the pipeline on cpu_1t")
        print(channel_run[["model", "test_acc", "acc_drop", "params_total", "flops_dense", "baseline_flops_dense",
                           "speedup_bs1", "speedup_bs32"]].round(3).to_string(index=False))
    print(f"\nbenchmark wall time: {time.perf_counter() - started:.0f} s; store: {store}")


if __name__ == "__main__":
    main()

"""Benchmark of quantization: int8 PTQ and QAT (and optionally low-bit, clustering) against the fp32
baseline, on PyTorch (cpu_1t: int8 compiled by Inductor onto oneDNN int8 kernels, against the
fp32 baseline compiled the same way) and ONNX Runtime (cpu_ort), with ONNX Runtime's own
quantize_static on the same exported fp32 model as the peer.

Then, per model, the runtimes side by side (--runtime-threads): the pipeline's ptq_static int8
model and its fp32 baseline, deployed as fp32 eager, fp32 Inductor, int8 Inductor (PT2E form),
fp32 ONNX Runtime and int8 ONNX Runtime, all timed interleaved in one loop per thread count.

Every figure comes from the pipeline (run_experiment) in this one process, so speedup_bs<B> is a
ratio of latencies timed interleaved with the baseline. Runs land in a scratch store (baselines
are trained once per model there). Prints one table and writes it to outputs/benchmark_quantization.csv.

    .venv/bin/python scripts/benchmark_quantization.py
    .venv/bin/python scripts/benchmark_quantization.py --models lenet5 --methods ptq_static,qat,lowbit,cluster
    flock /tmp/bench.lock .venv/bin/python scripts/benchmark_quantization.py --methods ptq_static --hardware cpu_1t \
        --runtime-threads 1,all
    .venv/bin/python scripts/benchmark_quantization.py --models resnet20 --hardware cpu_ort --repeats 3 \
        --methods "qat,qat:method.callbacks.quantize.batchnorm=freeze"    # BatchNorm folded vs frozen (accuracy)

Measured (resnet20, mnist5k, baseline 10 epochs, cpu_ort; int8 test_acc, acc_drop [paired 95% interval]):
2 QAT epochs, seed 0: fold 97.2 (1.1 [0.3, 1.9]), freeze from epoch 1 98.0 (0.3 [-0.5, 1.2]);
seed 1: fold 97.9, freeze 97.9 (0.2 [-0.6, 1.0] both); 4 epochs, seed 0: fold 98.2 (0.1), freeze from
epoch 2 98.3 (0.0 [-0.6, 0.6]). The int8 ONNX file (fused form): 283,3xx B, 3.85x the fp32 file.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WORKBENCH_ROOT", str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from lightning_modules.evaluation.accuracy import predict  # noqa: E402
from lightning_modules.evaluation.latency import measure_latency  # noqa: E402
from lightning_modules.evaluation.runtime import (  # noqa: E402
    INT8_OPS, CompiledModel, export_onnx, optimized_ops, ort_load, torch_eager,
)
from lightning_modules.contract import sqlite_uri  # noqa: E402
from lightning_modules.experiment import baseline_fingerprint, run_experiment  # noqa: E402
from lightning_modules.evaluation.artifact import load_deployable  # noqa: E402
from lightning_modules.tracking import Store, download_model_file, find_baseline_run  # noqa: E402

COLUMNS = ["model", "hardware", "method", "test_acc", "acc_drop", "test_acc_fakequant", "compression_ratio",
           "size_bytes", "speedup_bs1", "speedup_bs32", "int8_kernel_ops", "latency_ms_p50_bs32",
           "layers_skipped_ptq_static", "layers_skipped_qat"]  # layers min_speedup kept float


def method_overrides(spec: str) -> list[str]:
    """`qat` or `qat:method.callbacks.quantize.batchnorm=freeze;method.fine_tune.epochs=3`: a method
    and the Hydra overrides that make it a variant (its row is labelled with the whole spec)."""
    method, _, extra = spec.partition(":")
    return [f"method={method}", *filter(None, extra.split(";"))]


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def ort_peer(cfg, store: Store, folder: Path, calibration_batches: int = 16) -> dict[str, float]:
    """ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, minmax)
    on the baseline's fp32 ONNX export, timed interleaved with that fp32 model."""
    import hydra.utils
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    baseline = load_deployable(download_model_file(store, find_baseline_run(store, baseline_fingerprint(cfg)), folder))
    test = data.split("test")
    shape = tuple(test.tensors[0].shape[1:])
    fp32, int8 = folder / "peer_fp32.onnx", folder / "peer_int8.onnx"
    fp32_size = export_onnx(baseline, fp32, shape)
    batches = []
    for inputs, _ in data.train_dataloader():
        batches.append({"input": inputs.numpy()})
        if len(batches) == calibration_batches:
            break

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(fp32), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    threads = cfg.hardware.threads
    models = {"model": ort_load(int8, torch.device("cpu"), threads), "baseline": ort_load(fp32, torch.device("cpu"), threads)}
    accuracy = {name: predict(m, test, torch.device("cpu")) for name, m in models.items()}
    latency = measure_latency(models, shape, list(cfg.hardware.latency.batch_sizes), torch.device("cpu"),
                              cfg.hardware.latency.warmup, cfg.hardware.latency.repeats)
    row = {"test_acc": 100 * accuracy["model"].accuracy,
           "acc_drop": 100 * (accuracy["baseline"].accuracy - accuracy["model"].accuracy),
           "size_bytes": int8.stat().st_size, "compression_ratio": fp32_size / int8.stat().st_size,
           "int8_kernel_ops": sum(op in INT8_OPS for op in optimized_ops(int8))}
    for b in cfg.hardware.latency.batch_sizes:
        key = f"latency_ms_p50_bs{b}"
        row[key] = latency["model"][key]
        row[f"speedup_bs{b}"] = latency["baseline"][key] / latency["model"][key]
    return row


def stored_model(store: Store, model: str, method: str, folder: Path) -> torch.nn.Module:
    """The deployable model of the newest finished run of (model, method) in the store."""
    runs = store.client.search_runs(
        [store.experiment_id], order_by=["attributes.start_time DESC"], max_results=1,
        filter_string=f"tags.model = '{model}' and tags.method = '{method}' and attributes.status = 'FINISHED'")
    return load_deployable(download_model_file(store, runs[0].info.run_id, folder / f"{model}-{method}"))


def runtime_comparison(cfg, store: Store, folder: Path, threads: int | None, repeats: int) -> list[dict]:
    """The ptq_static int8 model and its fp32 baseline on every runtime, timed interleaved in one
    loop on `threads` threads (None: all). Inductor bakes the thread count into its code, so every
    deployment is built after the threads are set."""
    import hydra.utils

    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    test = data.split("test")
    shape = tuple(test.tensors[0].shape[1:])
    torch.set_num_threads(threads or os.cpu_count())
    fp32 = load_deployable(download_model_file(store, find_baseline_run(store, baseline_fingerprint(cfg)), folder / "fp32"))
    int8 = stored_model(store, cfg.model.name, "ptq_static", folder)
    export_onnx(fp32, folder / "fp32.onnx", shape)
    export_onnx(int8, folder / "int8.onnx", shape)
    cpu = torch.device("cpu")
    compiled = {"fp32 inductor": CompiledModel(fp32, shape), "int8 inductor (PT2E)": CompiledModel(int8, shape)}
    deployments = {"fp32 eager": torch_eager(fp32, cpu), **compiled,
                   "fp32 ort": ort_load(folder / "fp32.onnx", cpu, threads), "int8 ort": ort_load(folder / "int8.onnx", cpu, threads)}
    accuracy = {name: predict(model, test, cpu).accuracy for name, model in deployments.items()}  # also compiles each size
    latency = measure_latency(deployments, shape, [1, 32], cpu, warmup=10, repeats=repeats)
    kernels = {"int8 inductor (PT2E)": compiled["int8 inductor (PT2E)"].int8_kernel_ops,
               "int8 ort": sum(op in INT8_OPS for op in optimized_ops(folder / "int8.onnx"))}
    rows = []
    for name in deployments:
        same_runtime_fp32 = {"int8 inductor (PT2E)": "fp32 inductor", "int8 ort": "fp32 ort"}.get(name, name)
        row = {"model": cfg.model.name, "threads": threads or "all", "deployment": name,
               "test_acc": 100 * accuracy[name], "acc_drop": 100 * (accuracy["fp32 eager"] - accuracy[name]),
               "int8_kernel_ops": kernels.get(name, 0)}
        for b in (1, 32):
            key = f"latency_ms_p50_bs{b}"
            row[key] = latency[name][key]
            row[f"speedup_vs_fp32_eager_bs{b}"] = latency["fp32 eager"][key] / latency[name][key]
            row[f"speedup_vs_same_runtime_fp32_bs{b}"] = latency[same_runtime_fp32][key] / latency[name][key]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--methods", default="ptq_static,qat",
                        help="methods, each optionally with Hydra overrides: qat:method.fine_tune.epochs=3;...")
    parser.add_argument("--hardware", default="cpu_1t,cpu_ort")
    parser.add_argument("--baseline-epochs", default="lenet5=30,resnet20=10",
                        help="baseline recipe epochs per model (ResNet-20 shortened to fit the time budget)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--store", default=None, help="MLflow store folder (default: a scratch folder)")
    parser.add_argument("--runtime-threads", default="",
                        help="thread counts for the side-by-side runtime table, e.g. 1,all (needs ptq_static in --methods)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    epochs = dict(item.split("=") for item in args.baseline_epochs.split(","))
    folder = Path(args.store or tempfile.mkdtemp(prefix="workbench-quant-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = sqlite_uri(folder)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    rows, started = [], time.perf_counter()
    for model in args.models.split(","):
        for hardware in args.hardware.split(","):
            common = ["data=mnist5k", f"model={model}", f"hardware={hardware}", f"baseline.epochs={epochs.get(model, 30)}",
                      "trainer.enable_progress_bar=false", f"hardware.latency.repeats={args.repeats}"]
            for method in ["baseline", *args.methods.split(",")]:
                cfg = config([*common, *method_overrides(method)])
                metrics = run_experiment(cfg)
                rows.append({"model": model, "hardware": hardware, "method": method, **metrics})
                print(f"[{time.perf_counter() - started:6.0f}s] {model} {hardware} {method}: "
                      f"acc {metrics['test_acc']:.2f} drop {metrics['acc_drop']:.2f} ratio {metrics['compression_ratio']:.2f} "
                      f"speedup bs1 {metrics['speedup_bs1']:.2f} bs32 {metrics['speedup_bs32']:.2f}", flush=True)
            if hardware.startswith("cpu_ort"):
                cfg = config([*common, "method=baseline"])
                peer = ort_peer(cfg, Store.from_config(cfg.tracking), folder)
                rows.append({"model": model, "hardware": hardware, "method": "ort_quantize_static (peer)", **peer})
    table = pd.DataFrame(rows)
    table = table[[c for c in COLUMNS if c in table.columns]]
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    out = ROOT / "outputs" / "benchmark_quantization.csv"
    out.parent.mkdir(exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}; wall time {time.perf_counter() - started:.0f}s")
    if args.runtime_threads:
        print_runtime_table(args, epochs, folder, started)


def print_runtime_table(args, epochs: dict[str, str], folder: Path, started: float) -> None:
    rows = []
    for model in args.models.split(","):
        cfg = config(["data=mnist5k", f"model={model}", f"baseline.epochs={epochs.get(model, 30)}", "method=baseline"])
        for threads in args.runtime_threads.split(","):
            rows += runtime_comparison(cfg, Store.from_config(cfg.tracking), folder / f"{model}-{threads}",
                                       None if threads == "all" else int(threads), args.repeats)
            print(f"[{time.perf_counter() - started:6.0f}s] runtimes {model} threads={threads}", flush=True)
    table = pd.DataFrame(rows)
    print(table.round(3).to_string(index=False))
    out = ROOT / "outputs" / "benchmark_quantization_runtimes.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out}; wall time {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()

"""Every figure of the metric contract, measured on the finalized artifact and its baseline.

The compressed model is saved as its deployable artifact first and reloaded from that file, so
accuracy, size, MACs and latency are all taken on exactly what a user would ship.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.accuracy import paired_drop_interval, predict
from lightning_modules.compression.quantization import dequantized, is_quantized
from lightning_modules.evaluation.artifact import NARROW_ENCODINGS, encoding_table, load_deployable, save_deployable
from lightning_modules.evaluation.complexity import count_macs, layer_table, parameter_counts
from lightning_modules.evaluation.latency import measure_latency
from lightning_modules.evaluation.runtime import INT8_OPS, RUNTIMES, Deployed, optimized_ops, runtime_name


@dataclass
class Report:
    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # artifact file -> rows
    artifact: Path | None = None


def measure(
    model: nn.Module,
    baseline: nn.Module,
    data: InMemoryDataModule,
    hardware: DictConfig,
    device: torch.device,
    artifact_dir: Path,
    scratch_dir: Path,
    references: dict[str, nn.Module] | None = None,
) -> Report:
    """Measure `model` (finalized) against `baseline` (dense), both deployed on `hardware`.

    The deployable file is written to `artifact_dir/model.pt`; `scratch_dir` takes the baseline's
    file, written only to measure its size. When `model is baseline` (a baseline run), its own
    figures are the baseline's and the ratios are 1.

    A runtime with its own file format (runtime.py: ort writes model.onnx) runs that file, and
    that file is the deployable whose size is reported, unless the workbench's file stores
    weights narrower than the runtime's (packed low-bit codes, codebooks): then model.pt is the
    deployable and the runtime runs its widened form (the latency keys say `dequantized`).
    `references` (e.g. the fake-quant training model) are scored too, as `test_acc_<name>`.
    """
    is_baseline = model is baseline
    artifact = artifact_dir / "model.pt"
    size_bytes = save_deployable(model, artifact)
    shipped = load_deployable(artifact)  # measure the file, not the object that produced it
    baseline_size = size_bytes if is_baseline else save_deployable(baseline, scratch_dir / "baseline.pt")

    test = data.split("test")
    input_shape = tuple(test.tensors[0].shape[1:])
    runtime = RUNTIMES[runtime_name(hardware, is_quantized(shipped))]  # hardware.compile may pick inductor
    threads = hardware.get("threads")
    encodings = encoding_table(shipped)
    packed = (any(getattr(module, "weight_bits", 8) < 8 for module in shipped.modules())
              or any(row["encoding"] in NARROW_ENCODINGS for row in encodings))
    extra: dict[str, float] = {"size_bytes_pt": size_bytes}
    if runtime.save is not None:
        runtime_file = artifact_dir / f"model{runtime.suffix}"
        runtime_size = runtime.save(shipped, runtime_file, input_shape)
        deployed: Deployed = runtime.load(runtime_file, device, threads)
        baseline_file = scratch_dir / f"baseline{runtime.suffix}"
        baseline_runtime_size = runtime_size if is_baseline else runtime.save(baseline, baseline_file, input_shape)
        deployed_baseline = deployed if is_baseline else runtime.load(baseline_file, device, threads)
        extra[f"size_bytes{runtime.suffix.replace('.', '_')}"] = runtime_size
        extra["int8_kernel_ops"] = sum(op in INT8_OPS for op in optimized_ops(runtime_file))
        if not packed:
            size_bytes, baseline_size = runtime_size, baseline_runtime_size
    else:
        deployed = runtime.deploy(shipped, device, threads, input_shape)
        deployed_baseline = deployed if is_baseline else runtime.deploy(baseline, device, threads, input_shape)
        extra["int8_kernel_ops"] = float(getattr(deployed, "int8_kernel_ops", 0))  # inductor counts its own
    for name, reference in (references or {}).items():
        extra[f"test_acc_{name}"] = 100.0 * predict(reference.eval().to(device), test, device).accuracy

    predictions = predict(deployed, test, device)
    baseline_predictions = predictions if is_baseline else predict(deployed_baseline, test, device)
    drop_low, drop_high = paired_drop_interval(baseline_predictions.correct, predictions.correct)

    counted = dequantized(shipped) if is_quantized(shipped) else shipped  # int8 layers counted as their float shapes
    macs = count_macs(counted, input_shape)
    baseline_macs = macs if is_baseline else count_macs(baseline, input_shape)
    timed = {"model": deployed} if is_baseline else {"model": deployed, "baseline": deployed_baseline}
    latency = measure_latency(
        timed, input_shape, list(hardware.latency.batch_sizes), device,
        warmup=hardware.latency.warmup, repeats=hardware.latency.repeats,
    )
    model_latency = latency["model"]
    baseline_latency = latency.get("baseline", model_latency)

    metrics: dict[str, float] = {
        "test_acc": 100.0 * predictions.accuracy,
        "test_loss": predictions.loss,
        "baseline_test_acc": 100.0 * baseline_predictions.accuracy,
        "acc_drop": 100.0 * (baseline_predictions.accuracy - predictions.accuracy),
        "acc_drop_ci95_low": drop_low,
        "acc_drop_ci95_high": drop_high,
        **parameter_counts(counted),
        "size_bytes": size_bytes,
        "baseline_size_bytes": baseline_size,
        "compression_ratio": baseline_size / size_bytes,
        "flops_dense": macs["macs_dense"],
        # PyTorch's dense kernels multiply zeros too: effective == dense; the sparse count is theoretical.
        "flops_effective": macs["macs_dense"],
        "flops_effective_theoretical": macs["macs_nonzero"],
        "baseline_flops_dense": baseline_macs["macs_dense"],
        **model_latency,
    }
    metrics.update(extra)
    # what the latency is of, when it is not the deployed weights on kernels of their own width
    on_int8_kernels = runtime.int8_kernels and extra["int8_kernel_ops"] > 0
    label = "dequantized" if packed else ("simulated" if is_quantized(shipped) and not on_int8_kernels else None)
    for batch_size in hardware.latency.batch_sizes:
        key = f"latency_ms_p50_bs{batch_size}"
        metrics[f"baseline_{key}"] = baseline_latency[key]
        metrics[f"speedup_bs{batch_size}"] = 1.0 if is_baseline else baseline_latency[key] / model_latency[key]
        if label is not None:
            metrics[f"{label}_{key}"] = model_latency[key]
            metrics[f"{label}_speedup_bs{batch_size}"] = metrics[f"speedup_bs{batch_size}"]
    tables = {"layers.csv": layer_table(counted), "encoding.csv": encodings}
    return Report(metrics, tables, artifact)


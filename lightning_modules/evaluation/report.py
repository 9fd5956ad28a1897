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
from lightning_modules.evaluation.artifact import NARROW_ENCODINGS, encoding_table, load_deployable, save_deployable
from lightning_modules.deployable_int8 import decode_low_bit, dequantized, is_quantized
from lightning_modules.evaluation.complexity import count_macs
from lightning_modules.evaluation.latency import load_per_core, measure_latency
from lightning_modules.evaluation.runtime import INT8_OPS, RUNTIMES, Deployed, optimized_ops, runtime_name
from lightning_modules.layers import layer_table, parameter_counts


# A timing is judged noisy (tag `latency_noisy`) when the machine had more runnable threads than
# cores while it ran, or a timed model's p95/p50 spread exceeds hardware.latency.noisy_spread.
MAX_LOAD_PER_CORE = 1.0
NOISY_SPREAD_DEFAULT = 1.5
NOISY_TAG = "latency_noisy"


@dataclass
class Report:
    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # artifact file -> rows
    artifact: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)  # latency_noisy (with its reason), when it applies
    # what the latency is of, when it is not the deployed weights on kernels of their own width:
    # "dequantized" (low-bit weights decoded to float at load), "simulated" (int8 run in float kernels)
    latency_label: str | None = None


@dataclass
class Deployment:
    """A model as the runtime runs it, and the size of the file it ships as."""

    deployed: Deployed
    size_bytes: float  # the deployable file: the runtime's own, unless the workbench's stores narrower weights
    runtime_size_bytes: float | None = None  # the runtime's own file (.onnx), where it has one


def deploy_for_measure(model: nn.Module, name: str, runtime, hardware: DictConfig, device: torch.device,
                       folder: Path, input_shape: tuple[int, ...]) -> Deployment:
    """Deploy a model that is measured beside the run's own (its baseline, its teacher) the way the
    run's model is deployed: the same runtime, its file written under `folder` only to be measured."""
    threads = hardware.get("threads")
    size = save_deployable(model, folder / f"{name}.pt")
    if runtime.save is None:
        return Deployment(runtime.deploy(model, device, threads, input_shape), size)
    path = folder / f"{name}{runtime.suffix}"
    runtime_size = runtime.save(model, path, input_shape)
    return Deployment(runtime.load(path, device, threads), size, runtime_size)


def measure(
    model: nn.Module,
    baseline: nn.Module,
    data: InMemoryDataModule,
    hardware: DictConfig,
    device: torch.device,
    artifact_dir: Path,
    scratch_dir: Path,
    references: dict[str, nn.Module] | None = None,
    teacher: nn.Module | None = None,
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
    A `teacher` (distillation) is deployed on the same runtime, scored, and timed interleaved with
    the model and its baseline: the `*_vs_teacher` figures.
    """
    is_baseline = model is baseline
    artifact = artifact_dir / "model.pt"
    size_bytes = save_deployable(model, artifact)
    # measure the file, not the object that produced it; low-bit codes are decoded once, at load:
    # widened to int8 where the runtime has int8 kernels, else to float
    shipped = load_deployable(artifact, low_bit_as_int8=True)

    test = data.split("test")
    input_shape = tuple(test.tensors[0].shape[1:])
    runtime = RUNTIMES[runtime_name(hardware, is_quantized(shipped))]  # hardware.compile may pick inductor
    if not runtime.int8_kernels:
        shipped = decode_low_bit(shipped)
    threads = hardware.get("threads")
    encodings = encoding_table(shipped)
    packed = (any(getattr(module, "weight_bits", 8) < 8 for module in shipped.modules())
              or any(row["encoding"] in NARROW_ENCODINGS for row in encodings))
    extra: dict[str, float] = {"size_bytes_pt": size_bytes}
    if runtime.save is not None:
        runtime_file = artifact_dir / f"model{runtime.suffix}"
        runtime_size = runtime.save(shipped, runtime_file, input_shape)
        deployed: Deployed = runtime.load(runtime_file, device, threads)
        extra[f"size_bytes{runtime.suffix.replace('.', '_')}"] = runtime_size
        extra["int8_kernel_ops"] = sum(op in INT8_OPS for op in optimized_ops(runtime_file))
        if not packed:
            size_bytes = runtime_size
    else:
        deployed = runtime.deploy(shipped, device, threads, input_shape)
        extra["int8_kernel_ops"] = float(getattr(deployed, "int8_kernel_ops", 0))  # inductor counts its own
    own = Deployment(deployed, size_bytes)
    others = {"baseline": own} if is_baseline else {
        "baseline": deploy_for_measure(baseline, "baseline", runtime, hardware, device, scratch_dir, input_shape)}
    if teacher is not None:
        others["teacher"] = deploy_for_measure(teacher, "teacher", runtime, hardware, device, scratch_dir, input_shape)
    sizes = {name: other.size_bytes if packed or other.runtime_size_bytes is None else other.runtime_size_bytes
             for name, other in others.items()}
    baseline_size = sizes["baseline"]
    for name, reference in (references or {}).items():
        extra[f"test_acc_{name}"] = 100.0 * predict(reference.eval().to(device), test, device).accuracy

    predictions = predict(deployed, test, device)
    baseline_predictions = predictions if is_baseline else predict(others["baseline"].deployed, test, device)
    drop_low, drop_high = paired_drop_interval(baseline_predictions.correct, predictions.correct)

    counted = dequantized(shipped) if is_quantized(shipped) else shipped  # int8 layers counted as their float shapes
    macs = count_macs(counted, input_shape)
    baseline_macs = macs if is_baseline else count_macs(baseline, input_shape)
    timed = {"model": deployed, **{name: other.deployed for name, other in others.items() if other is not own}}
    batch_sizes = list(hardware.latency.batch_sizes)
    load_before = load_per_core()
    latency = measure_latency(timed, input_shape, batch_sizes, device,
                              warmup=hardware.latency.warmup, repeats=hardware.latency.repeats)
    load = max(load_before, load_per_core())  # nan only where the platform has no load average
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
        "latency_load_avg": load,
    }
    metrics.update(extra)
    # what the latency is of, when it is not the deployed weights on kernels of their own width
    on_int8_kernels = runtime.int8_kernels and extra["int8_kernel_ops"] > 0
    # (low-bit codes that run widened on int8 kernels are real int8 latency: no label)
    label = None if on_int8_kernels else "dequantized" if packed else "simulated" if is_quantized(shipped) else None
    for batch_size in batch_sizes:
        key = f"latency_ms_p50_bs{batch_size}"
        metrics[f"baseline_{key}"] = baseline_latency[key]
        metrics[f"speedup_bs{batch_size}"] = 1.0 if is_baseline else baseline_latency[key] / model_latency[key]
        if label is not None:
            metrics[f"{label}_{key}"] = model_latency[key]
            metrics[f"{label}_speedup_bs{batch_size}"] = metrics[f"speedup_bs{batch_size}"]
    if teacher is not None:
        teacher_predictions = predict(others["teacher"].deployed, test, device)
        metrics.update(teacher_figures(metrics, 100.0 * teacher_predictions.accuracy, sizes["teacher"],
                                       latency["teacher"], batch_sizes))
    noise = noisy_timing_reason(load, {name: latency[name] for name in ("model", "baseline") if name in latency},
                                batch_sizes, hardware.latency.get("noisy_spread", NOISY_SPREAD_DEFAULT))
    tags = {NOISY_TAG: noise} if noise else {}
    tables = {"layers.csv": layer_table(counted), "encoding.csv": encodings}
    return Report(metrics, tables, artifact, tags, label)


def teacher_figures(metrics: dict[str, float], teacher_acc: float, teacher_size: float,
                    teacher_latency: dict[str, float], batch_sizes: list[int]) -> dict[str, float]:
    """The student against its teacher, beside the figures against its own baseline."""
    figures = {
        "teacher_test_acc": teacher_acc,
        "acc_drop_vs_teacher": teacher_acc - metrics["test_acc"],
        "teacher_size_bytes": teacher_size,
        "compression_ratio_vs_teacher": teacher_size / metrics["size_bytes"],
    }
    for batch_size in batch_sizes:
        key = f"latency_ms_p50_bs{batch_size}"
        figures[f"teacher_{key}"] = teacher_latency[key]
        figures[f"speedup_bs{batch_size}_vs_teacher"] = teacher_latency[key] / metrics[key]
    return figures


def noisy_timing_reason(load_per_core: float, latencies: dict[str, dict[str, float]], batch_sizes: list[int],
                        max_spread: float) -> str | None:
    """Why the timing cannot be trusted as it stands, or None: the machine's load per core above 1
    while timing, or a timed model's p95/p50 spread above `max_spread` (hardware.latency.noisy_spread)."""
    reasons = []
    if load_per_core > MAX_LOAD_PER_CORE:
        reasons.append(f"load {load_per_core:.2f} per core while timing (above {MAX_LOAD_PER_CORE:.1f}: "
                       "more runnable threads than cores)")
    for name, figures in latencies.items():
        for batch_size in batch_sizes:
            spread = figures[f"latency_spread_bs{batch_size}"]
            if spread > max_spread:
                reasons.append(f"{name} p95/p50 spread {spread:.2f} at bs{batch_size} "
                               f"(over hardware.latency.noisy_spread={max_spread})")
    return "; ".join(reasons) or None

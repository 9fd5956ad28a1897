"""Every figure of the metric contract, measured on the finalized artifact and its baseline.

The compressed model is saved as its deployable artifact first and reloaded from that file, so
accuracy, size, MACs and latency are all taken on exactly what a user would ship.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_modules.contract import (
    ACC_DROP, ACC_DROP_CI95_HIGH, ACC_DROP_CI95_LOW, ACC_DROP_VS_TEACHER, BASELINE_MACS_DENSE, BASELINE_SIZE_BYTES,
    BASELINE_TEST_ACC, COMPRESSION_RATIO, COMPRESSION_RATIO_VS_TEACHER, DEQUANTIZED, ENCODING_TABLE, INT8_KERNEL_OPS,
    LATENCY_ATTEMPTS, LATENCY_LOAD_AVG, LATENCY_OTHERS_CORES, LAYERS_TABLE, MACS_DENSE, MACS_EFFECTIVE,
    MACS_EFFECTIVE_THEORETICAL, MODEL_FILE, NOISY_TAG,
    ONNX_ERROR_TAG, ONNX_FILE, SIMULATED, SIZE_BYTES, TEACHER_SIZE_BYTES, TEACHER_TEST_ACC, TEST_ACC, TEST_ACC_ONNX,
    TEST_IMAGES, TEST_LOSS, TIME_ONNX_S, TIMED_ON_TAG, baseline_metric, labelled,
    latency_ms_p50, reference_test_acc, size_bytes_of, speedup, speedup_ci95, teacher_metric, vs_teacher,
)
from lightning_modules.architecture import ModelRecipe
from lightning_modules.data import InMemoryDataModule, InputSpec
from lightning_modules.evaluation.accuracy import paired_drop_interval, predict
from lightning_modules.evaluation.artifact import (
    NARROW_ENCODINGS, ArtifactError, encoding_table, load_deployable, save_deployable,
)
from lightning_modules.deployable_int8 import decode_low_bit, dequantized, is_quantized
from lightning_modules.evaluation.complexity import count_macs
from lightning_modules.evaluation.latency import OthersCpu, load_per_core, measure_latency, processor_description
from lightning_modules.evaluation.timing_lock import idle, step_aside_if_asked, timing_alone
from lightning_modules.evaluation.runtime import (
    INT8_OPS, RUNTIMES, Deployed, OrtModel, export_onnx, optimized_ops, runtime_name,
)
from lightning_modules.layers import layer_table, parameter_counts

log = logging.getLogger(__name__)

# A timing is judged noisy (tag `latency_noisy`) when other processes used more than MAX_OTHERS_CORES
# cores' worth of CPU while it ran (where /proc/stat says; elsewhere: more runnable threads than cores
# by the load average), when the workbench's other jobs did not pause for it (timing_lock.py), or when a
# speedup's 95% interval reaches further from it than hardware.latency.noisy_speedup_error (a fraction
# of the speedup). 0.25: an idle 2-core machine reads 0.00-0.02, one busy neighbour 1.0, one computing
# a fifth of the time 0.08 (2026-12-04).
MAX_OTHERS_CORES = 0.25
MAX_LOAD_PER_CORE = 1.0
NOISY_SPEEDUP_ERROR_DEFAULT = 0.10


@dataclass
class Report:
    metrics: dict[str, float]
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # artifact file -> rows
    artifact: Path | None = None
    tags: dict[str, str] = field(default_factory=dict)  # latency_noisy (with its reason), when it applies
    # what the latency is of, when it is not the deployed weights on kernels of their own width:
    # "dequantized" (low-bit weights decoded to float at load), "simulated" (int8 run in float kernels)
    latency_label: str | None = None
    folder: Path | None = None  # the files to log with the run (model/, the tables): experiment.evaluate's


@dataclass
class Deployment:
    """A model as the runtime runs it, and the size of the file it ships as."""

    deployed: Deployed
    size_bytes: float  # the deployable file: the runtime's own, unless the workbench's stores narrower weights
    runtime_size_bytes: float | None = None  # the runtime's own file (.onnx), where it has one


def deploy_for_measure(model: nn.Module, name: str, runtime, hardware: DictConfig, device: torch.device,
                       folder: Path, input_shape: tuple[int, ...], recipe: ModelRecipe | None = None) -> Deployment:
    """Deploy a model that is measured beside the run's own (its baseline, its teacher) the way the
    run's model is deployed: the same runtime, its file written under `folder` only to be measured."""
    threads = hardware.get("threads")
    size = save_deployable(model, folder / f"{name}.pt", recipe)
    if runtime.save is None:
        return Deployment(runtime.deploy(model, device, threads, input_shape), size)
    path = folder / f"{name}{runtime.suffix}"
    runtime_size = runtime.save(model, path, input_shape)
    return Deployment(runtime.load(path, device, threads), size, runtime_size)


@dataclass
class Shipped:
    """The run's finalized model as it ships (read back from its file) and as the runtime runs it."""

    model: nn.Module  # loaded from the deployable file
    runtime: Any  # runtime.Runtime: how it runs
    deployment: Deployment
    packed: bool  # the file stores weights narrower than the runtime's own (packed low-bit codes, codebooks)
    encodings: list[dict[str, Any]]  # per tensor: how the file stores it
    figures: dict[str, float]  # the file sizes per format and the int8 kernel ops that ran
    onnx: OnnxExport  # model/model.onnx, or why there is none

    @cached_property
    def counted(self) -> nn.Module:
        """The model whose parameters and MACs are counted: int8 layers as their float shapes."""
        return dequantized(self.model) if is_quantized(self.model) else self.model

    @property
    def latency_label(self) -> str | None:
        """What the latency is of, when it is not the deployed weights on kernels of their own width
        (low-bit codes that run widened on int8 kernels are real int8 latency: no label)."""
        if self.runtime.int8_kernels and self.figures[INT8_KERNEL_OPS] > 0:
            return None
        return DEQUANTIZED if self.packed else SIMULATED if is_quantized(self.model) else None


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
    recipe: ModelRecipe | None = None,
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
    the model and its baseline: the `*_vs_teacher` figures. `recipe` is how the model and its
    baseline were built (the artifact stores it and what compression changed, not pickled code).
    """
    test = data.split("test")
    input_shape = tuple(test.tensors[0].shape[1:])
    shipped = deploy(model, hardware, device, artifact_dir, input_shape, recipe, data.input_spec)
    others = {"baseline": shipped.deployment} if model is baseline else {
        "baseline": deploy_for_measure(baseline, "baseline", shipped.runtime, hardware, device, scratch_dir,
                                       input_shape, recipe)}
    if teacher is not None:
        others["teacher"] = deploy_for_measure(teacher, "teacher", shipped.runtime, hardware, device, scratch_dir,
                                               input_shape)
    step_aside_if_asked()  # between steps: a job of this machine that asked to time goes first
    # scored in batches of the largest timed size: the graphs a compiled runtime builds for it serve both
    accuracy = accuracy_figures(shipped, others, references or {}, test, device, max(hardware.latency.batch_sizes))
    step_aside_if_asked()
    sizes = {name: other.size_bytes if shipped.packed or other.runtime_size_bytes is None else other.runtime_size_bytes
             for name, other in others.items()}
    metrics = {**accuracy, **size_figures(shipped, sizes["baseline"]),
               **complexity_figures(shipped.counted, None if model is baseline else baseline, input_shape)}
    timing = time_models(shipped, others, input_shape, hardware, device)
    metrics.update(latency_figures(timing, shipped.latency_label, list(hardware.latency.batch_sizes)))
    metrics.update(shipped.figures)
    step_aside_if_asked()
    metrics.update(onnx_accuracy(shipped, test, device, hardware.get("threads")))
    metrics[TEST_IMAGES] = float(len(test))
    if teacher is not None:
        metrics.update(teacher_figures(metrics, metrics.pop(TEACHER_TEST_ACC), sizes["teacher"],
                                       timing.latency["teacher"], list(hardware.latency.batch_sizes)))
    tables = {LAYERS_TABLE: layer_table(shipped.counted), ENCODING_TABLE: shipped.encodings}
    tags = {TIMED_ON_TAG: processor_description(device), **({NOISY_TAG: timing.noise} if timing.noise else {})}
    if shipped.onnx.error is not None:
        tags[ONNX_ERROR_TAG] = shipped.onnx.error
    return Report(metrics, tables, artifact_dir / MODEL_FILE, tags, shipped.latency_label)


def deploy(model: nn.Module, hardware: DictConfig, device: torch.device, artifact_dir: Path,
           input_shape: tuple[int, ...], recipe: ModelRecipe | None = None,
           input_spec: InputSpec | None = None) -> Shipped:
    """Write the deployable file(s) into `artifact_dir` and load what the runtime runs from them.

    The measured model is the file, not the object that produced it; low-bit codes are decoded once,
    at load: widened to int8 where the runtime has int8 kernels, else to float.
    """
    artifact = artifact_dir / MODEL_FILE
    size_bytes = save_deployable(model, artifact, recipe, input_spec)
    shipped = load_deployable(artifact, low_bit_as_int8=True)
    check_reproduces(model, shipped, input_shape, artifact)
    runtime = RUNTIMES[runtime_name(hardware, is_quantized(shipped))]  # hardware.compile may pick inductor
    onnx = OnnxExport()
    if runtime.save is None and hardware.get("export_onnx", True):  # ort writes it below, as its own file
        onnx = export_onnx_beside(shipped, artifact_dir / ONNX_FILE, input_shape)
    if not runtime.int8_kernels:
        shipped = decode_low_bit(shipped)
    threads = hardware.get("threads")
    encodings = encoding_table(shipped, artifact)
    packed = (any(getattr(module, "weight_bits", 8) < 8 for module in shipped.modules())
              or any(row["encoding"] in NARROW_ENCODINGS for row in encodings))
    figures: dict[str, float] = {size_bytes_of(Path(MODEL_FILE).suffix): size_bytes}
    if runtime.save is None:
        deployed = runtime.deploy(shipped, device, threads, input_shape)
        figures[INT8_KERNEL_OPS] = float(getattr(deployed, "int8_kernel_ops", 0))  # inductor counts its own
        return Shipped(shipped, runtime, Deployment(deployed, size_bytes), packed, encodings,
                       {**figures, **onnx.figures}, onnx)
    runtime_file = artifact_dir / f"{Path(MODEL_FILE).stem}{runtime.suffix}"
    runtime_size = runtime.save(shipped, runtime_file, input_shape)
    deployed = runtime.load(runtime_file, device, threads)
    figures[size_bytes_of(runtime.suffix)] = runtime_size
    figures[INT8_KERNEL_OPS] = sum(op in INT8_OPS for op in optimized_ops(runtime_file))
    # the runtime's own file ships, unless the workbench's stores narrower weights
    return Shipped(shipped, runtime, Deployment(deployed, runtime_size if not packed else size_bytes),
                   packed, encodings, figures, OnnxExport(runtime_file if runtime.suffix == ".onnx" else None))


@dataclass
class OnnxExport:
    """model/model.onnx beside model.pt: the file (None when not written), or why the model does not
    export (the run's ONNX_ERROR_TAG), and the seconds and bytes it took."""

    path: Path | None = None
    error: str | None = None
    figures: dict[str, float] = field(default_factory=dict)


def export_onnx_beside(shipped: nn.Module, path: Path, input_shape: tuple[int, ...]) -> OnnxExport:
    """Export the model as loaded from its file to ONNX (runtime.export_onnx: the form ONNX Runtime
    runs; packed low-bit codes widened to int8, as runtime ort runs them). A model that does not
    export is not a failed run: the reason comes back instead of the file."""
    started = time.perf_counter()
    try:
        size = export_onnx(shipped, path, input_shape)
        # a batch the export did not trace: a model whose output fixes the batch fails here, not when scored
        OrtModel(path, 1)(torch.zeros((3, *input_shape)))
    except Exception as error:  # the exporter's errors are of many kinds (torch.export, onnxscript, onnx)
        path.unlink(missing_ok=True)
        reason = export_failure(error)
        log.warning("model.onnx not written: the finalized model does not export (%s)", reason)
        return OnnxExport(None, reason, {TIME_ONNX_S: time.perf_counter() - started})
    return OnnxExport(path, None, {size_bytes_of(path.suffix): size, TIME_ONNX_S: time.perf_counter() - started})


def export_failure(error: BaseException) -> str:
    """One line on why the export failed: the exporter's own error (its first line) and, under it,
    the root cause it wraps (e.g. `No ONNX function found for <OpOverload(op='prims.bessel_i0e')>`)."""
    def first_line(exception: BaseException) -> str:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exception)).strip()
        return f"{type(exception).__name__}: {text.splitlines()[0] if text else ''}"

    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    line = first_line(error) if root is error else f"{first_line(error)} (cause: {first_line(root)})"
    return line[:1000]


def onnx_accuracy(shipped: Shipped, test, device: torch.device, threads: int | None) -> dict[str, float]:
    """TEST_ACC_ONNX: model/model.onnx in ONNX Runtime on the test split (TIME_ONNX_S includes it)."""
    if shipped.onnx.path is None:
        return {}
    started = time.perf_counter()
    accuracy = 100.0 * predict(OrtModel(shipped.onnx.path, threads), test, torch.device("cpu")).accuracy
    return {TEST_ACC_ONNX: accuracy,
            TIME_ONNX_S: shipped.figures.get(TIME_ONNX_S, 0.0) + time.perf_counter() - started}


@torch.no_grad()
def check_reproduces(model: nn.Module, loaded: nn.Module, input_shape: tuple[int, ...], path: Path) -> None:
    """The file must give back the model that was measured for it: the same outputs on a fixed random
    batch (bit for bit in practice; a float tolerance for kernels that pick another algorithm)."""
    inputs = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(0))
    device = next(iter(model.buffers()), next(model.parameters(), None))
    expected = model.eval()(inputs.to(device.device if device is not None else "cpu")).float().cpu()
    got = loaded.eval()(inputs).float()
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ArtifactError(f"{path}: the artifact does not reproduce the model it was written from (largest "
                            f"output difference {(got - expected).abs().max():.3g}): a module or attribute the "
                            f"artifact cannot describe")


def accuracy_figures(shipped: Shipped, others: dict[str, Deployment], references: dict[str, nn.Module],
                     test, device: torch.device, batch_size: int) -> dict[str, float]:
    """Accuracy of the deployed model, its baseline's, the paired interval of the drop; the teacher's
    (TEACHER_TEST_ACC) and each reference model's (`test_acc_<name>`) when there are any."""
    predictions = predict(shipped.deployment.deployed, test, device, batch_size)
    baseline = others["baseline"]
    baseline_predictions = (predictions if baseline is shipped.deployment
                            else predict(baseline.deployed, test, device, batch_size))
    drop_low, drop_high = paired_drop_interval(baseline_predictions.correct, predictions.correct)
    figures = {
        TEST_ACC: 100.0 * predictions.accuracy,
        TEST_LOSS: predictions.loss,
        BASELINE_TEST_ACC: 100.0 * baseline_predictions.accuracy,
        ACC_DROP: 100.0 * (baseline_predictions.accuracy - predictions.accuracy),
        ACC_DROP_CI95_LOW: drop_low,
        ACC_DROP_CI95_HIGH: drop_high,
    }
    for name, reference in references.items():
        figures[reference_test_acc(name)] = 100.0 * predict(reference.eval().to(device), test, device, batch_size).accuracy
    if "teacher" in others:
        figures[TEACHER_TEST_ACC] = 100.0 * predict(others["teacher"].deployed, test, device, batch_size).accuracy
    return figures


def size_figures(shipped: Shipped, baseline_size: float) -> dict[str, float]:
    """Bytes of the deployable as stored, and the ratio to its baseline deployed the same way."""
    size = shipped.deployment.size_bytes
    return {SIZE_BYTES: size, BASELINE_SIZE_BYTES: baseline_size, COMPRESSION_RATIO: baseline_size / size}


def complexity_figures(counted: nn.Module, baseline: nn.Module | None, input_shape: tuple[int, ...]) -> dict[str, float]:
    """Parameter counts and MACs at batch 1 of the finalized model (`baseline` None: it is the baseline)."""
    macs = count_macs(counted, input_shape)
    baseline_macs = macs if baseline is None else count_macs(baseline, input_shape)
    return {
        **parameter_counts(counted),
        MACS_DENSE: macs["macs_dense"],
        # PyTorch's dense kernels multiply zeros too: effective == dense; the sparse count is theoretical.
        MACS_EFFECTIVE: macs["macs_dense"],
        MACS_EFFECTIVE_THEORETICAL: macs["macs_nonzero"],
        BASELINE_MACS_DENSE: baseline_macs["macs_dense"],
    }


@dataclass
class Timing:
    """Latencies of the models timed side by side, the machine's load meanwhile, and why they are noisy."""

    latency: dict[str, dict[str, float]]  # "model", "baseline" (unless it is the model), "teacher"
    load: float
    noise: str | None
    others_cores: float = float("nan")  # cores' worth of CPU other processes used meanwhile (latency.OthersCpu)
    attempts: int = 1  # timings taken: more than one when the first were noisy (hardware.latency.retries)


def time_models(shipped: Shipped, others: dict[str, Deployment], input_shape: tuple[int, ...],
                hardware: DictConfig, device: torch.device) -> Timing:
    """Time the model with its baseline (and teacher) interleaved, in this process, on `hardware`; a noisy
    timing is taken again, up to hardware.latency.retries times, hardware.latency.retry_wait_s apart.

    The workbench's jobs pause while one times (timing_lock.py), but not what runs outside them: in a
    joblib sweep a fresh worker process imports torch for ~10 s of a core, and an Inductor compile starts its
    pool of compile processes. In the scorecard's first pass with two jobs at a time, 21 of 98 timings
    saw 0.3-1.3 cores busy elsewhere; such a moment passes within seconds."""
    timed = {"model": shipped.deployment.deployed,
             **{name: other.deployed for name, other in others.items() if other is not shipped.deployment}}
    attempts, wait_s = 1 + int(hardware.latency.get("retries", 0)), hardware.latency.get("retry_wait_s", 5.0)
    for attempt in range(1, attempts + 1):
        timing = _time_once(timed, input_shape, hardware, device)
        if timing.noise is None or attempt == attempts:
            break
        log.info("timing noisy (%s): timed again in %.0f s", timing.noise, wait_s)
        with idle():  # this job's neighbours go on meanwhile
            time.sleep(wait_s)
    timing.attempts = attempt
    return timing


def _time_once(timed: dict[str, Deployed], input_shape: tuple[int, ...], hardware: DictConfig,
               device: torch.device) -> Timing:
    batch_sizes = list(hardware.latency.batch_sizes)
    load_before = load_per_core()
    with timing_alone() as alone:  # the workbench's other jobs on this machine pause meanwhile
        others = OthersCpu()
        latency = measure_latency(timed, input_shape, batch_sizes, device, warmup=hardware.latency.warmup,
                                  repeats=hardware.latency.repeats, min_time_s=hardware.latency.get("min_time_s", 0.0),
                                  reference="baseline" if "baseline" in timed else None)
        others.stop()
    load = max(load_before, load_per_core())  # nan only where the platform has no load average
    noise = noisy_timing_reason(load, latency["model"], batch_sizes,
                                hardware.latency.get("noisy_speedup_error", NOISY_SPEEDUP_ERROR_DEFAULT),
                                others.cores, alone.gave_up_after_s)
    return Timing(latency, load, noise, others.cores)


def latency_figures(timing: Timing, label: str | None, batch_sizes: list[int]) -> dict[str, float]:
    """The model's latencies, its baseline's p50 and the speedups; repeated under `label` (dequantized,
    simulated) when the latency is not of the deployed weights on kernels of their own width."""
    model_latency = timing.latency["model"]
    baseline_latency = timing.latency.get("baseline", model_latency)
    figures = {**model_latency, LATENCY_LOAD_AVG: timing.load, LATENCY_OTHERS_CORES: timing.others_cores,
               LATENCY_ATTEMPTS: float(timing.attempts)}
    for batch_size in batch_sizes:
        key = latency_ms_p50(batch_size)
        figures[baseline_metric(key)] = baseline_latency[key]
        if "baseline" not in timing.latency:  # the model is the baseline
            figures.update(dict.fromkeys((speedup(batch_size), *speedup_ci95(batch_size)), 1.0))
        if label is not None:
            figures[labelled(label, key)] = model_latency[key]
            figures[labelled(label, speedup(batch_size))] = figures[speedup(batch_size)]
    return figures


def teacher_figures(metrics: dict[str, float], teacher_acc: float, teacher_size: float,
                    teacher_latency: dict[str, float], batch_sizes: list[int]) -> dict[str, float]:
    """The student against its teacher, beside the figures against its own baseline."""
    figures = {
        TEACHER_TEST_ACC: teacher_acc,
        ACC_DROP_VS_TEACHER: teacher_acc - metrics[TEST_ACC],
        TEACHER_SIZE_BYTES: teacher_size,
        COMPRESSION_RATIO_VS_TEACHER: teacher_size / metrics[SIZE_BYTES],
    }
    for batch_size in batch_sizes:
        key = latency_ms_p50(batch_size)
        figures[teacher_metric(key)] = teacher_latency[key]
        figures[vs_teacher(speedup(batch_size))] = teacher_latency[key] / metrics[key]
    return figures


def noisy_timing_reason(load_per_core: float, model_latency: dict[str, float], batch_sizes: list[int],
                        max_error: float, others_cores: float = float("nan"),
                        not_alone_after_s: float | None = None) -> str | None:
    """Why the timing cannot be trusted as it stands, or None: other processes busy on more than
    MAX_OTHERS_CORES cores while timing (where that is measured, else the load average above 1 per core),
    the workbench's other jobs not paused for it (`not_alone_after_s`: how long it waited for them), or a
    speedup whose 95% interval reaches further than `max_error` (a fraction of the speedup,
    hardware.latency.noisy_speedup_error) on either side of it."""
    reasons = []
    if not math.isnan(others_cores):
        if others_cores > MAX_OTHERS_CORES:
            reasons.append(f"other processes used {others_cores:.2f} cores while timing (above {MAX_OTHERS_CORES})")
    elif load_per_core > MAX_LOAD_PER_CORE:
        reasons.append(f"load {load_per_core:.2f} per core while timing (above {MAX_LOAD_PER_CORE:.1f}: "
                       "more runnable threads than cores)")
    if not_alone_after_s is not None:
        reasons.append(f"other jobs did not pause for the timing within {not_alone_after_s:.0f} s")
    for batch_size in batch_sizes:
        if speedup(batch_size) not in model_latency:
            continue  # the baseline's own run: nothing compared
        value = model_latency[speedup(batch_size)]
        low, high = (model_latency[key] for key in speedup_ci95(batch_size))
        error = max(value - low, high - value) / value
        if error > max_error:
            reasons.append(f"speedup_bs{batch_size} {value:.2f} has a 95% interval [{low:.2f}, {high:.2f}] "
                           f"(+-{error:.0%}, over hardware.latency.noisy_speedup_error={max_error})")
    return "; ".join(reasons) or None

"""Latency and throughput, measured for several models side by side in one process.

Timing the same model twice in two processes can differ by 40% at batch 1 on a small machine,
so models that are compared (a compressed model and its baseline) are timed here interleaved:
after a warm-up, each repetition times every model once, in a shuffled order, each timed call right
after an untimed call of the same model (it finds its own weights in the caches, as a model serving
one request after another does). Timed in a fixed order straight after a resnet20 teacher, a lenet5
read 0.64-0.72x of an identical copy at batch 1 (0.93x at batch 32), as every distilled student's
speedup did; shuffled and re-warmed, 1.02-1.04x and 0.96-1.00x (scripts: one thread, 100 repeats).
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lightning_modules.contract import (
    latency_ms_p50, latency_ms_p95, latency_spread, speedup, speedup_ci95, throughput,
)
from lightning_modules.evaluation.runtime import Deployed, deploy, measured_runtime, time_int8_layer
from lightning_modules.evaluation.timing_lock import timing_alone


def _synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


@torch.inference_mode()
def measure_latency(
    models: dict[str, Deployed],
    input_shape: tuple[int, ...],
    batch_sizes: list[int],
    device: torch.device,
    warmup: int = 10,
    repeats: int = 50,
    min_time_s: float = 0.0,
    reference: str | None = None,
) -> dict[str, dict[str, float]]:
    """Return {model name: {latency_ms_p50_bs<B>, latency_ms_p95_bs<B>, latency_spread_bs<B>, throughput_bs<B>}},
    and, for every model but `reference` when one is named, speedup_bs<B> over it with its 95% interval
    (speedup_bs<B>_ci95_low/high, `speedup_interval`).

    latency_spread_bs<B> = p95 / p50 of that model: 1.0 for a steady timing. It describes the model's
    tail, not whether a comparison can be trusted: a sub-millisecond model on an idle machine reads 1.1-2.2
    (timer interrupts); the speedup's interval is what says how sure the comparison is.

    `min_time_s`: each batch size is timed for at least about this long: fast models get more than
    `repeats` repetitions (as timeit's autorange does). 50 repetitions of a 0.5 ms lenet5 int8/fp32
    pair on ONNX Runtime lasted 25 ms and read 0.69-1.24x at batch 32 over six rounds in one process;
    timed for 1 s, 0.80-1.05x.
    """
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        with timing_alone():  # the workbench's other jobs pause meanwhile (timing_lock.py)
            times = _interleaved_times(models, torch.randn((batch_size, *input_shape), device=device),
                                       _synchronizer(device), warmup, repeats, min_time_s)
        p50 = {name: float(np.percentile(ms, 50)) for name, ms in times.items()}
        for name, ms in times.items():
            p95 = float(np.percentile(ms, 95))
            results[name].update({latency_ms_p50(batch_size): p50[name], latency_ms_p95(batch_size): p95,
                                  latency_spread(batch_size): p95 / p50[name],
                                  throughput(batch_size): batch_size * 1000.0 / p50[name]})
            if reference is not None and name != reference:
                low, high = speedup_interval(times[reference], ms)
                results[name].update({speedup(batch_size): p50[reference] / p50[name],
                                      speedup_ci95(batch_size)[0]: low, speedup_ci95(batch_size)[1]: high})
    return results


def _interleaved_times(models: dict[str, Deployed], inputs: torch.Tensor, sync: Callable[[], None], warmup: int,
                       repeats: int, min_time_s: float) -> dict[str, np.ndarray]:
    """Milliseconds of each model's timed calls; call i of every model comes from repetition i."""
    for model in models.values():
        for _ in range(warmup):
            model(inputs)
    sync()
    shuffler = random.Random(0)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models.items())
    for _ in range(_repeats_for(order, inputs, sync, repeats, min_time_s)):
        shuffler.shuffle(order)  # no model always follows the same one
        for name, model in order:
            model(inputs)  # untimed: the caches now hold this model, not the one timed before it
            sync()
            start = time.perf_counter()
            model(inputs)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: np.asarray(samples) * 1000.0 for name, samples in times.items()}


def speedup_interval(reference_ms: np.ndarray, model_ms: np.ndarray, resamples: int = 400,
                     seed: int = 0) -> tuple[float, float]:
    """The 95% interval of median(reference) / median(model), by a paired bootstrap over the repetitions.

    A repetition's two timings are drawn together: both felt the same moment of the machine.
    scripts/benchmark_latency_noise.py times identical pairs (true speedup 1.0: lenet300, lenet5, resnet20
    eager on one thread, lenet5 in two ONNX Runtime sessions on one thread and on all cores; batches 1
    and 32; 1 s each) as runs do. On the idle 2-core machine none of 30 readings was more than 5% off,
    and two intervals reached further than 10% (ONNX Runtime on all cores at batch 32: 18% and 40%).
    Beside 1-3 busy processes, 8 of 90 readings were 7-53% off, and all 8 intervals reached further
    than 10% (2026-12-01).
    """
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, 50):  # 50 resamples at a time: bounded memory for long timings
        picks = rng.integers(0, len(model_ms), size=(min(50, resamples - start), len(model_ms)))
        ratios.append(np.median(reference_ms[picks], axis=1) / np.median(model_ms[picks], axis=1))
    low, high = np.percentile(np.concatenate(ratios), [2.5, 97.5])
    return float(low), float(high)


def _repeats_for(models: list, inputs: torch.Tensor, sync: Callable[[], None], repeats: int,
                 min_time_s: float) -> int:
    """`repeats`, or more where one repetition (two calls of every model) is shorter than min_time_s / repeats."""
    if min_time_s <= 0:
        return repeats
    start = time.perf_counter()
    for _, model in models:
        model(inputs)
    sync()
    per_repetition = 2 * (time.perf_counter() - start)
    return max(repeats, math.ceil(min_time_s / max(per_repetition, 1e-6)))


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# torch's intra-op threads when nothing set them: one per core this process may use (torch's own choice)
DEFAULT_TORCH_THREADS = torch.get_num_threads()


def configured_threads(hardware, training: bool = False) -> int | None:
    """The threads the config sets for measuring (`hardware.threads`) or, with `training`, for training
    (`hardware.train_threads`, else the same); None: every core. What trains is not what is measured: a
    parallel sweep may train each job on one core and still time the artifact on every core (timings run
    alone: timing_lock.py)."""
    return (hardware.get("train_threads") if training else None) or hardware.get("threads")


def training_threads(hardware) -> int:
    """torch threads while a run trains (its baseline, a teacher, the fine-tune)."""
    return configured_threads(hardware, training=True) or DEFAULT_TORCH_THREADS


def measuring_threads(hardware) -> int:
    """torch threads while the artifact and its baseline are scored and timed."""
    return configured_threads(hardware) or DEFAULT_TORCH_THREADS


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside, set back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# /proc/cpuinfo flags of an int8 dot-product instruction: without one (AVX2; AVX-512 before VNNI) an x86 CPU
# multiplies uint8 x int8 in 16-bit pairs, and int8 pays less against fp32 than on one with it
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def processor_description(device: torch.device | str = "cpu") -> str:
    """What the latencies were measured on, for the run's `timed_on` tag: speedups differ between machines
    (resnet20's int8 model on Inductor read 1.89x its fp32 form at batch 32 on 2026-12-02, 1.05x on 2026-12-04 on
    an AVX2 host without VNNI; the runs did not say what they ran on).

    A CUDA device is named by the GPU; a CPU by its model name, the vector instructions PyTorch uses on it,
    whether it has int8 dot products (Linux only) and the cores this process may use.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    name, flags = _cpuinfo()
    parts = [name or platform.processor() or platform.machine(), torch.backends.cpu.get_cpu_capability()]
    if flags:
        parts[-1] += " with VNNI" if flags & set(INT8_DOT_FLAGS) else " without VNNI"
    cores = available_cores()
    return ", ".join([*parts, f"{cores} core{'s' if cores > 1 else ''}"])


def _cpuinfo() -> tuple[str, set[str]]:
    """The first CPU's model name and flags in /proc/cpuinfo ("" and none where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    fields = dict(line.split(":", 1) for line in text.split("\n\n", 1)[0].splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    return fields.get("model name", ""), set(fields.get("flags", "").split())


class OthersCpu:
    """Cores' worth of CPU time the machine's other processes used between its creation and `stop()`.

    Read from /proc/stat (every core's busy time) less this process's own CPU time (all its threads,
    ONNX Runtime's pool included), over the block's wall time: 0.0-0.02 on this 2-core machine idle,
    1.0 beside one busy process, 0.08 beside one that computes 20% of the time. Unlike the 1-minute load
    average, it covers the timing only: jobs that trained until a second ago and now pause for it
    (timing_lock.py) do not count. nan where /proc/stat cannot be read (macOS, Windows).
    """

    def __init__(self) -> None:
        self.cores = float("nan")
        self._start = (_machine_busy_s(), time.process_time(), time.monotonic())

    def stop(self) -> float:
        machine, own, wall = _machine_busy_s(), time.process_time(), time.monotonic()
        elapsed = wall - self._start[2]
        if elapsed > 0 and not math.isnan(machine):
            others = (machine - self._start[0]) - (own - self._start[1])
            self.cores = max(0.0, others / elapsed)
        return self.cores


def _machine_busy_s() -> float:
    """Seconds every core of the machine has spent busy since boot (/proc/stat), or nan."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def load_per_core() -> float:
    """The machine's 1-minute load average (runnable threads, ours included) per available core.

    Above 1.0 more threads want a core than there are cores: a timing taken then is contended.
    """
    try:
        return os.getloadavg()[0] / available_cores()
    except OSError:  # no load average on this platform
        return float("nan")


@torch.inference_mode()
def paired_times(dense: nn.Module, factored: nn.Module, inputs: torch.Tensor, warmup: int = 10,
                 pairs: int = 60, min_time_s: float = 0.0) -> tuple[float, float, float]:
    """(dense p50 ms, factored p50 ms, median of dense/factored over back-to-back pairs).

    Each pair times both modules on the same input one right after the other, alternating which
    goes first; a neighbour process that slows the core for a while then slows both halves of a
    pair alike, so the median pair ratio moves less than the ratio of the two medians does.
    Each timed call follows an untimed call of the same module, as in measure_latency: timed straight
    after the other, the second of a pair found the caches full of the first and, on ONNX Runtime's
    thread pool, the first session's threads still spinning (LeNet-5 int8 against float with its
    slowest layers float read 0.63x paired where its medians gave 0.90x).
    At least `pairs` pairs, and more until `min_time_s` has passed (sub-millisecond models).
    """
    sync = torch.cuda.synchronize if inputs.is_cuda else (lambda: None)
    with timing_alone():  # the workbench's other jobs pause meanwhile (timing_lock.py)
        for _ in range(warmup):
            dense(inputs)
            factored(inputs)
        sync()
        dense_s, factored_s = [], []
        end = time.perf_counter() + min_time_s
        pair = 0
        while pair < pairs or time.perf_counter() < end:
            for which in ((0, 1) if pair % 2 == 0 else (1, 0)):
                module = (dense, factored)[which]
                module(inputs)  # untimed: this module's weights in the caches, the other's threads settled
                sync()
                start = time.perf_counter()
                module(inputs)
                sync()
                (dense_s, factored_s)[which].append(time.perf_counter() - start)
            pair += 1
    ratios = np.asarray(dense_s) / np.asarray(factored_s)
    return float(np.median(dense_s)) * 1000.0, float(np.median(factored_s)) * 1000.0, float(np.median(ratios))


# A quantization gate's whole-model timing: 60 pairs of a sub-millisecond LeNet-5 last under 0.1 s, short
# enough for one stall to move the ratio across min_speedup; half a second of pairs steadies it.
WHOLE_MODEL_MIN_TIME_S = 0.5


class LatencyTimer:
    """The timings a callback's `min_speedup` decides from (compression/base.py: Timer). The
    pipeline hands one to every callback (config.build_callbacks): compression/ imports nothing of
    evaluation/, so what times a layer on a runtime is received, not imported.

    `threads`: torch's threads while it times (the run's measuring threads): a gate decided during
    training, which may run on fewer threads (`hardware.train_threads`), times as the artifact will run."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or DEFAULT_TORCH_THREADS

    def paired(self, first: nn.Module, second: nn.Module, inputs: torch.Tensor) -> tuple[float, float, float]:
        """(first p50 ms, second p50 ms, median first/second over back-to-back pairs): see paired_times."""
        with torch_threads(self.threads):
            return paired_times(first, second, inputs)

    def int8_runtime(self, runtime: str, compile_mode: bool | str) -> str:
        """The runtime an int8 model runs on for hardware.runtime and hardware.compile."""
        return measured_runtime(runtime, compile_mode, quantized=True)

    def float_and_int8(self, runtime: str, float_layer: nn.Module, int8_layer: nn.Module,
                       input_shape: tuple[int, ...], batch: int, threads: int | None) -> tuple[float, float]:
        """p50 ms of one layer in float and in int8 on `runtime`: see runtime.time_int8_layer."""
        with torch_threads(self.threads):
            return time_int8_layer(runtime, float_layer, int8_layer, input_shape, batch, threads)

    def whole_models(self, reference: nn.Module, candidates: Iterable[tuple[str, nn.Module]], runtime: str,
                     input_shape: tuple[int, ...], batch: int, threads: int | None,
                     min_time_s: float = WHOLE_MODEL_MIN_TIME_S) -> Iterator[tuple[str, float, float, float]]:
        """(label, p50 ms at `batch`, reference p50 ms, speedup over the reference) of each candidate whole
        model deployed on `runtime`, yielded as it is timed: a caller that stops at the first candidate
        fast enough builds and deploys no more of them, and the reference is deployed once (an Inductor
        compile of resnet20 takes seconds). Each candidate is timed against the reference in back-to-back
        pairs (paired_times: the median pair ratio moves less with a neighbour's load than a ratio of two
        medians does), for at least `min_time_s`."""
        cpu = torch.device("cpu")
        deployed_reference = deploy(reference, runtime, cpu, threads, input_shape)  # Inductor compiles at the first call
        with torch.inference_mode():  # an inference tensor, as every timing's input (runtime.CompiledModel)
            inputs = torch.randn(batch, *input_shape)
        for label, model in candidates:
            with torch_threads(self.threads):
                reference_ms, model_ms, speedup = paired_times(
                    deployed_reference, deploy(model, runtime, cpu, threads, input_shape), inputs,
                    min_time_s=min_time_s)
            yield label, model_ms, reference_ms, speedup  # the caller's threads while it decides

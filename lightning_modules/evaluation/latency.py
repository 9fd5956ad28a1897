"""Latency and throughput, measured for several models side by side in one process.

Timing the same model twice in two processes can differ by 40% at batch 1 on a small machine,
so models that are compared (a compressed model and its baseline) are timed here interleaved:
after a warm-up, each repetition times every model once, in turn.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
import torch

from lightning_modules.contract import latency_ms_p50, latency_ms_p95, latency_spread, throughput
from lightning_modules.evaluation.runtime import Deployed


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
) -> dict[str, dict[str, float]]:
    """Return {model name: {latency_ms_p50_bs<B>, latency_ms_p95_bs<B>, latency_spread_bs<B>, throughput_bs<B>}}.

    latency_spread_bs<B> = p95 / p50 of that model: 1.0 for a steady timing; a machine whose other
    work preempts the timed model now and then shows a long p95 tail first.
    """
    sync = _synchronizer(device)
    results: dict[str, dict[str, float]] = {name: {} for name in models}
    for batch_size in batch_sizes:
        inputs = torch.randn((batch_size, *input_shape), device=device)
        for model in models.values():
            for _ in range(warmup):
                model(inputs)
        sync()
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(inputs)
                sync()
                times[name].append(time.perf_counter() - start)
        for name, samples in times.items():
            ms = np.asarray(samples) * 1000.0
            p50 = float(np.percentile(ms, 50))
            results[name][latency_ms_p50(batch_size)] = p50
            p95 = float(np.percentile(ms, 95))
            results[name][latency_ms_p95(batch_size)] = p95
            results[name][latency_spread(batch_size)] = p95 / p50
            results[name][throughput(batch_size)] = batch_size * 1000.0 / p50
    return results


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def load_per_core() -> float:
    """The machine's 1-minute load average (runnable threads, ours included) per available core.

    Above 1.0 more threads want a core than there are cores: a timing taken then is contended.
    """
    try:
        return os.getloadavg()[0] / available_cores()
    except OSError:  # no load average on this platform
        return float("nan")

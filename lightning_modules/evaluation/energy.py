"""Energy per run, named as what it is.

Estimates (every run): time the run already measured x the power the hardware config declares
(`hardware.power`):
    energy_j_per_image_estimate = latency p50 at the largest batch timed (s) x watts / batch
    energy_train_kj_estimate    = train_time_s x watts / 1000
with watts = watts_per_core x the cores the run uses (hardware.threads, else all) on a CPU, or the GPU's
board power on cuda. It assumes those cores are busy the whole time and leaves out memory, board and
idle power: a figure for comparing runs on one machine, not a meter reading.

Measured (where a counter can be read): RAPL's cumulative package energy under /sys/class/powercap
(Linux, Intel and recent AMD; often root-only), or NVML's total energy on an NVIDIA GPU. The counter is
read around the training and around a fixed loop of the finalized model at that batch size; the figures
go in as energy_*_measured and the tag `energy_source` names the counter, or says why there is none.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from lightning_modules.contract import (
    ENERGY_J_PER_IMAGE_ESTIMATE, ENERGY_J_PER_IMAGE_MEASURED, ENERGY_TRAIN_KJ_ESTIMATE, ENERGY_TRAIN_KJ_MEASURED,
    TRAIN_TIME_S, latency_ms_p50,
)
from lightning_modules.evaluation.timing_lock import timing_alone

POWERCAP = Path("/sys/class/powercap")
MEASURE_SECONDS = 2.0  # how long the finalized model runs while a counter measures inference


@dataclass(frozen=True)
class PowerModel:
    """The power a run draws while busy, from `hardware.power`."""

    watts_per_core: float
    gpu_watts: float | None = None

    @classmethod
    def from_hardware(cls, hardware: DictConfig) -> PowerModel:
        """Raises:
            ValueError: a missing or non-positive hardware.power.watts_per_core, or gpu_watts on cuda.
        """
        power = hardware.get("power") or {}
        watts = power.get("watts_per_core")
        if not isinstance(watts, (int, float)) or watts <= 0:
            raise ValueError(f"hardware.power.watts_per_core={watts!r}: a positive number of watts (conf/hardware/cpu.yaml)")
        gpu = power.get("gpu_watts")
        if hardware.device == "cuda" and (not isinstance(gpu, (int, float)) or gpu <= 0):
            raise ValueError(f"hardware.power.gpu_watts={gpu!r}: the GPU's board power in watts, needed on device cuda")
        return cls(float(watts), None if gpu is None else float(gpu))

    def watts(self, device: str, cores: int) -> float:
        return self.gpu_watts if device == "cuda" and self.gpu_watts else self.watts_per_core * cores


def largest_timed_batch(metrics: Mapping[str, float]) -> int | None:
    """The largest batch size whose median latency the run logged."""
    batches = [int(name.rsplit("bs", 1)[1]) for name in metrics
               if name.startswith("latency_ms_p50_bs") and name.rsplit("bs", 1)[1].isdigit()]
    return max(batches) if batches else None


def estimate_figures(metrics: Mapping[str, float], train_time_s: float | None, hardware: DictConfig,
                     cores: int, train_cores: int | None = None) -> dict[str, float]:
    """The estimates from what the run measured (see the module's docstring); a figure whose time
    was not measured is left out. `cores` measured the model, `train_cores` (default: `cores`) trained it."""
    power = PowerModel.from_hardware(hardware)
    figures = {}
    batch = largest_timed_batch(metrics)
    if batch is not None:
        figures[ENERGY_J_PER_IMAGE_ESTIMATE] = (metrics[latency_ms_p50(batch)] / 1000
                                                * power.watts(hardware.device, cores) / batch)
    if train_time_s is not None:
        figures[ENERGY_TRAIN_KJ_ESTIMATE] = train_time_s * power.watts(hardware.device, train_cores or cores) / 1000
    return figures


# ----------------------------------------------------------------------------- counters


@dataclass
class Counter:
    """A cumulative energy counter in joules, read by `read`, with the name of its source."""

    source: str
    read: Callable[[], float]

    def joules_during(self, work: Callable[[], object]) -> float:
        start = self.read()
        work()
        return self.read() - start


def rapl_counter(root: Path = POWERCAP) -> Counter | None:
    """The sum of the top-level RAPL package zones (intel-rapl:N/energy_uj), when readable.
    Wrap-around of a zone (max_energy_range_uj) is corrected between two reads."""
    zones = sorted(path.parent for path in root.glob("intel-rapl:*/energy_uj") if path.parent.name.count(":") == 1)
    readable = []
    for zone in zones:
        try:
            (zone / "energy_uj").read_text()
            readable.append(zone)
        except OSError:
            continue
    if not readable:
        return None
    ranges = {zone: _read_int(zone / "max_energy_range_uj") for zone in readable}
    last: dict[Path, int] = {}
    total = [0.0]

    def read() -> float:
        for zone in readable:
            value = _read_int(zone / "energy_uj")
            if zone in last:
                step = value - last[zone]
                total[0] += (step if step >= 0 else step + (ranges[zone] or 0)) / 1e6
            last[zone] = value
        return total[0]

    read()
    return Counter("rapl:" + ",".join(zone.name for zone in readable), read)


def nvml_counter(device: torch.device) -> Counter | None:
    """NVML's total energy of the GPU (millijoules since the driver loaded), when pynvml and the GPU answer."""
    if device.type != "cuda":
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    except Exception:  # noqa: BLE001 - no library, no driver, a GPU older than Volta: no counter
        return None
    return Counter(f"nvml:gpu{device.index or 0}", lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000)


def open_counter(device: torch.device, root: Path = POWERCAP) -> Counter | None:
    """NVML on a GPU, else RAPL, else None."""
    return nvml_counter(device) or rapl_counter(root)


def no_counter_reason(device: torch.device, root: Path = POWERCAP) -> str:
    where = "NVML (pynvml) or " if device.type == "cuda" else ""
    return (f"estimate only: no readable energy counter ({where}RAPL: no readable {root}/intel-rapl:*/energy_uj); "
            f"the *_estimate figures are time x hardware.power")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- measured figures


def measured_inference(counter: Counter, model: nn.Module, example: torch.Tensor,
                       seconds: float = MEASURE_SECONDS) -> float:
    """Joules per image of `model` on the batch `example`, from the counter around a loop of at least
    `seconds` (the counter's resolution is coarse: RAPL updates about every millisecond)."""
    images = 0

    def loop() -> None:
        nonlocal images
        deadline = time.perf_counter() + seconds
        with torch.inference_mode():
            while time.perf_counter() < deadline:
                model(example)
                images += example.shape[0]
        if example.device.type == "cuda":
            torch.cuda.synchronize(example.device)

    with timing_alone():  # a reading of the whole machine's counter: the workbench's other jobs pause
        joules = counter.joules_during(loop)
    return joules / max(images, 1)


def energy_report(metrics: Mapping[str, float], timings: Mapping[str, float], hardware: DictConfig, cores: int,
                  counter: Counter | None, model: nn.Module | None = None,
                  input_shape: tuple[int, ...] | None = None, train_cores: int | None = None,
                  ) -> tuple[dict[str, float], str]:
    """The run's energy figures and its `energy_source` tag: the estimates always; the measured
    inference figure when a counter reads (the measured training figure is in `timings` when the
    training was metered: `meter_training`)."""
    figures = estimate_figures(metrics, timings.get(TRAIN_TIME_S), hardware, cores, train_cores)
    if counter is None:
        return figures, no_counter_reason(torch.device(hardware.device))
    batch = largest_timed_batch(metrics)
    if model is not None and input_shape is not None and batch is not None:
        example = torch.randn(batch, *input_shape, device=torch.device(hardware.device))
        figures[ENERGY_J_PER_IMAGE_MEASURED] = measured_inference(counter, model.to(example.device), example)
    if ENERGY_TRAIN_KJ_MEASURED in timings:
        figures[ENERGY_TRAIN_KJ_MEASURED] = timings[ENERGY_TRAIN_KJ_MEASURED]
    return figures, counter.source


def energy_source(device: torch.device, root: Path = POWERCAP) -> str:
    """The run's `energy_source` tag: the counter that measures, or why the figures are estimates only."""
    counter = open_counter(device, root)
    return counter.source if counter is not None else no_counter_reason(device, root)


@contextmanager
def metered_training(device: torch.device, timings: dict[str, float]) -> Iterator[None]:
    """Around a training: energy_train_kj_measured into `timings` when a counter reads (else nothing)."""
    counter = open_counter(device)
    start = counter.read() if counter is not None else 0.0
    yield
    if counter is not None:
        timings[ENERGY_TRAIN_KJ_MEASURED] = (counter.read() - start) / 1000


def run_cores(hardware: DictConfig, training: bool = False) -> int:
    """The cores a run measures on (hardware.threads, else every core it may use) or, with `training`,
    trains on (hardware.train_threads, else the same)."""
    from lightning_modules.evaluation.latency import available_cores, configured_threads

    return min(configured_threads(hardware, training) or available_cores(), available_cores())

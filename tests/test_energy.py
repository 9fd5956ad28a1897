"""Energy per run: the estimates from measured time and hardware.power, the counters where they read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.contract import (
    ENERGY_J_PER_IMAGE_ESTIMATE, ENERGY_J_PER_IMAGE_MEASURED, ENERGY_TRAIN_KJ_ESTIMATE, ENERGY_TRAIN_KJ_MEASURED,
    TRAIN_TIME_S, latency_ms_p50,
)
from lightning_modules.evaluation import energy
from tests.conftest import compose_config


def hardware(**power) -> OmegaConf:
    return OmegaConf.create({"device": "cpu", "threads": 2, "power": {"watts_per_core": 7.0, "gpu_watts": None, **power}})


def test_estimates_are_time_times_cores_times_watts() -> None:
    metrics = {latency_ms_p50(1): 0.5, latency_ms_p50(32): 4.0}
    figures = energy.estimate_figures(metrics, train_time_s=100.0, hardware=hardware(), cores=2)
    # the largest batch timed: 4 ms for 32 images on 2 cores at 7 W
    assert figures[ENERGY_J_PER_IMAGE_ESTIMATE] == pytest.approx(0.004 * 14 / 32)
    assert figures[ENERGY_TRAIN_KJ_ESTIMATE] == pytest.approx(100 * 14 / 1000)


def test_training_on_fewer_cores_than_the_model_is_timed_on_counts_those_cores() -> None:
    metrics = {latency_ms_p50(32): 4.0}
    figures = energy.estimate_figures(metrics, train_time_s=100.0, hardware=hardware(), cores=2, train_cores=1)
    assert figures[ENERGY_J_PER_IMAGE_ESTIMATE] == pytest.approx(0.004 * 14 / 32)
    assert figures[ENERGY_TRAIN_KJ_ESTIMATE] == pytest.approx(100 * 7 / 1000)
    trains_apart = OmegaConf.create({"threads": None, "train_threads": 1})
    assert energy.run_cores(trains_apart, training=True) == 1
    assert energy.run_cores(trains_apart) == energy.run_cores(OmegaConf.create({"threads": None}))


def test_no_latency_and_no_training_leave_their_estimates_out() -> None:
    assert energy.estimate_figures({}, None, hardware(), cores=1) == {}


@pytest.mark.parametrize("power, match", [
    ({"watts_per_core": 0}, r"hardware.power.watts_per_core=0: a positive number"),
    ({"watts_per_core": None}, r"hardware.power.watts_per_core=None"),
])
def test_power_model_names_the_bad_key(power: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        energy.PowerModel.from_hardware(hardware(**power))


def test_cuda_needs_the_gpu_board_power() -> None:
    cfg = OmegaConf.create({"device": "cuda", "threads": None, "power": {"watts_per_core": 7.0, "gpu_watts": None}})
    with pytest.raises(ValueError, match=r"hardware.power.gpu_watts=None: the GPU's board power"):
        energy.PowerModel.from_hardware(cfg)


def test_every_hardware_config_declares_a_power_model() -> None:
    for name in ("cpu", "cpu_1t", "cpu_ort", "cpu_inductor", "cuda"):
        cfg = compose_config([f"hardware={name}"])
        model = energy.PowerModel.from_hardware(cfg.hardware)
        assert model.watts_per_core > 0 and (cfg.hardware.device != "cuda" or model.gpu_watts > 0)


def fake_rapl(root: Path, joules: float, max_range_uj: int = 10**12) -> Path:
    zone = root / "intel-rapl:0"
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(str(int(joules * 1e6)))
    (zone / "max_energy_range_uj").write_text(str(max_range_uj))
    sub = root / "intel-rapl:0:0"  # a sub-zone (the cores): inside the package figure, not added again
    sub.mkdir(exist_ok=True)
    (sub / "energy_uj").write_text("5")
    return zone


def test_without_a_counter_the_tag_says_estimate_only(tmp_path: Path) -> None:
    assert energy.open_counter(torch.device("cpu"), tmp_path) is None
    source = energy.energy_source(torch.device("cpu"), tmp_path)
    assert source.startswith("estimate only: no readable energy counter") and str(tmp_path) in source


def test_rapl_counter_reads_package_zones_and_survives_wrap_around(tmp_path: Path) -> None:
    zone = fake_rapl(tmp_path, joules=10.0, max_range_uj=20_000_000)
    counter = energy.rapl_counter(tmp_path)
    assert counter.source == "rapl:intel-rapl:0"
    (zone / "energy_uj").write_text(str(15_000_000))
    assert counter.read() == pytest.approx(5.0)
    (zone / "energy_uj").write_text(str(3_000_000))  # wrapped at 20 J: 5 J to the top, then 3 J
    assert counter.read() == pytest.approx(13.0)


def test_measured_figures_come_with_a_counter(tmp_path: Path) -> None:
    clock = iter(range(0, 10_000, 3))  # every read 3 J later
    counter = energy.Counter("fake", lambda: float(next(clock)))
    timings = {TRAIN_TIME_S: 10.0, ENERGY_TRAIN_KJ_MEASURED: 0.5}
    metrics = {latency_ms_p50(4): 1.0}
    figures, source = energy.energy_report(metrics, timings, hardware(), 2, counter, torch.nn.Flatten(), (1, 2, 2))
    assert source == "fake"
    assert figures[ENERGY_TRAIN_KJ_MEASURED] == 0.5 and ENERGY_TRAIN_KJ_ESTIMATE in figures
    assert 0 < figures[ENERGY_J_PER_IMAGE_MEASURED] and ENERGY_J_PER_IMAGE_ESTIMATE in figures


def test_metered_training_adds_the_measured_figure_only_with_a_counter(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    timings: dict[str, float] = {}
    monkeypatch.setattr(energy, "POWERCAP", tmp_path)
    monkeypatch.setattr(energy, "open_counter", lambda device, root=tmp_path: None)
    with energy.metered_training(torch.device("cpu"), timings):
        pass
    assert timings == {}
    readings = iter([100.0, 2100.0])
    monkeypatch.setattr(energy, "open_counter", lambda device, root=tmp_path: energy.Counter("fake", lambda: next(readings)))
    with energy.metered_training(torch.device("cpu"), timings):
        pass
    assert timings == {ENERGY_TRAIN_KJ_MEASURED: 2.0}

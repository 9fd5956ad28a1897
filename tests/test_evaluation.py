from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.compression.pruning import MagnitudePruning
from lightning_modules.evaluation.accuracy import paired_drop_interval
from lightning_modules.evaluation.artifact import decode_tensor, encode_tensor, load_deployable, save_deployable
from lightning_modules.evaluation.complexity import count_macs
from lightning_modules.evaluation.latency import measure_latency, speedup_interval
from lightning_modules.layers import parameter_counts
from lightning_modules.models import LeNet5, LeNet300, resnet20


@pytest.mark.parametrize("make", [lambda: LeNet300(1, 28, 10), lambda: LeNet5(1, 28, 10), lambda: resnet20(1, 10)])
def test_artifact_round_trip_rebuilds_the_identical_model(tmp_path, make) -> None:
    model = make().eval()
    size = save_deployable(model, tmp_path / "model.pt")
    loaded = load_deployable(tmp_path / "model.pt")
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), loaded(x))
    assert size == (tmp_path / "model.pt").stat().st_size


def test_sparse_weights_are_stored_sparse_and_restored_exactly(tmp_path) -> None:
    dense = LeNet300(1, 28, 10).eval()
    pruned = LeNet300(1, 28, 10).eval()
    pruned.load_state_dict(dense.state_dict())
    callback = MagnitudePruning(0.9, skip_layers=[])
    callback.prune(pruned)
    callback.finalize(pruned)
    dense_size = save_deployable(dense, tmp_path / "dense.pt")
    sparse_size = save_deployable(pruned, tmp_path / "sparse.pt")
    # 10% of the values plus one bit per weight: about 1/0.1+1/32 ~ 7.6x smaller
    assert dense_size / sparse_size > 6
    loaded = load_deployable(tmp_path / "sparse.pt")
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(pruned(x), loaded(x))


def test_encoding_picks_bitmask_only_when_it_is_smaller() -> None:
    tensor = torch.randn(100, 100)
    assert encode_tensor(tensor)["encoding"] == "dense"
    tensor[tensor.abs() < 1.0] = 0  # about 68% zeros
    encoded = encode_tensor(tensor)
    assert encoded["encoding"] == "bitmask"
    assert torch.equal(decode_tensor(encoded), tensor)


def test_macs_of_lenet300_and_a_convolution() -> None:
    assert count_macs(LeNet300(1, 28, 10), (1, 28, 28))["macs_dense"] == 784 * 300 + 300 * 100 + 100 * 10
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    assert count_macs(conv, (3, 10, 10))["macs_dense"] == 10 * 10 * 8 * 3 * 9


def test_nonzero_macs_and_sparsity_follow_the_zeros() -> None:
    model = LeNet300(1, 28, 10)
    with torch.no_grad():
        model.classifier[1].weight[:, :392] = 0  # half of the first layer
    macs = count_macs(model, (1, 28, 28))
    assert macs["macs_nonzero"] == macs["macs_dense"] - 392 * 300
    counts = parameter_counts(model)
    assert counts["sparsity"] == pytest.approx(392 * 300 / (784 * 300 + 300 * 100 + 100 * 10))
    assert counts["params_total"] - counts["params_nonzero"] == 392 * 300


def test_paired_interval_of_identical_predictions_is_zero() -> None:
    correct = np.random.default_rng(0).random(1000) < 0.95
    assert paired_drop_interval(correct, correct) == (0.0, 0.0)


def test_paired_interval_covers_a_known_drop() -> None:
    baseline = np.ones(1000, dtype=bool)
    model = baseline.copy()
    model[:20] = False  # 2 points worse, on 20 images
    low, high = paired_drop_interval(baseline, model)
    assert 0.5 < low < 2.0 < high < 3.5


def test_paired_interval_refuses_different_test_sets() -> None:
    with pytest.raises(ValueError, match="same images"):
        paired_drop_interval(np.ones(10, dtype=bool), np.ones(11, dtype=bool))


def test_latency_reports_every_batch_size_for_every_model() -> None:
    models = {"model": LeNet300(1, 8, 10).eval(), "baseline": LeNet5(1, 8, 10).eval()}
    results = measure_latency(models, (1, 8, 8), [1, 4], torch.device("cpu"), warmup=1, repeats=3)
    for name in models:
        for batch in (1, 4):
            assert results[name][f"latency_ms_p95_bs{batch}"] >= results[name][f"latency_ms_p50_bs{batch}"] > 0
            assert results[name][f"throughput_bs{batch}"] == pytest.approx(batch * 1000 / results[name][f"latency_ms_p50_bs{batch}"])
            assert results[name][f"latency_spread_bs{batch}"] == pytest.approx(
                results[name][f"latency_ms_p95_bs{batch}"] / results[name][f"latency_ms_p50_bs{batch}"])


def test_speedups_over_the_reference_come_with_their_interval() -> None:
    models = {"model": LeNet300(1, 8, 10).eval(), "baseline": LeNet5(1, 8, 10).eval()}
    results = measure_latency(models, (1, 8, 8), [1, 4], torch.device("cpu"), warmup=1, repeats=20, reference="baseline")
    assert "speedup_bs1" not in results["baseline"]
    for batch in (1, 4):
        figures = results["model"]
        assert figures[f"speedup_bs{batch}_ci95_low"] <= figures[f"speedup_bs{batch}"] <= figures[f"speedup_bs{batch}_ci95_high"]
        assert figures[f"speedup_bs{batch}"] == pytest.approx(
            results["baseline"][f"latency_ms_p50_bs{batch}"] / figures[f"latency_ms_p50_bs{batch}"])


def test_the_speedup_interval_pairs_each_repetitions_two_timings() -> None:
    """A machine that slows both models alike for a while moves both timings of those repetitions, not
    their ratio: drawn in pairs the interval stays tight; drawn apart, each median would wander alone."""
    rng = np.random.default_rng(1)
    model = rng.uniform(1.0, 10.0, 500)  # ms, the machine's speed changing from repetition to repetition
    low, high = speedup_interval(2.0 * model, model)
    assert low == pytest.approx(2.0) and high == pytest.approx(2.0)
    low, high = speedup_interval(2.0 * model * rng.lognormal(0.0, 0.3, 500), model)  # noise of its own
    assert low < 2.0 < high and high - low > 0.1


def test_each_timed_call_follows_a_call_of_the_same_model_and_no_model_always_follows_another() -> None:
    """Timed in a fixed order straight after a resnet20 teacher, a lenet5 read 0.66x of an identical copy
    at batch 1 (the teacher had the caches): every distilled student's speedup was low by a third."""
    calls: list[str] = []

    def recording(name: str):
        return lambda inputs: calls.append(name)

    names = ("model", "baseline", "teacher")
    measure_latency({name: recording(name) for name in names}, (1, 2, 2), [1], torch.device("cpu"), warmup=0, repeats=30)
    pairs = [calls[i:i + 2] for i in range(0, len(calls), 2)]
    assert len(pairs) == 90 and all(first == second for first, second in pairs)  # untimed call, then the timed one
    rounds = [tuple(pair[0] for pair in pairs[i:i + 3]) for i in range(0, 90, 3)]
    assert all(sorted(order) == sorted(names) for order in rounds)  # each model once a round
    assert len({order[0] for order in rounds}) == 3  # in a shuffled order


def test_fast_models_are_timed_for_at_least_min_time_s() -> None:
    import time as clock

    calls: list[str] = []

    def sleeping(inputs):
        calls.append("x")
        clock.sleep(0.001)

    measure_latency({"model": sleeping, "baseline": sleeping}, (1, 2, 2), [1], torch.device("cpu"), warmup=0,
                    repeats=3, min_time_s=0.2)
    repetitions = (len(calls) - 2) / 4  # after the 2 calls that size a repetition: 2 calls per model in each
    assert 3 < repetitions <= 0.2 / 0.004 + 1  # more than `repeats`; a repetition sleeps at least 4 ms


def test_load_per_core_is_the_load_average_over_the_available_cores() -> None:
    import os

    from lightning_modules.evaluation.latency import available_cores, load_per_core

    assert 1 <= available_cores() <= (os.cpu_count() or 1)
    before = os.getloadavg()[0] / available_cores()
    assert load_per_core() == pytest.approx(before, abs=0.5)


def test_the_processor_a_run_was_timed_on_is_named_with_its_int8_dot_products_and_cores(monkeypatch) -> None:
    import torch

    from lightning_modules.evaluation import latency

    monkeypatch.setattr(latency, "available_cores", lambda: 2)
    monkeypatch.setattr(latency, "_cpuinfo", lambda: ("AMD EPYC", {"avx2", "fma"}))
    capability = torch.backends.cpu.get_cpu_capability()
    assert latency.processor_description() == f"AMD EPYC, {capability} without VNNI, 2 cores"
    monkeypatch.setattr(latency, "_cpuinfo", lambda: ("Intel Xeon", {"avx512f", "avx512_vnni"}))
    assert latency.processor_description() == f"Intel Xeon, {capability} with VNNI, 2 cores"
    monkeypatch.setattr(latency, "_cpuinfo", lambda: ("", set()))  # no /proc/cpuinfo: no claim about VNNI
    assert "VNNI" not in latency.processor_description() and latency.processor_description().endswith(", 2 cores")


# ----------------------------------------------------------------------------- runtimes


@pytest.mark.parametrize(("runtime", "compile_mode", "quantized", "expected"), [
    ("torch", "auto", True, "inductor"), ("torch", "auto", False, "torch"), ("torch", True, False, "inductor"),
    ("torch", False, True, "torch"), ("ort", "auto", True, "ort"), ("ort", True, False, "ort"),
])
def test_hardware_compile_picks_inductor_for_runtime_torch_only(runtime, compile_mode, quantized, expected) -> None:
    from omegaconf import OmegaConf

    from lightning_modules.evaluation.runtime import runtime_name

    hardware = OmegaConf.create({"runtime": runtime, "compile": compile_mode})
    assert runtime_name(hardware, quantized) == expected


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_hardware_compile_accepts_false_true_auto_only(value) -> None:
    from lightning_modules.config import ConfigError, validate
    from tests.conftest import compose_config

    cfg = compose_config()
    cfg.hardware.compile = value
    with pytest.raises(ConfigError, match=r"hardware.compile=.* is not valid; allowed: false, true, auto"):
        validate(cfg)


@pytest.mark.slow
def test_compiled_int8_model_runs_onednn_int8_kernels_and_computes_the_workbench_int8_model() -> None:
    from lightning_modules.compression.quantization import QuantScheme, calibrate, convert, prepare, set_mode
    from lightning_modules.evaluation.runtime import CompiledModel

    torch.manual_seed(0)
    model = LeNet5(1, 28, 10).eval()
    gm, prepared = prepare(model, QuantScheme())
    calibrate(gm, prepared, [torch.rand(16, 1, 28, 28) for _ in range(2)])
    set_mode(prepared, observing=False, fake_quant=True)
    int8 = convert(gm, prepared)
    compiled, compiled_fp32 = CompiledModel(int8, (1, 28, 28)), CompiledModel(model, (1, 28, 28))
    assert compiled.int8_kernel_ops == 5  # two qconv, three qlinear: every layer on an int8 kernel
    assert compiled_fp32.int8_kernel_ops == 0
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        # the same integer model: the scales the workbench calibrated are the ones oneDNN uses
        assert torch.allclose(compiled(x), int8(x), atol=1e-5)
        assert torch.allclose(compiled_fp32(x), model(x), atol=1e-5)


def test_scoring_runs_every_batch_at_one_size_the_last_padded_with_its_own_images() -> None:
    from torch.utils.data import TensorDataset

    from lightning_modules.evaluation.accuracy import predict

    sizes = []

    def by_batch_range(inputs: torch.Tensor) -> torch.Tensor:  # as dynamic quantization: the batch's range
        sizes.append(len(inputs))
        flat = inputs.flatten(1)[:, :10]
        low, high = flat.min(0).values, flat.max(0).values
        return (flat - low) / (high - low)

    torch.manual_seed(0)
    # pixels in 1..2: a zero image as padding would move every column's range
    images, labels = 1.0 + torch.rand(70, 1, 28, 28), torch.randint(0, 10, (70,))
    scored = predict(by_batch_range, TensorDataset(images, labels), torch.device("cpu"), batch_size=32)
    assert sizes == [32, 32, 32]
    logits = torch.cat([by_batch_range(images[start:start + 32]) for start in (0, 32, 64)])
    assert np.array_equal(scored.correct, (logits.argmax(1) == labels).numpy())
    assert scored.loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())  # no range moved


@pytest.mark.slow
def test_compiled_model_builds_one_graph_per_batch_size_for_scoring_and_timing_alike() -> None:
    from torch._dynamo.utils import counters
    from torch.utils.data import TensorDataset

    from lightning_modules.evaluation.accuracy import predict
    from lightning_modules.evaluation.latency import measure_latency
    from lightning_modules.evaluation.runtime import CompiledModel

    torch.manual_seed(0)
    model = LeNet5(1, 28, 10).eval()
    compiled = CompiledModel(model, (1, 28, 28))
    counters.clear()
    assert compiled.int8_kernel_ops == 0  # compiled at batch 1 to read its code
    test = TensorDataset(torch.rand(70, 1, 28, 28), torch.randint(0, 10, (70,)))
    scored = predict(compiled, test, torch.device("cpu"), batch_size=32)  # 32, 32 and 6 padded to 32
    measure_latency({"model": compiled}, (1, 28, 28), [1, 32], torch.device("cpu"), warmup=1, repeats=2)
    # batch 1 and batch 32, whether the input is an inference tensor (timing) or not (scoring)
    assert counters["stats"]["unique_graphs"] == 2
    eager = predict(model, test, torch.device("cpu"), batch_size=512)
    assert np.array_equal(scored.correct, eager.correct) and scored.loss == pytest.approx(eager.loss, rel=1e-4)


def test_eager_runtime_runs_resnet20_with_batchnorm_folded_and_leaves_the_model_alone() -> None:
    from lightning_modules.evaluation.runtime import deploy

    model = resnet20(1, 10).eval()
    for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics that matter
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.uniform_(0.5, 2.0)
    deployed = deploy(model, "torch", torch.device("cpu"))
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 21  # a copy was folded


def test_eager_runtime_keeps_batchnorm_of_a_model_fx_cannot_trace(caplog) -> None:
    from lightning_modules.evaluation.runtime import deploy

    class Branching(torch.nn.Module):  # control flow on a tensor's value: not traceable
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm = torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)) if x.sum() > 0 else self.conv(x)

    model = Branching().eval()
    deployed = deploy(model, "torch", torch.device("cpu"))
    assert deployed is model and "BatchNorm left unfolded" in caplog.text


def test_eager_runtime_folds_batchnorm_around_workbench_layers_and_keeps_them() -> None:
    from lightning_modules.compression.pruning import SemiStructuredLinear
    from lightning_modules.evaluation.runtime import deploy

    model = resnet20(1, 10).eval()
    model.fc = SemiStructuredLinear.from_linear(model.fc)  # what nm's finalize ships: its forward branches on the device
    deployed = deploy(model, "torch", torch.device("cpu"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, SemiStructuredLinear) for m in deployed.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(deployed(x), model(x), atol=1e-4)


def test_a_broken_kernel_library_in_inductors_cache_is_removed_and_compiled_again(tmp_path, monkeypatch) -> None:
    """A process killed while Inductor wrote a kernel leaves a truncated .so that fails every later run."""
    from torch._inductor.runtime import cache_dir_utils

    from lightning_modules.evaluation.runtime import healing_inductor_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    broken = Path(cache_dir_utils.cache_dir()) / "k6" / "kernel.main.so"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"")
    calls = []

    def compile_and_run(x):
        calls.append(x)
        if broken.exists():
            raise ImportError(f"{broken}: file too short")
        return x + 1

    assert healing_inductor_cache(compile_and_run, 1) == 2
    assert len(calls) == 2 and not broken.exists()

    outside = tmp_path / "elsewhere.so"  # only Inductor's own cache is touched
    outside.write_bytes(b"")
    with pytest.raises(ImportError, match="file too short"):
        healing_inductor_cache(lambda: (_ for _ in ()).throw(ImportError(f"{outside}: file too short")))
    assert outside.exists()


@pytest.mark.parametrize("spinning", ["on", "off", "stop_after_run"])
def test_an_ort_session_runs_alike_whatever_its_threads_do_between_calls(tmp_path, spinning: str) -> None:
    from lightning_modules.evaluation.runtime import SPINNING, OrtModel, export_onnx

    model = LeNet5().eval()
    export_onnx(model, tmp_path / "lenet5.onnx", (1, 28, 28))
    x = torch.rand(4, 1, 28, 28)
    assert spinning in SPINNING
    with torch.no_grad():
        assert torch.allclose(OrtModel(tmp_path / "lenet5.onnx", None, spinning)(x), model(x), atol=1e-4)

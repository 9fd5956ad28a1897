from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.compression.pruning import MagnitudePruning
from lightning_modules.evaluation.accuracy import paired_drop_interval
from lightning_modules.evaluation.artifact import decode_tensor, encode_tensor, load_deployable, save_deployable
from lightning_modules.evaluation.complexity import count_macs, parameter_counts
from lightning_modules.evaluation.latency import measure_latency
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

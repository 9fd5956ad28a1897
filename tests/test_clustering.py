"""Weight clustering: the k-means, weight sharing through a Trainer, the codebook artifact."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from lightning_modules.compression.clustering import CLUSTERS, WeightClustering, kmeans_1d, share_weights
from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.artifact import encode_tensor, load_deployable, save_deployable
from lightning_modules.models import LeNet300
from lightning_modules.task import ClassificationTask


def test_kmeans_finds_well_separated_clusters() -> None:
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)]) + 0.01 * torch.randn(100)
    centroids, indices = kmeans_1d(values, 3)
    assert sorted(round(float(c), 1) for c in centroids) == [-1.0, 0.5, 2.0]
    assert torch.all(torch.abs(centroids[indices] - values) < 0.1)


@pytest.mark.parametrize("init", ["linear", "density", "random"])
def test_kmeans_gives_at_most_k_values(init) -> None:
    centroids, indices = kmeans_1d(torch.randn(40, 30), 16, init=init, generator=torch.Generator().manual_seed(0))
    assert centroids.numel() <= 16 and int(indices.max()) < centroids.numel()


def test_share_weights_sets_each_weight_to_its_cluster_mean() -> None:
    weight = torch.tensor([1.0, 3.0, 10.0, 20.0])
    centroids = share_weights(weight, torch.tensor([0, 0, 1, 1]))
    assert weight.tolist() == [2.0, 2.0, 15.0, 15.0] and centroids.tolist() == [2.0, 15.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bits": 0}, r"bits=0 is not valid; allowed: an integer in 1..8"),
    ({"init": "kpp"}, r"init='kpp' is not valid; allowed: linear, random, density"),
    ({"iterations": 0}, r"iterations=0 is not valid; allowed: an integer >= 1"),
])
def test_validation_names_the_key(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        WeightClustering(**kwargs)


def test_unknown_skip_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"skip_layers has unknown layers \['nope'\]"):
        WeightClustering(skip_layers=["nope"]).cluster(LeNet300(1, 8, 10))


def test_fine_tuning_keeps_16_shared_values_and_the_artifact_stores_a_codebook(tmp_path) -> None:
    data = InMemoryDataModule(name="digits", batch_size=64)
    data.setup()
    model = LeNet300(1, 8, 10)
    callback = WeightClustering(bits=4, skip_layers=[])
    task = ClassificationTask(model, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=5, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback])
    trainer.fit(task, datamodule=data)
    final = callback.finalize(task.model).eval()
    for row in callback.summary(final):
        assert row["distinct_values"] <= 16
    assert not any(hasattr(m, CLUSTERS) for m in final.modules())
    first = final.classifier[1].weight
    encoded = encode_tensor(first)
    assert encoded["encoding"] == "codebook"
    assert encoded["indices"].numel() == (first.numel() * 4 + 7) // 8  # 4 bits per weight, packed
    size = save_deployable(final, tmp_path / "model.pt")
    dense = save_deployable(LeNet300(1, 8, 10), tmp_path / "dense.pt")
    assert dense / size > 6  # 32-bit weights to 4-bit indices + 16 centroids per layer
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(load_deployable(tmp_path / "model.pt")(x), final(x))


def test_loaded_clustered_model_holds_plain_float_layers_and_predicts_as_saved(tmp_path) -> None:
    """The codebook is decoded once, when the file is loaded: plain Linear layers of float weights."""
    torch.manual_seed(0)
    model = LeNet300(1, 8, 10).eval()
    callback = WeightClustering(bits=4)
    callback.cluster(model)
    final = callback.finalize(model).eval()
    save_deployable(final, tmp_path / "model.pt")
    loaded = load_deployable(tmp_path / "model.pt")
    layers = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert len(layers) == 3 and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.float32 for m in layers)
    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), final(x))


# ----------------------------------------------------------------------------- after pruning (Deep Compression)


def pruned_lenet(seed: int = 0, kept: float = 0.1) -> LeNet300:
    """A LeNet300 on 8x8 digits with most weights exactly zero, as pruning leaves it."""
    torch.manual_seed(seed)
    model = LeNet300(1, 8, 10)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.mul_(torch.rand_like(module.weight) < kept)
    return model


def test_clustering_after_pruning_keeps_zeros_out_of_the_shared_values() -> None:
    model = pruned_lenet()
    zeros = {name: (m.weight == 0).clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    WeightClustering(bits=2).cluster(model)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.equal(module.weight == 0, zeros[name])  # no survivor joined a zero cluster, no zero left it
            assert torch.unique(module.weight[module.weight != 0]).numel() <= 4  # 4 shared values besides zero
            assert torch.all(getattr(module, CLUSTERS)[zeros[name]] == -1)


@pytest.mark.parametrize(("bits", "message"), [
    ({"conv": 8}, r"bits=\{'conv': 8\} is not valid; allowed: an integer in 1..8 or a mapping with exactly the keys conv, linear"),
    ({"conv": 8, "linear": 9}, r"bits.linear=9 is not valid; allowed: an integer in 1..8"),
    ("5", r"bits='5' is not valid; allowed: an integer in 1..8, or \{conv: <1..8>, linear: <1..8>\}"),
])
def test_bits_per_layer_kind_are_checked(bits, message) -> None:
    with pytest.raises(ValueError, match=message):
        WeightClustering(bits=bits)


def test_bits_per_layer_kind_give_conv_and_linear_their_own_codebooks() -> None:
    from lightning_modules.models import LeNet5
    torch.manual_seed(0)
    model = LeNet5(1, 8, 10)
    callback = WeightClustering(bits={"conv": 3, "linear": 2})
    callback.cluster(model)
    rows = {row["layer"]: row for row in callback.summary(model)}
    assert rows["features.3"]["index_bits"] == 3 and rows["features.3"]["distinct_values"] <= 8
    assert rows["classifier.1"]["index_bits"] == 2 and rows["classifier.1"]["distinct_values"] <= 4


def test_gradients_are_summed_per_centroid() -> None:
    from lightning_modules.compression.clustering import sum_gradients
    weight = torch.nn.Parameter(torch.tensor([1.0, 1.0, 0.0, 2.0]))
    weight.grad = torch.tensor([0.5, 0.25, 9.0, -1.0])
    sum_gradients(weight, torch.tensor([0, 0, -1, 1]))
    assert weight.grad.tolist() == [0.75, 0.75, 0.0, -1.0]  # the zero (pruned) weight gets none


def fit(model, callbacks, epochs: int, batches: int = 4):
    data = InMemoryDataModule(name="digits", batch_size=64)
    data.setup()
    task = ClassificationTask(model, optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=batches, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=callbacks)
    trainer.fit(task, datamodule=data)
    return task.model


def test_pruning_ramp_then_clustering_in_one_fit_keeps_masks_and_shared_values() -> None:
    from lightning_modules.compression.pruning import AGP
    torch.manual_seed(0)
    prune = AGP(sparsity=0.9, initial_sparsity=0.5, begin=0, end=1, frequency=1, scope="layer")
    cluster = WeightClustering(bits={"conv": 8, "linear": 3}, begin_epoch=2)
    model = fit(LeNet300(1, 8, 10), [prune, cluster], epochs=3)
    masks = {name: m.weight_mask.clone() for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    final = cluster.finalize(prune.finalize(model))
    for name, module in final.named_modules():
        if name in masks:
            assert torch.all(module.weight[masks[name] == 0] == 0)  # pruned weights are exactly zero
            assert int(torch.count_nonzero(module.weight)) == int(masks[name].sum())  # no survivor became zero
            assert torch.unique(module.weight[module.weight != 0]).numel() <= 8
    assert abs(float(sum((m == 0).sum() for m in masks.values()) / sum(m.numel() for m in masks.values())) - 0.9) < 0.01


def test_begin_epoch_past_the_fit_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"begin_epoch=3 is not valid; allowed: an integer below fine_tune.epochs=2"):
        fit(LeNet300(1, 8, 10), [WeightClustering(begin_epoch=3)], epochs=2, batches=1)


def test_pruned_clustered_layers_are_huffman_coded_and_round_trip_exactly(tmp_path) -> None:
    """Deep Compression's file: weights decoded once at load, identical weights and predictions."""
    model = pruned_lenet(kept=0.08).eval()
    callback = WeightClustering(bits=5)
    callback.cluster(model)
    final = callback.finalize(model).eval()
    assert encode_tensor(final.classifier[1].weight)["encoding"] == "huffman"
    size = save_deployable(final, tmp_path / "model.pt")
    loaded = load_deployable(tmp_path / "model.pt")
    for key, value in final.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), final(x))
    assert type(loaded.classifier[1]) is torch.nn.Linear
    # smaller than the same model stored with a codebook and packed 5-bit indices for every entry
    dense_indices = sum(m.weight.numel() * 5 / 8 for m in final.modules() if isinstance(m, torch.nn.Linear))
    assert size < dense_indices + 8000


def test_stage_metrics_grow_stage_by_stage() -> None:
    from lightning_modules.compression.clustering import stage_metrics
    from lightning_modules.contract import (
        BITS_PER_WEIGHT, COMPRESSION_RATIO_HUFFMAN, COMPRESSION_RATIO_HUFFMAN_PAYLOAD, COMPRESSION_RATIO_PRUNED,
        COMPRESSION_RATIO_QUANTIZED,
    )
    model = pruned_lenet(kept=0.08)
    callback = WeightClustering(bits=5)
    callback.cluster(model)
    final = callback.finalize(model)
    figures = callback.metrics(final, {"size_bytes": 1000.0, "baseline_size_bytes": 40000.0})
    assert 1 < figures[COMPRESSION_RATIO_PRUNED] < figures[COMPRESSION_RATIO_QUANTIZED] <= figures[COMPRESSION_RATIO_HUFFMAN_PAYLOAD]
    assert figures[COMPRESSION_RATIO_HUFFMAN] == 40.0  # the real files' ratio, as measured
    assert 4 < figures[BITS_PER_WEIGHT] < 5 + 12
    rows = callback.summary(final)
    assert {"kept_percent", "index_bits", "bytes_pruned", "bytes_quantized", "bytes_huffman"} <= set(rows[0])
    assert stage_metrics(final, {}, {})[COMPRESSION_RATIO_QUANTIZED] == figures[COMPRESSION_RATIO_PRUNED]

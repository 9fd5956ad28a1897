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

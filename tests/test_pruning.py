from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.pruning import MASK, MagnitudePruning, global_masks, layer_mask
from lightning_modules.data import InMemoryDataModule
from lightning_modules.models import LeNet300
from lightning_modules.task import ClassificationTask


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_layer_mask_removes_exactly_the_lowest_scores(sparsity: float) -> None:
    scores = torch.randn(40, 25).abs()
    mask = layer_mask(scores, sparsity)
    assert int((mask == 0).sum()) == round(sparsity * scores.numel())
    if 0 < sparsity:
        assert scores[mask == 0].max() <= scores[mask == 1].min()


def test_global_masks_rank_all_layers_together() -> None:
    scores = {"small": torch.full((10,), 0.1), "large": torch.full((30,), 5.0)}
    masks = global_masks(scores, 0.25)
    assert int(masks["small"].sum()) == 0 and int(masks["large"].sum()) == 30


def _train(callback: MagnitudePruning, model: nn.Module, epochs: int = 2) -> nn.Module:
    pl.seed_everything(0, verbose=False)
    data = InMemoryDataModule("digits", batch_size=64)
    task = ClassificationTask(model, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=5,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task.model


def test_pruned_weights_stay_zero_through_fine_tuning_with_adam() -> None:
    model = LeNet300(1, 8, 10)
    callback = MagnitudePruning(sparsity=0.7, scope="layer", skip_layers=[])
    trained = _train(callback, model)
    for _, layer in [("0", trained.classifier[1]), ("1", trained.classifier[3]), ("2", trained.classifier[5])]:
        mask = getattr(layer, MASK)
        assert float((mask == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
        assert torch.all(layer.weight[mask == 0] == 0)  # the optimizer never moved them
        assert torch.any(layer.weight[mask == 1] != 0)
    finalized = callback.finalize(trained)
    assert not any(hasattr(m, MASK) for m in finalized.modules())
    assert float((finalized.classifier[1].weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


def test_global_scope_hits_the_target_over_the_pruned_layers_and_skips_first_and_last() -> None:
    model = LeNet300(1, 8, 10)
    callback = MagnitudePruning(sparsity=0.9, scope="global", skip_layers=["first", "last"])
    callback.prune(model)
    assert set(callback.skipped) == {"classifier.1", "classifier.5"}
    assert not hasattr(model.classifier[1], MASK) and not hasattr(model.classifier[5], MASK)
    assert float((model.classifier[3].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.001)
    rows = {row["layer"]: row for row in callback.summary(model)}
    assert rows["classifier.1"]["skipped"] == "listed in skip_layers as 'first'"
    assert rows["classifier.3"]["sparsity"] == pytest.approx(0.9, abs=0.001)


def test_random_criterion_differs_from_magnitude() -> None:
    torch.manual_seed(0)
    model_a, model_b = LeNet300(1, 8, 10), LeNet300(1, 8, 10)
    model_b.load_state_dict(model_a.state_dict())
    MagnitudePruning(0.5, scope="layer", skip_layers=[]).prune(model_a)
    MagnitudePruning(0.5, scope="layer", criterion="random", skip_layers=[]).prune(model_b)
    assert not torch.equal(getattr(model_a.classifier[1], MASK), getattr(model_b.classifier[1], MASK))


def test_per_layer_overrides() -> None:
    model = LeNet300(1, 8, 10)
    MagnitudePruning(0.5, scope="layer", skip_layers=[], layer_sparsity={"classifier.3": 0.9}).prune(model)
    assert float((model.classifier[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    assert float((model.classifier[3].weight == 0).float().mean()) == pytest.approx(0.9, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 is not valid; allowed: a fraction in \[0, 1\)"),
        ({"sparsity": 0.5, "scope": "row"}, r"scope='row' is not valid; allowed: global, layer"),
        ({"sparsity": 0.5, "criterion": "l3"}, r"criterion='l3' is not valid; allowed: magnitude, random"),
        ({"sparsity": 0.5, "layer_sparsity": {"fc": 2.0}}, r"layer_sparsity.fc=2.0 is not valid"),
        ({"sparsity": 0.5, "layer_sparsity": {"fc": 0.2}}, r"layer_sparsity needs scope='layer'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**kwargs)


def test_unknown_skip_layer_lists_the_layers() -> None:
    with pytest.raises(ValueError, match=r"skip_layers has unknown layers \['fc9'\]; allowed: first, last, classifier.1"):
        MagnitudePruning(0.5, skip_layers=["fc9"]).prune(LeNet300(1, 8, 10))


def test_pruning_state_round_trips_through_a_checkpoint_dict() -> None:
    callback = MagnitudePruning(0.5)
    callback.prune(LeNet300(1, 8, 10))
    restored = MagnitudePruning(0.5)
    restored.load_state_dict(callback.state_dict())
    assert restored.pruned and restored.skipped == callback.skipped

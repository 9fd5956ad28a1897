"""Structured and semi-structured pruning: channel groups, physical removal, N:M masks, 2:4 kernels."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.channel_surgery import (
    channel_groups, channel_keep_mask, channel_scores, remove_channels,
)
from lightning_modules.compression.pruning import (
    MASK, ChannelPruning, NMPruning, SemiStructuredLinear, channel_taylor_scores, nm_mask,
)
from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.artifact import load_deployable, save_deployable
from lightning_modules.models import LeNet5, LeNet300, mobilenetv2, resnet20
from lightning_modules.task import ClassificationTask
from tests.conftest import all_runs, run_train

MODELS = {
    "lenet300": (lambda: LeNet300(1, 28, 10), (1, 28, 28)),
    "lenet5": (lambda: LeNet5(1, 28, 10), (1, 28, 28)),
    "resnet20": (lambda: resnet20(3, 10), (3, 32, 32)),
    "mobilenetv2": (lambda: mobilenetv2(3, 32, 10, width_multiplier=0.5), (3, 32, 32)),
}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomize_batchnorm(model: nn.Module) -> None:
    """Give BatchNorm non-trivial statistics, so the equivalence checks are not vacuous."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)


# ----------------------------------------------------------------------------- the math


def test_channel_scores_sum_filter_norms_over_the_producers() -> None:
    a, b = torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert channel_scores([a], "l1").tolist() == [3.0, 3.0]
    assert channel_scores([a, b], "l2").tolist() == pytest.approx([5.0 ** 0.5 + 5.0, 3.0])


def test_channel_keep_mask_drops_the_lowest_keeps_one_and_never_revives() -> None:
    scores = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert channel_keep_mask(scores, 0.5).tolist() == [True, False, True, False]
    assert channel_keep_mask(scores, 0.99).tolist() == [False, False, True, False]
    removed = torch.tensor([False, False, True, False])  # the best channel was cut before
    assert channel_keep_mask(scores, 0.25, removed).tolist() == [True, True, False, True]


@pytest.mark.parametrize(("channels", "fraction", "round_to", "kept"),
                         [(64, 0.5, 8, 32), (40, 0.5, 8, 24), (40, 0.5, 16, 32), (6, 0.5, 8, 6), (16, 0.9, 8, 8)])
def test_channel_keep_mask_rounds_the_kept_count_up_to_a_multiple(channels: int, fraction: float, round_to: int,
                                                                  kept: int) -> None:
    scores = torch.randn(channels).abs()
    keep = channel_keep_mask(scores, fraction, round_to=round_to)
    assert int(keep.sum()) == kept
    assert scores[~keep].max() <= scores[keep].min() if kept < channels else True


def test_nm_mask_keeps_the_n_largest_of_every_m() -> None:
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[1, 0, 1, 0, 0, 1, 1, 0]]
    conv = torch.randn(8, 4, 3, 3).abs()
    mask = nm_mask(conv, 1, 4).reshape(8, -1, 4)
    assert torch.all(mask.sum(-1) == 1)
    with pytest.raises(ValueError, match=r"a row of 6 inputs cannot be cut into groups of m=4"):
        nm_mask(torch.randn(3, 6), 2, 4)


# ----------------------------------------------------------------------------- channel groups


def test_resnet_groups_join_each_stage_residual_sum_and_freeze_input_and_classes() -> None:
    groups = channel_groups(resnet20(3, 10), torch.zeros(1, 3, 32, 32))
    by_producer = {p: g for g in groups for p in g.producers}
    stage1 = by_producer["stem.0"]
    assert set(stage1.producers) == {"stem.0", "stages.0.conv2", "stages.1.conv2", "stages.2.conv2"}
    assert set(by_producer["stages.3.shortcut.0"].producers) == {"stages.3.shortcut.0", "stages.3.conv2",
                                                                  "stages.4.conv2", "stages.5.conv2"}
    assert by_producer["stages.0.conv1"].consumers == [("stages.0.conv2", 1)]
    assert by_producer["fc"].frozen == "the model's output (the classes)"
    assert sum(g.prunable for g in groups) == 12
    assert any(g.frozen == "the model's input channels" and not g.producers for g in groups)


def test_lenet5_flatten_makes_each_channel_25_features_of_the_first_linear() -> None:
    groups = channel_groups(LeNet5(1, 28, 10), torch.zeros(1, 1, 28, 28))
    by_producer = {p: g for g in groups for p in g.producers}
    assert by_producer["features.3"].consumers == [("classifier.1", 25)]


class Gated(nn.Module):
    """A multiplication the analysis does not understand: its channels must be frozen, not guessed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.a(x) * torch.sigmoid(self.b(x)))


def test_unknown_operations_freeze_their_channels_with_the_reason() -> None:
    groups = channel_groups(Gated(), torch.zeros(1, 4))
    by_producer = {p: g for g in groups for p in g.producers}
    assert "does not understand" in by_producer["a"].frozen and "does not understand" in by_producer["b"].frozen
    with pytest.raises(ValueError, match=r"channel group 1 \(a\) is frozen: used by"):
        remove_channels(Gated(), groups, {1: torch.tensor([0, 1])})


# ----------------------------------------------------------------------------- physical removal


@pytest.mark.parametrize("model_name", list(MODELS))
def test_nothing_pruned_leaves_the_model_identical(model_name: str) -> None:
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = factory().eval()
    _randomize_batchnorm(model)
    inputs = torch.randn(2, *shape)
    before, params = model(inputs), _params(model)
    callback = ChannelPruning(0.0)
    callback.analyse(model, torch.zeros(1, *shape))
    callback.cut(model, 0.0)
    after = callback.finalize(model)
    assert _params(after) == params
    assert torch.equal(after(inputs), before)


@pytest.mark.parametrize("model_name", list(MODELS))
def test_removing_channels_computes_what_the_masked_model_did(model_name: str) -> None:
    factory, shape = MODELS[model_name]
    torch.manual_seed(0)
    model = factory().eval()
    _randomize_batchnorm(model)
    inputs = torch.randn(2, *shape)
    callback = ChannelPruning(0.5)
    callback.analyse(model, torch.zeros(1, *shape))
    callback.cut(model, 0.5)
    masked = model(inputs)
    smaller = callback.finalize(model)
    out = smaller(inputs)
    assert out.shape == (2, 10)  # the classifier keeps its classes
    assert torch.allclose(out, masked, atol=1e-5)
    assert not any(hasattr(m, MASK) for m in smaller.modules())
    rows = callback.summary(smaller)
    pruned = [r for r in rows if not r["skipped"]]
    assert pruned and all(r["fraction_removed"] == pytest.approx(round(r["channels_before"] / 2) / r["channels_before"])
                          for r in pruned)


def test_lenet5_at_half_its_channels_has_the_exact_smaller_shapes() -> None:
    model = LeNet5(1, 28, 10)
    callback = ChannelPruning(0.5)
    callback.analyse(model, torch.zeros(1, 1, 28, 28))
    callback.cut(model, 0.5)
    smaller = callback.finalize(model)
    f, c = smaller.features, smaller.classifier
    assert f[0].weight.shape == (3, 1, 5, 5) and f[3].weight.shape == (8, 3, 5, 5)
    assert c[1].weight.shape == (60, 200) and c[3].weight.shape == (42, 60) and c[5].weight.shape == (10, 42)
    assert _params(smaller) == 78 + 608 + 12060 + 2562 + 430
    assert (c[1].in_features, c[1].out_features, f[3].in_channels) == (200, 60, 3)


def test_resnet_residual_channels_shrink_together_and_round_trip_through_the_artifact(tmp_path) -> None:
    model = resnet20(3, 10).eval()
    callback = ChannelPruning(0.5)
    callback.analyse(model, torch.zeros(1, 3, 32, 32))
    callback.cut(model, 0.5)
    smaller = callback.finalize(model)
    assert smaller.stem[0].out_channels == smaller.stages[2].conv2.out_channels == smaller.stages[0].conv1.in_channels == 8
    assert smaller.stages[0].bn1.num_features == 8 and smaller.fc.in_features == 32
    inputs = torch.randn(2, 3, 32, 32)
    save_deployable(smaller, tmp_path / "model.pt")
    assert torch.allclose(load_deployable(tmp_path / "model.pt")(inputs), smaller(inputs))


def test_bn_scale_criterion_skips_groups_without_batchnorm_with_the_reason() -> None:
    callback = ChannelPruning(0.5, criterion="bn_scale")
    callback.analyse(LeNet5(1, 28, 10), torch.zeros(1, 1, 28, 28))
    reasons = set(callback.skipped.values())
    assert reasons == {"criterion bn_scale needs a BatchNorm on these channels", "the model's output (the classes)"}


def test_skip_layers_and_overrides_per_group() -> None:
    model = LeNet5(1, 28, 10)
    callback = ChannelPruning(0.5, skip_layers=["features.0"], layer_sparsity={"classifier.1": 0.25})
    callback.analyse(model, torch.zeros(1, 1, 28, 28))
    callback.cut(model, 0.5)
    smaller = callback.finalize(model)
    assert smaller.features[0].out_channels == 6 and smaller.classifier[1].out_features == 90


def test_round_to_gives_every_pruned_group_a_multiple_of_channels() -> None:
    model = resnet20(1, 10, width_multiplier=1.25).eval()  # stages of 20, 40, 80 channels
    callback = ChannelPruning(0.5, round_to=8)
    callback.analyse(model, torch.zeros(1, 1, 28, 28))
    callback.cut(model, 0.5)
    smaller = callback.finalize(model)
    assert [smaller.stages[i].conv2.out_channels for i in (0, 3, 6)] == [16, 24, 40]  # 10, 20, 40 rounded up


def test_unknown_producer_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"channel pruning knows no producer layers \['conv9'\]; allowed: classifier.1"):
        ChannelPruning(0.5, skip_layers=["conv9"]).analyse(LeNet5(1, 28, 10), torch.zeros(1, 1, 28, 28))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.95}, r"sparsity=0.95 is not valid: it removes all 6 channels of features.0; "
                             r"allowed: a fraction in \[0, 0.9167\) for this layer"),
        ({"sparsity": 0.5, "layer_sparsity": {"classifier.3": 0.995}},
         r"layer_sparsity.classifier.3=0.995 is not valid: it removes all 84 channels of classifier.3; "
         r"allowed: a fraction in \[0, 0.994\)"),
    ],
)
def test_a_cut_that_would_leave_a_layer_no_channel_is_refused_before_any_cut(kwargs: dict, message: str) -> None:
    model = LeNet5(1, 28, 10)
    callback = ChannelPruning(**kwargs)
    with pytest.raises(ValueError, match=message):
        callback.analyse(model, torch.zeros(1, 1, 28, 28))
    assert not any(hasattr(m, MASK) for m in model.modules())


def test_a_fraction_just_short_of_all_keeps_one_channel() -> None:
    model = LeNet5(1, 28, 10)
    callback = ChannelPruning(0.9)  # features.0: round(5.4) = 5 of 6 go
    callback.analyse(model, torch.zeros(1, 1, 28, 28))
    callback.cut(model, 0.9)
    assert callback.finalize(model).features[0].out_channels == 1


def test_taylor_scores_are_zero_for_a_dead_channel_and_leave_no_gradient() -> None:
    torch.manual_seed(0)
    model = resnet20(1, 10).train()
    with torch.no_grad():
        model.stages[0].conv1.weight[2].zero_()  # channel 2 of stage 0's first conv computes nothing
        model.stages[0].bn1.weight[2] = 0.0
        model.stages[0].bn1.bias[2] = 0.0
    running_mean = model.stages[0].bn1.running_mean.clone()
    groups = [g for g in channel_groups(model, torch.zeros(1, 1, 28, 28)) if g.prunable]
    batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))) for _ in range(2)]
    scores = channel_taylor_scores(model, groups, batches)
    block = scores["stages.0.conv1"]
    assert block[2] == 0 and bool((block[[0, 1, 3]] > 0).all())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(model.stages[0].bn1.running_mean, running_mean) and model.training


def _train(callbacks: list[pl.Callback], model: nn.Module, epochs: int) -> nn.Module:
    pl.seed_everything(0, verbose=False)
    data = InMemoryDataModule("digits", batch_size=64)
    task = ClassificationTask(model, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=5,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task.model


@pytest.mark.parametrize("mode", ["oneshot", "gradual"])
def test_channel_pruning_trains_with_removed_channels_at_zero_then_shrinks(mode: str) -> None:
    callback = ChannelPruning(0.5, mode=mode, end=1, frequency=2)
    trained = _train([callback], LeNet5(1, 8, 10), epochs=2)
    conv = trained.features[3]
    removed = getattr(conv, MASK).flatten(1).sum(1) == 0
    assert int(removed.sum()) == 8
    assert torch.all(conv.weight[removed] == 0) and torch.all(conv.bias[removed] == 0)
    inputs = torch.randn(4, 1, 8, 8)
    masked = trained.eval()(inputs)
    smaller = callback.finalize(trained)
    assert smaller.features[3].out_channels == 8 and smaller.classifier[1].out_features == 60
    assert torch.allclose(smaller(inputs), masked, atol=1e-5)


def test_taylor_criterion_cuts_during_fit_and_shrinks_to_what_it_trained() -> None:
    callback = ChannelPruning(0.5, criterion="taylor", taylor_batches=2)
    trained = _train([callback], LeNet5(1, 8, 10), epochs=1)
    inputs = torch.randn(4, 1, 8, 8)
    masked = trained.eval()(inputs)
    smaller = callback.finalize(trained)
    assert smaller.features[3].out_channels == 8 and smaller.classifier[1].out_features == 60
    assert torch.allclose(smaller(inputs), masked, atol=1e-5)


def test_taylor_criterion_outside_fit_says_it_needs_training_batches() -> None:
    model = LeNet5(1, 28, 10)
    callback = ChannelPruning(0.5, criterion="taylor")
    callback.analyse(model, torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="criterion='taylor' needs training batches"):
        callback.cut(model, 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"sparsity=1.0 is not valid; allowed: a fraction in \[0, 1\)"),
        ({"sparsity": 0.5, "taylor_batches": 0}, r"taylor_batches=0 is not valid; allowed: an integer >= 1"),
        ({"sparsity": 0.5, "criterion": "l0"}, r"criterion='l0' is not valid; allowed: l1, l2, bn_scale, taylor"),
        ({"sparsity": 0.5, "mode": "later"}, r"mode='later' is not valid; allowed: oneshot, gradual"),
        ({"sparsity": 0.5, "layer_sparsity": {"fc": -0.1}}, r"layer_sparsity.fc=-0.1 is not valid"),
        ({"sparsity": 0.5, "mode": "gradual", "initial_sparsity": 0.7}, r"initial_sparsity=0.7 is not valid"),
        ({"sparsity": 0.5, "round_to": 0}, r"round_to=0 is not valid; allowed: an integer >= 1"),
    ],
)
def test_channel_constructor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChannelPruning(**kwargs)


# ----------------------------------------------------------------------------- N:M


def test_nm_pruning_keeps_the_pattern_through_fine_tuning_and_skips_rows_that_do_not_split() -> None:
    model = LeNet5(1, 8, 10)  # the convolutions have 1x5x5 = 25 and 6x5x5 = 150 inputs per row
    callback = NMPruning(0.5, m=4, skip_layers=[])
    trained = _train([callback], model, epochs=2)
    assert callback.skipped == {"features.0": "25 inputs per row do not split into groups of m=4",
                                "features.3": "150 inputs per row do not split into groups of m=4"}
    assert not hasattr(trained.features[3], MASK)
    for layer in (trained.classifier[1], trained.classifier[3], trained.classifier[5]):
        groups = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4)
        assert torch.all(groups.sum(-1) <= 2)
        assert torch.all(layer.weight[getattr(layer, MASK) == 0] == 0)
    finalized = callback.finalize(trained)
    assert isinstance(finalized.classifier[1], SemiStructuredLinear)
    assert float((finalized.classifier[1].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    rows = {r["layer"]: r for r in callback.summary(finalized)}
    assert rows["classifier.1"]["pattern"] == "2:4" and rows["classifier.1"]["kernel"] == "dense"


def test_semi_structured_linear_runs_dense_on_the_cpu_and_survives_the_artifact(tmp_path) -> None:
    linear = nn.Linear(8, 4)
    with torch.no_grad():
        linear.weight.mul_(nm_mask(linear.weight.abs(), 2, 4))
    layer = SemiStructuredLinear.from_linear(linear)
    inputs = torch.randn(5, 8)
    assert torch.equal(layer(inputs), linear(inputs))
    save_deployable(nn.Sequential(layer), tmp_path / "m.pt")
    assert torch.equal(load_deployable(tmp_path / "m.pt")(inputs), linear(inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_semi_structured_linear_uses_the_sparse_kernels_on_a_capable_gpu() -> None:
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("semi-structured sparse kernels need compute capability 8.0 or newer")
    linear = nn.Linear(256, 128).cuda().half()
    with torch.no_grad():
        linear.weight.mul_(nm_mask(linear.weight.abs().float(), 2, 4).half())
    layer = SemiStructuredLinear.from_linear(linear).eval()
    inputs = torch.randn(64, 256, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        out = layer(inputs)
    assert layer.kernel == "semi_structured"
    assert torch.allclose(out, linear(inputs), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 0.6, "m": 4}, r"sparsity=0.6 is not valid for m=4; allowed: 1 - n/m for an integer 1 <= n < m, e.g. 0.75, 0.5, 0.25"),
        ({"sparsity": 0.5, "m": 1}, r"m=1 is not valid; allowed: an integer >= 2"),
        ({"sparsity": 0.5, "m": 4, "n": 3}, r"n=3 is not valid for m=4 and sparsity=0.5; allowed: n = m \* \(1 - sparsity\)"),
        ({"sparsity": 0.5, "m": 4, "n": 0}, r"n=0 is not valid; allowed: an integer >= 1"),
    ],
)
def test_nm_constructor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NMPruning(**kwargs)


# ----------------------------------------------------------------------------- the shipped default


@pytest.mark.slow
def test_shipped_channel_default_halves_lenet5_on_mnist5k_within_two_points(tmp_path, store_uri: str) -> None:
    """`method=channel` as shipped, lenet5 on mnist5k, seed 0 (the dense baseline is trained here, ~30 s)."""
    done = run_train(["-m", "model=lenet5", "method=channel", "seed=0", "hardware=cpu_1t",
                      "trainer.enable_progress_bar=false", "hardware.latency.warmup=1", "hardware.latency.repeats=3"],
                     tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run = next(r for r in all_runs(store_uri) if r.data.tags.get("method") == "channel")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["acc_drop"] <= 2.0  # measured 0.0 at the shipped default; one seed is noisy
    path = mlflow.MlflowClient(store_uri).download_artifacts(run.info.run_id, "channel_summary.csv", str(tmp_path))
    rows = pd.read_csv(path).fillna("")
    pruned = rows[rows["skipped"] == ""]
    removed = 1 - pruned["channels_after"].sum() / pruned["channels_before"].sum()
    assert removed == pytest.approx(0.5, abs=0.02)  # 6/16/120/84 -> 3/8/60/42

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_modules.compression import distillation
from lightning_modules.compression.distillation import (
    FeatureDistillation,
    KnowledgeDistillation,
    attention_loss,
    attention_map,
    make_adapter,
    soft_target_loss,
)
from lightning_modules.config import ConfigError, validate
from lightning_modules.data import FixedViews, InMemoryDataModule
from lightning_modules.experiment import baseline_fingerprint
from lightning_modules.models import LeNet5, LeNet300
from lightning_modules.task import ClassificationTask
from tests.conftest import FAST, all_runs, compose_config, run_train


@pytest.fixture(autouse=True)
def empty_logit_cache():
    distillation.LOGIT_CACHE.clear()
    distillation.FEATURE_CACHE.clear()
    yield
    distillation.LOGIT_CACHE.clear()
    distillation.FEATURE_CACHE.clear()


def test_soft_target_loss_is_the_temperature_scaled_kl() -> None:
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    T = 3.0
    p_teacher = F.softmax(teacher / T, dim=1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / T, dim=1))).sum(1).mean() * T**2
    assert soft_target_loss(student, teacher, T) == pytest.approx(float(expected), rel=1e-5)
    assert float(soft_target_loss(teacher, teacher, T)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0}, r"temperature=0 is not valid; allowed: a number > 0"),
        ({"alpha": 1.5}, r"alpha=1.5 is not valid; allowed: a weight in \[0, 1\]"),
        ({"teacher_logits": "disk"}, r"teacher_logits='disk' is not valid; allowed: auto, cache, online"),
        ({"views": 0}, r"views=0 is not valid; allowed: an integer >= 1"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KnowledgeDistillation(**kwargs)


def test_feature_constructor_rejects_an_unknown_hint() -> None:
    with pytest.raises(ValueError, match=r"hint='gram' is not valid; allowed: fitnets, attention"):
        FeatureDistillation("features.3", "stages.5", hint="gram")


def test_cache_needs_a_data_module_it_can_index() -> None:
    with pytest.raises(ValueError, match="teacher_logits='cache' needs an InMemoryDataModule"):
        KnowledgeDistillation(teacher_logits="cache").use_cache(object())
    assert not KnowledgeDistillation().use_cache(object())  # auto: online
    for augment in (None, "affine"):
        assert KnowledgeDistillation().use_cache(InMemoryDataModule("digits", augment=augment))
        assert not KnowledgeDistillation(teacher_logits="online").use_cache(InMemoryDataModule("digits", augment=augment))


class CountingTeacher(LeNet300):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


def _fit(callback: KnowledgeDistillation, data: InMemoryDataModule, student: torch.nn.Module) -> ClassificationTask:
    pl.seed_everything(0, verbose=False)
    task = ClassificationTask(student, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=5,
                         limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    return task


@pytest.mark.parametrize(("mode", "augment", "passes"), [("auto", None, 1), ("cache", None, 1), ("online", None, 0),
                                                          ("auto", "affine", 3), ("online", "affine", 0)])
def test_teacher_runs_once_per_image_and_view_when_cached_and_per_batch_otherwise(mode, augment, passes) -> None:
    data = InMemoryDataModule("digits", batch_size=64, augment=augment)
    teacher = CountingTeacher(1, 8, 10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = KnowledgeDistillation(teacher_logits=mode, views=3)
    callback.attach_teacher(teacher)
    CountingTeacher.calls = 0
    task = _fit(callback, data, LeNet5(1, 8, 10))
    # cached: one pass over the train split per view (chunks of 1000 images); online: 5 batches x 2 epochs
    expected = passes * -(-len(data.split("train")) // 1000) if passes else 10
    assert CountingTeacher.calls == expected
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # no gradient reached it
    assert task.loss_terms == [] and task.hard_loss_weight == pytest.approx(0.1)
    assert data.return_indices is False and data.fixed_views is None


class AlignmentProbe(pl.Callback):
    """Compares, on every training batch, the logits the loss uses with the teacher run on that very batch."""

    def __init__(self, callback: KnowledgeDistillation) -> None:
        self.callback = callback
        self.gaps: list[float] = []
        self.batch_lengths: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            direct = self.callback.teacher(batch[0])
        self.gaps.append(float((self.callback.teacher_logits_for(batch) - direct).abs().max()))
        self.batch_lengths.add(len(batch))


@pytest.mark.parametrize(("augment", "batch_length"), [(None, 3), ("affine", 4)])
def test_cached_logits_are_the_teachers_on_the_image_the_student_sees(augment, batch_length) -> None:
    data = InMemoryDataModule("digits", batch_size=64, augment=augment)
    callback = KnowledgeDistillation(views=4)
    callback.attach_teacher(LeNet300(1, 8, 10))
    probe = AlignmentProbe(callback)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
                         limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(ClassificationTask(LeNet5(1, 8, 10), optimizer=partial(torch.optim.Adam, lr=1e-2)), datamodule=data)
    assert len(probe.gaps) == 8 and max(probe.gaps) < 1e-4  # shuffled batches, views drawn anew: still aligned
    assert probe.batch_lengths == {batch_length}  # images, labels, indices (and view numbers)


def test_fixed_views_are_the_same_picture_whatever_the_batch() -> None:
    images = InMemoryDataModule("digits").split("train").tensors[0][:16]
    views = FixedViews("affine", count=3, size=len(images))
    everything = views.apply(images, torch.arange(16), torch.full((16,), 2))
    some = views.apply(images[[5, 9]], torch.tensor([5, 9]), torch.tensor([2, 2]))
    assert torch.allclose(some, everything[[5, 9]], atol=1e-6)
    assert torch.equal(FixedViews("affine", count=3, size=16).params, views.params)  # fixed across instances
    other_view = views.apply(images, torch.arange(16), torch.zeros(16, dtype=torch.long))
    assert not torch.allclose(other_view, everything) and not torch.allclose(everything, images)
    with pytest.raises(ValueError, match=r"augment='cutout' has no fixed views; allowed: affine"):
        FixedViews("cutout", count=2, size=16)


def test_runs_that_share_teacher_and_data_compute_the_logits_once() -> None:
    data = InMemoryDataModule("digits", batch_size=64)
    teacher = CountingTeacher(1, 8, 10)
    CountingTeacher.calls = 0
    for seed_student in (LeNet5(1, 8, 10), LeNet5(1, 8, 10)):
        callback = KnowledgeDistillation()
        callback.attach_teacher(teacher)
        _fit(callback, data, seed_student)
    assert CountingTeacher.calls == -(-len(data.split("train")) // 1000)  # the first run's pass only
    other = CountingTeacher(1, 8, 10)
    with torch.no_grad():
        other.classifier[1].weight.add_(1.0)  # another teacher: computed anew
    callback = KnowledgeDistillation()
    callback.attach_teacher(other)
    _fit(callback, data, LeNet5(1, 8, 10))
    assert CountingTeacher.calls == 2 * -(-len(data.split("train")) // 1000)


def test_logits_cached_as_files_are_shared_by_processes(tmp_path: Path) -> None:
    data = InMemoryDataModule("digits", batch_size=64, augment="affine")
    teacher = CountingTeacher(1, 8, 10)
    CountingTeacher.calls = 0
    first = KnowledgeDistillation(views=2, cache_dir=str(tmp_path))
    first.attach_teacher(teacher)
    _fit(first, data, LeNet5(1, 8, 10))
    assert len(list(tmp_path.glob("*.pt"))) == 1 and first.teacher_pass_s > 0
    distillation.LOGIT_CACHE.clear()  # as a new process starts
    CountingTeacher.calls = 0
    second = KnowledgeDistillation(views=2, cache_dir=str(tmp_path))
    second.attach_teacher(teacher)
    _fit(second, data, LeNet5(1, 8, 10))
    assert CountingTeacher.calls == 0 and second.teacher_pass_s == 0.0
    # a damaged file is not trusted: the teacher runs again
    next(tmp_path.glob("*.pt")).write_bytes(b"not a tensor")
    distillation.LOGIT_CACHE.clear()
    images = data.split("train").tensors[0]
    views = FixedViews("affine", 2, len(images))
    logits, computed = distillation.cached_teacher_outputs(teacher, images, views, torch.device("cpu"), tmp_path)
    assert computed and logits.shape == (2, len(images), 10)
    assert CountingTeacher.calls == 2 * -(-len(images) // 1000)


def test_distillation_moves_the_student_towards_the_teacher() -> None:
    data = InMemoryDataModule("digits", batch_size=64)
    teacher = LeNet300(1, 8, 10)
    student = LeNet5(1, 8, 10)
    images = data.split("train").tensors[0][:256]
    with torch.no_grad():
        before = float(soft_target_loss(student(images), teacher(images), 4.0))
    callback = KnowledgeDistillation(alpha=1.0)
    callback.attach_teacher(teacher)
    trained = _fit(callback, data, student).model.eval()
    with torch.no_grad():
        after = float(soft_target_loss(trained(images), teacher.eval()(images), 4.0))
    assert after < 0.5 * before


def test_feature_distillation_trains_an_adapter_that_is_not_deployed() -> None:
    data = InMemoryDataModule("digits", batch_size=64)
    teacher = LeNet300(1, 8, 10)
    callback = FeatureDistillation(student_layer="features.3", teacher_layer="classifier.3", beta=1.0)
    callback.attach_teacher(teacher)
    task = _fit(callback, data, LeNet5(1, 8, 10))
    assert isinstance(task.hint_adapter[1], torch.nn.Linear)  # conv features -> flat teacher features
    assert not any(key.startswith("hint_adapter") for key in task.model.state_dict())
    assert callback.handles == []
    assert callback.summary(task.model)[0]["teacher_layer"] == "classifier.3"


class FeatureProbe(pl.Callback):
    """On every training batch, the hint target and logits the loss uses against the teacher run on that batch."""

    def __init__(self, callback: FeatureDistillation) -> None:
        self.callback = callback
        self.gaps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            logits = self.callback.teacher(batch[0])  # its hook captures the layer's output on this batch
        features = self.callback.captured["teacher"].clone()
        self.gaps.append(max(float((self.callback.teacher_logits_for(batch) - logits).abs().max()),
                             float((self.callback.teacher_features_for(batch) - features).abs().max())))


@pytest.mark.parametrize(("augment", "cache_mb", "passes"), [(None, 512, 1), ("affine", 512, 2), ("affine", 0, 0)])
def test_feature_hints_are_cached_per_image_and_view_when_they_fit(augment, cache_mb, passes) -> None:
    data = InMemoryDataModule("digits", batch_size=64, augment=augment)
    teacher = CountingTeacher(1, 8, 10)
    callback = FeatureDistillation(student_layer="features.3", teacher_layer="classifier.3", views=2,
                                   feature_cache_mb=cache_mb)
    callback.attach_teacher(teacher)
    probe = FeatureProbe(callback)
    CountingTeacher.calls = 0
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
                         limit_val_batches=0, num_sanity_val_steps=0)
    task = ClassificationTask(LeNet5(1, 8, 10), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer.fit(task, datamodule=data)
    chunks = -(-len(data.split("train")) // 1000)
    # the setup's one sample and the probe's own 8 calls, then one pass per view (cached), or online one call per
    # batch (4 batches x 2 epochs) in the loss and one in the probe's teacher_logits_for
    assert CountingTeacher.calls == 1 + 8 + (passes * chunks if passes else 2 * 8)
    assert callback.summary(task.model)[0]["features_cached"] == bool(passes)
    # cached in half precision: the target differs from the teacher's own output by its rounding only
    assert len(probe.gaps) == 8 and max(probe.gaps) < 2e-2
    assert data.return_indices is False and data.fixed_views is None and callback.cached_features is None


def test_attention_hint_matches_where_the_layers_look() -> None:
    features = torch.rand(4, 8, 6, 6)
    assert attention_map(features, (3, 3)).norm(dim=1) == pytest.approx(torch.ones(4))
    # channel count and overall scale do not matter, the spatial pattern does
    assert float(attention_loss(features, torch.cat([features, features], dim=1) * 3)) == pytest.approx(0.0, abs=1e-6)
    assert float(attention_loss(features, features.flip(3))) > 1e-3
    assert attention_loss(torch.rand(2, 4, 8, 8), torch.rand(2, 16, 4, 4)).shape == ()  # pooled to the coarser size


def test_attention_transfer_trains_without_an_adapter() -> None:
    data = InMemoryDataModule("digits", batch_size=64)
    callback = FeatureDistillation(student_layer="features.0", teacher_layer="features.3", hint="attention", beta=10.0)
    callback.attach_teacher(LeNet5(1, 8, 10))
    task = _fit(callback, data, LeNet5(1, 8, 10))
    assert not hasattr(task, "hint_adapter") and callback.summary(task.model)[0]["hint"] == "attention"
    flat = FeatureDistillation(student_layer="features.0", teacher_layer="classifier.1", hint="attention")
    flat.attach_teacher(LeNet300(1, 8, 10))
    with pytest.raises(ValueError, match=r"teacher_layer='classifier.1' gives \(300,\) features; allowed with hint=attention"):
        _fit(flat, data, LeNet5(1, 8, 10))


def test_adapter_shapes() -> None:
    conv = make_adapter(torch.zeros(2, 16, 4, 4), torch.zeros(2, 64, 2, 2))
    assert conv(torch.zeros(2, 16, 4, 4)).shape == (2, 64, 2, 2)
    flat = make_adapter(torch.zeros(2, 16, 4, 4), torch.zeros(2, 100))
    assert flat(torch.zeros(2, 16, 4, 4)).shape == (2, 100)


def test_unknown_hint_layer_lists_the_layers() -> None:
    data = InMemoryDataModule("digits", batch_size=64)
    callback = FeatureDistillation(student_layer="features.9", teacher_layer="classifier.3")
    callback.attach_teacher(LeNet300(1, 8, 10))
    with pytest.raises(ValueError, match=r"student_layer='features.9' is not a layer of LeNet5; allowed: features"):
        _fit(callback, data, LeNet5(1, 8, 10))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.teacher.model=lenet7"], r"method.teacher.model='lenet7' is not valid; allowed: lenet300, lenet5"),
        (["method.teacher.uri=http://x/model.pt"], r"method.teacher.uri='http://x/model.pt' is not valid; allowed: an MLflow URI"),
        (["method.teacher.checkpoint=/nowhere/model.pt"], r"method.teacher.checkpoint='/nowhere/model.pt' is not a file"),
        (["method.student_init=random"], r"method.student_init='random' is not valid; allowed: baseline, scratch"),
        (["method.teacher.seed=-1"], r"method.teacher.seed=-1 is not valid; allowed: an integer >= 0 or null"),
        (["method.callbacks.distill.alpha=2"], r"method.callbacks.distill: alpha=2"),
    ],
)
def test_bad_teacher_settings_fail_before_any_work(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(["method=kd", *overrides]))


def test_every_distillation_method_composes() -> None:
    for method in ("kd", "kd_feature"):
        cfg = compose_config([f"method={method}"])
        validate(cfg)
        assert cfg.method.fine_tune.epochs == cfg.baseline.epochs  # like-for-like with the baseline


@pytest.mark.parametrize(("model", "teacher"), [("lenet300", "resnet20"), ("lenet5", "resnet20"), ("resnet8", "resnet20"),
                                              ("resnet20", "resnet20"), ("mobilenetv2", "mobilenetv2")])
def test_the_default_teacher_is_the_models_own_choice_else_resnet20(model: str, teacher: str) -> None:
    # mobilenetv2 is larger than every other shipped model: a resnet20 teacher would be 8x smaller than it
    assert compose_config([f"model={model}", "method=kd"]).method.teacher.model == teacher
    assert compose_config([f"model={model}", "method=kd", "kd_teacher=lenet5"]).method.teacher.model == "lenet5"


def test_a_models_teacher_choice_is_not_part_of_its_baselines_identity() -> None:
    # a stored mobilenetv2 baseline is found again whichever teacher its kd runs name
    shipped = compose_config(["model=mobilenetv2"])
    other = compose_config(["model=mobilenetv2", "kd_teachers.mobilenetv2=resnet20"])
    assert other.kd_teacher == "resnet20" and "kd_teacher" not in shipped.model
    assert baseline_fingerprint(shipped) == baseline_fingerprint(other)
    assert baseline_fingerprint(shipped) != baseline_fingerprint(compose_config(["model=mobilenetv2", "seed=1"]))


@pytest.mark.slow
def test_kd_run_trains_its_teacher_once_and_accepts_a_teacher_uri(tmp_path: Path, store_uri: str) -> None:
    # FAST's 4 batches leave the lenet5 student at chance: the collapse check is off for this plumbing test
    fast = [*FAST, "++run_checks.chance_margin=null", "model=lenet5", "++method.teacher.model=lenet300",
            f"method.callbacks.distill.cache_dir={tmp_path / 'logits'}"]
    first = run_train(["-m", *fast, "method=kd"], tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    runs = all_runs(store_uri)
    teacher = next(r for r in runs if r.data.tags.get("model") == "lenet300")
    kd = next(r for r in runs if r.data.tags.get("method") == "kd")
    assert kd.info.status == "FINISHED"
    assert kd.data.tags["teacher"] == f"runs:/{teacher.info.run_id}/model/model.pt"
    assert "kd_summary.csv" in {a.path for a in __import__("mlflow").MlflowClient(store_uri).list_artifacts(kd.info.run_id)}
    # against the teacher, beside the figures against the student's own baseline
    metrics = kd.data.metrics
    assert metrics["teacher_test_acc"] == pytest.approx(teacher.data.metrics["test_acc"])
    assert metrics["acc_drop_vs_teacher"] == pytest.approx(metrics["teacher_test_acc"] - metrics["test_acc"])
    assert metrics["compression_ratio_vs_teacher"] > 1  # lenet5 is smaller than lenet300
    assert {"speedup_bs1_vs_teacher", "speedup_bs32_vs_teacher"} <= set(metrics)

    uri = kd.data.tags["teacher"]
    second = run_train(["-m", *fast, "method=kd", f"++method.teacher.uri={uri}"], tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    kd_runs = [r for r in all_runs(store_uri) if r.data.tags.get("method") == "kd"]
    assert len(kd_runs) == 2 and all(r.data.tags["teacher"] == uri for r in kd_runs)
    assert len([r for r in all_runs(store_uri) if r.data.tags.get("model") == "lenet300"]) == 1  # no second teacher

    # another student seed learns from the same teacher when method.teacher.seed pins it
    third = run_train(["-m", *fast, "method=kd", "seed=1", "method.teacher.seed=0"], tmp_path / "c")
    assert third.returncode == 0, third.stderr[-3000:]
    seed1 = next(r for r in all_runs(store_uri) if r.data.tags.get("method") == "kd" and r.data.tags["seed"] == "1")
    assert seed1.info.status == "FINISHED" and seed1.data.tags["teacher"] == uri
    assert len([r for r in all_runs(store_uri) if r.data.tags.get("model") == "lenet300"]) == 1


@pytest.mark.parametrize(("student", "teacher", "warned"), [("lenet300", "lenet5", True), ("lenet5", "lenet300", False),
                                                           ("lenet5", "lenet5", True)])
def test_a_teacher_no_larger_than_its_student_is_named_at_the_start(student, teacher, warned, caplog) -> None:
    import hydra.utils

    from lightning_modules.experiment import warn_if_teacher_not_larger
    from lightning_modules.models import build_model

    cfg = compose_config([*FAST, f"model={student}", "method=kd", f"method.teacher.model={teacher}"])
    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    teacher_cfg = compose_config([*FAST, f"model={teacher}"])
    with caplog.at_level("WARNING", logger="lightning_modules.experiment"):
        warn_if_teacher_not_larger(build_model(teacher_cfg.model.net, data.shape), f"{teacher} baseline", cfg, data)
    message = f"method=kd: the teacher ({teacher} baseline, "
    assert any(message in record.getMessage() and f"not larger than the student ({student}, " in record.getMessage()
               for record in caplog.records) == warned

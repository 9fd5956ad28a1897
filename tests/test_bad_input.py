"""Bad input, as a new user types it: each value is refused before any run opens, with the key, the
value and what is allowed; the few that need the store leave it without a RUNNING run or an artifact."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.config import ConfigError, validate
from lightning_modules.data import DataShape
from lightning_modules.models import build_model
from tests.conftest import CONF, FAST, all_runs, compose_config, run_train

MISSING_RUN = "runs:/0123456789abcdef0123456789abcdef/model/model.pt"
KD_LENET = ["data=digits", "model=lenet5", "method=kd", "method.teacher.model=lenet5"]


def _teacher_state(tmp_path: Path, num_classes: int) -> Path:
    """A state dict of lenet5 for digits' 8x8 images with `num_classes` outputs."""
    net = OmegaConf.load(CONF / "model" / "lenet5.yaml").net
    path = tmp_path / f"lenet5_{num_classes}.pt"
    torch.save(build_model(net, DataShape(1, 8, num_classes)).state_dict(), path)
    return path


def _corrupt_file(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 half a checkpoint, cut off by a full disk")
    return path


# (overrides, the message's key=value and allowed part); {tmp} files are made by the test
BAD_VALUES = [
    (["data=digits", "data.test_size=999999"], r"data.test_size=999999 is not valid; allowed: a count of images in 1..1796"),
    (["data.test_size=0"], r"data.test_size=0 is not valid; allowed: a count of images in 1\.\.4999"),
    (["data.test_size=-0.3"], r"data.test_size=-0.3 is not valid; allowed: .*a fraction in \(0, 1\)"),
    (["data=digits", "data.test_size=1.0"], r"data.test_size=1.0 is not valid; allowed: .*fraction in \(0, 1\)"),
    (["data=digits", "data.val_size=1500"], r"data.val_size=1500 is not valid; allowed: a count of images in 1\.\.1257, .*after the test split"),
    (["data.val_size=-1"], r"data.val_size=-1 is not valid; allowed: a count of images"),
    (["data.augment=blur"], r"data.augment='blur' is not valid; allowed: null, affine"),
    (["data.eval_batch_size=0"], r"data.eval_batch_size=0 is not valid; allowed: an integer >= 1"),
    (["data.split_seed=-3"], r"data.split_seed=-3 is not valid; allowed: an integer >= 0"),
    (["model=lenet5", "model.net.width_multiplier=0"], r"model.net.width_multiplier=0 is not valid; allowed: a number > 0"),
    (["model=lenet5", "model.net.width_multiplier=-0.5"], r"model.net.width_multiplier=-0.5 is not valid; allowed: a number > 0"),
    (["baseline.epochs=-2"], r"baseline.epochs=-2 is not valid; allowed: an integer >= 1"),
    (["method=agp", "method.fine_tune.epochs=-1"], r"method.fine_tune.epochs=-1 is not valid; allowed: an integer >= 0"),
    (["method=ptq_dynamic", "++method.fine_tune.epochs=1"], r"method.fine_tune=\{'epochs': 1\} has no optimizer; allowed: a whole recipe"),
    (["model=lenet5", "method=agp", "method.callbacks.prune.skip_layers=[conv9]"], r"conv9.*(allowed|layers)"),
    (["model=lenet5", "method=svd", "method.callbacks.factor.skip_layers=[nope]"], r"nope.*(allowed|layers)"),
    (["method=agp", "method.sparsity=-0.1"], r"sparsity=-0.1 is not valid; allowed"),
    (["method=agp", "method.callbacks.prune.unit=batch"], r"unit='batch' is not valid; allowed: step, epoch"),
    (["method=agp", "method.callbacks.prune.initial_sparsity=0.95"], r"initial_sparsity=0.95 .*(allowed|<=)"),
    # schedules longer than the fine-tuning: refused before the baseline trains, not when the fit starts
    (["method=agp", "method.fine_tune.epochs=10"],
     r"method.callbacks.prune: agp: end=15 epoch\(s\) is not valid with fine_tune.epochs=10; allowed: end < 10"),
    (["method=lightning", "method.fine_tune.epochs=5"], r"ramp_epochs=15 does not reach .* fine_tune.epochs=5"),
    (["method=iterative", "method.fine_tune.epochs=14"], r"takes 3 cycles of 5 epoch\(s\): fine_tune.epochs=14 is not valid; allowed: >= 15"),
    (["method=cluster", "method.callbacks.cluster.begin_epoch=2"], r"begin_epoch=2 is not valid; allowed: .*fine_tune.epochs=2"),
    (["method=qat", "method.callbacks.quantize.begin_epoch=2"],
     r"method.callbacks.quantize: begin_epoch=2 is not valid; allowed: an integer below fine_tune.epochs=2"),
    (["method=qat", "method.callbacks.quantize.observer=median"], r"observer='median' is not valid; allowed: "),
    (["method=qat", "method.callbacks.quantize.bits=0"], r"bits=0 is not valid; allowed"),
    (["method=cluster", "method.bits=0"], r"bits=0 is not valid; allowed"),
    (["method=svd", "method.rank_by=whim"], r"rank_by='whim' is not valid; allowed: "),
    (["method=kd", "method.callbacks.distill.temperature=0"], r"temperature=0 is not valid; allowed: a number > 0"),
    (["method=kd", "method.callbacks.distill.alpha=1.5"], r"alpha=1.5 is not valid; allowed: a weight in \[0, 1\]"),
    (["method=kd", "method.student_init=pretrained"], r"method.student_init='pretrained' is not valid; allowed: baseline, scratch"),
    (["method=kd", "method.teacher.model=resnet99"], r"method.teacher.model='resnet99' is not valid; allowed: .*lenet5"),
    (["method=kd", "method.teacher.uri=http://example.org/t.pt"], r"method.teacher.uri='http://example.org/t.pt' is not valid; allowed: an MLflow URI"),
    (["method=kd", "method.teacher.checkpoint=/nowhere/teacher.pt"], r"method.teacher.checkpoint='/nowhere/teacher.pt' is not a file"),
    ([*KD_LENET, "method.teacher.checkpoint={corrupt}"],
     r"method.teacher.checkpoint='.*corrupt.pt' cannot be used as the teacher .*allowed: a workbench model.pt, or a state dict"),
    ([*KD_LENET, "method.teacher.checkpoint={five_classes}"],
     r"method.teacher.checkpoint='.*lenet5_5.pt' cannot be used as the teacher \(ValueError: .*the teacher predicts 5 "
     r"classes .*, data=digits has 10\); allowed: "),
    ([*KD_LENET, f"method.teacher.uri={MISSING_RUN}"],
     rf"method.teacher.uri='{MISSING_RUN}' .*allowed: .*runs:/"),
    (["hardware=cpu_ort", "hardware.device=cuda"],
     r"hardware.runtime='ort' cannot run on hardware.device='cuda' \(hardware=cpu_ort\); allowed: hardware.device in cpu"),
    (["hardware.compile=maybe"], r"hardware.compile='maybe' is not valid; allowed: false, true, auto"),
    (["hardware.latency.warmup=-1"], r"hardware.latency.warmup=-1 is not valid; allowed: an integer >= 0"),
    (["seed=1.5"], r"seed=1.5 is not valid; allowed: an integer >= 0"),
    (["run_checks.chance_margin=-1"], r"run_checks.chance_margin=-1 is not valid; allowed: points above chance >= 0"),
    (["tracking.log_model=sometimes"], r"tracking.log_model='sometimes' is not valid; allowed: true, false"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_VALUES, ids=[" ".join(o) for o, _ in BAD_VALUES])
def test_a_bad_value_is_refused_with_its_key_and_what_is_allowed(
        overrides: list[str], message: str, tmp_path: Path, store_uri: str) -> None:
    files = {"corrupt": _corrupt_file(tmp_path), "five_classes": _teacher_state(tmp_path, 5)}
    cfg = compose_config([item.format(**files) for item in overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    assert not (tmp_path / "store").exists()  # no store was created to look into it


def test_the_table_is_long_enough() -> None:
    assert len(BAD_VALUES) >= 30


def test_a_teacher_of_the_datas_classes_is_accepted(tmp_path: Path) -> None:
    """The same file as the 5-class teacher above, with the data's 10 classes, passes."""
    path = _teacher_state(tmp_path, 10)
    cfg = compose_config([*KD_LENET, f"method.teacher.checkpoint={path}", "model.net.width_multiplier=0.5"])
    validate(cfg)  # a 10-class teacher fits digits


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "message"), [
    ([*KD_LENET, f"method.teacher.uri={MISSING_RUN}"], rf"method.teacher.uri='{MISSING_RUN}' cannot be used as the teacher"),
    (["data=digits", "data.test_size=999999"], r"data.test_size=999999 is not valid; allowed: a count of images in 1..1796"),
])
def test_train_refuses_before_any_run_opens(overrides: list[str], message: str, tmp_path: Path, store_uri: str) -> None:
    """As a user runs it, into a store that already holds a run (so a teacher URI can be looked up)."""
    import mlflow

    client = mlflow.MlflowClient(store_uri)
    experiment = client.create_experiment("workbench", artifact_location=(tmp_path / "store" / "artifacts").as_uri())
    client.set_terminated(client.create_run(experiment).info.run_id)
    before = {run.info.run_id for run in all_runs(store_uri)}
    result = run_train([*FAST, *overrides], tmp_path, timeout=300)
    assert result.returncode != 0
    assert re.search(rf"Error: {message}", result.stderr), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    runs = all_runs(store_uri)
    assert {run.info.run_id for run in runs} == before  # no run opened
    assert not any(run.info.status == "RUNNING" for run in runs)
    assert not (tmp_path / "store" / "artifacts").exists() or not any((tmp_path / "store" / "artifacts").rglob("*.*"))


@pytest.mark.slow
def test_a_sweep_refused_for_one_bad_job_names_that_jobs_overrides(tmp_path: Path, store_uri: str) -> None:
    # 20 epochs: agp's ramp ends at epoch 15, so job 1 is valid and job 2 (no recipe to complete) is the bad one
    result = run_train(["-m", "data=digits", "model=lenet5", "method=agp,ptq_dynamic", "++method.fine_tune.epochs=20"],
                       tmp_path, timeout=300)
    assert result.returncode == 2
    assert re.search(r"Error: job 2 of 2 \(.*method=ptq_dynamic.*\+\+method.fine_tune.epochs=20\): "
                     r"method.fine_tune=\{'epochs': 20\} has no optimizer; allowed: ", result.stderr), result.stderr[-3000:]
    assert "Nothing was run." in result.stderr
    assert not (tmp_path / "store").exists()

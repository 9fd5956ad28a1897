"""Run-level guarantees: a broken run is FAILED with its reason, bad model settings and layer names
fail before any run opens, timings say when they are noisy, slower runs say why, and runs with a
teacher are measured against it."""

from __future__ import annotations

import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from lightning_modules.config import ConfigError, validate
from lightning_modules.evaluation.report import Report, noisy_timing_reason
from lightning_modules.experiment import check_not_collapsed, slower_reason
from lightning_modules.models import LeNet300
from lightning_modules.contract import CHECKPOINT_FOLDER, FINGERPRINT_TAG, REJECTED_TAG
from lightning_modules.tracking import RunRejected
from tests.conftest import FAST, all_runs, compose_config, run_train

TEACHER_METRICS = ["teacher_test_acc", "acc_drop_vs_teacher", "compression_ratio_vs_teacher",
                   "speedup_bs1_vs_teacher", "speedup_bs32_vs_teacher"]
# FAST trains 4 batches: lenet5 and mobilenetv2 are still at chance there, so the runs that only
# test plumbing switch the collapse check off; the tests of the check itself keep it on.
UNCHECKED = [*FAST, "++run_checks.chance_margin=null"]
CHECKED = [*FAST, "++run_checks.chance_margin=2.0"]


# ----------------------------------------------------------------------------- models for the tests


class ConstantNet(nn.Module):
    """Ignores its input: only a bias is learned, so it predicts one class (chance on balanced data)."""

    def __init__(self, num_classes: int = 10, width_multiplier: float = 1.0) -> None:
        super().__init__()
        self.fc = nn.Linear(1, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.zeros(len(x), 1, device=x.device))


class NaNAfterTwoStepsNet(LeNet300):
    """A LeNet-300-100 whose training output turns NaN at its third training forward pass."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.training_passes = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            self.training_passes += 1
            if self.training_passes > 2:
                return logits * float("nan")
        return logits


class SlowWhenPrunedNet(LeNet300):
    """A LeNet-300-100 that sleeps 20 ms per forward pass once any weight of its middle layer is
    zero: magnitude pruning makes it far slower than its dense baseline, for no reason the run knows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training and bool((self.classifier[3].weight == 0).any()):
            time.sleep(0.02)
        return super().forward(x)


class ZeroChannelNet(nn.Module):
    """A bring-your-own model whose `hidden` setting can leave a layer without outputs."""

    def __init__(self, in_channels: int = 1, image_size: int = 8, num_classes: int = 10, hidden: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# ----------------------------------------------------------------------------- 1. broken runs are FAILED


def test_accuracy_within_two_points_of_chance_is_a_collapse() -> None:
    with pytest.raises(RunRejected, match=r"^collapsed: test_acc 11.9% is within 2 points of chance \(10.0%\)$"):
        check_not_collapsed(11.9, 10, 2.0)
    check_not_collapsed(12.1, 10, 2.0)
    check_not_collapsed(10.0, 10, None)  # switched off


@pytest.mark.slow
def test_a_collapsed_baseline_is_failed_never_stored_and_the_sweep_goes_on(tmp_path, store_uri: str) -> None:
    result = run_train(["-m", *CHECKED, "model=lenet300", "method=magnitude", "method.fine_tune.epochs=1",
                        f"model.net._target_={__name__}.ConstantNet,lightning_modules.models.LeNet300"], tmp_path)
    assert result.returncode == 1
    runs = all_runs(store_uri)
    assert all(run.info.status != "RUNNING" for run in runs)
    baselines = [run for run in runs if FINGERPRINT_TAG in run.data.tags]
    collapsed = [run for run in baselines if run.info.status == "FAILED"]
    assert len(collapsed) == 1
    assert collapsed[0].data.tags["error"].startswith("collapsed: test_acc ")
    assert "within 2 points of chance (10.0%)" in collapsed[0].data.tags["error"]
    assert collapsed[0].data.metrics["test_acc"] <= 12.0  # its figures are logged before it is failed
    assert collapsed[0].data.tags[REJECTED_TAG] == "true"
    # its training led to no result: no checkpoint is left for a relaunch to re-evaluate instead of training anew
    assert list((tmp_path / "sweep" / CHECKPOINT_FOLDER).glob("*")) == []
    assert len([run for run in baselines if run.info.status == "FINISHED"]) == 1  # the real LeNet300's
    # the sweep went on: the other job's compressed run finished; the one on the collapsed baseline is
    # FAILED with the reason, not missing
    magnitude = {run.info.status: run for run in runs if run.data.tags.get("method") == "magnitude"}
    assert sorted(magnitude) == ["FAILED", "FINISHED"]
    assert "collapsed: test_acc " in magnitude["FAILED"].data.tags["error"]


@pytest.mark.slow
def test_a_nan_loss_stops_training_at_once_and_fails_the_run(tmp_path, store_uri: str) -> None:
    result = run_train([*CHECKED, "model=lenet300", "baseline.epochs=5", "trainer.limit_train_batches=null",
                        f"model.net._target_={__name__}.NaNAfterTwoStepsNet"], tmp_path)
    assert result.returncode == 1
    [run] = all_runs(store_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("non-finite loss at epoch 0 step 2")
    assert "error.txt" in {a.path for a in MlflowClient(store_uri).list_artifacts(run.info.run_id)}


# ----------------------------------------------------------------------------- 2, 3. config errors before any work


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.net.width_multiplier=0"],
         r"model.net.width_multiplier=0 is not valid; allowed: a number > 0"),
        (["model.net.width_multiplier=-0.5"], r"model.net.width_multiplier=-0.5 is not valid; allowed: a number > 0"),
        (["model.net.width_multiplier=0.05"],
         r"model.net.width_multiplier=0.05 leaves a layer of 6 channels with 0; allowed: a number >= 0.08333"),
        (["model=resnet20", "model.net.width_multiplier=0.02"],
         r"model.net.width_multiplier=0.02 leaves a layer of 16 channels with 0; allowed: a number >= 0.03125"),
        (["model=lenet300", "+model.net.hidden=[0,100]"],
         r"model.net.hidden=\[0, 100\] is not valid; allowed: two layer sizes >= 1"),
        ([f"model.net._target_={__name__}.ZeroChannelNet", "~model.net.width_multiplier", "+model.net.hidden=0"],
         r"model.net settings \{'hidden': 0\} leave layer 'body.1' .* with 0 channels; allowed: values that leave"),
        (["method=kd_feature", "model=resnet20", "method.callbacks.distill.student_layer=features.5"],
         r"method.callbacks.distill: student_layer='features.5' is not a layer of ResNetCifar; allowed: stem, stem.0, "
         r".*stages.8.relu, .*pool, fc, or a rule: penultimate, last_conv"),
        (["method=kd_feature", "method.callbacks.distill.teacher_layer=features.5"],
         r"teacher_layer='features.5' is not a layer of ResNetCifar; allowed: stem"),
        (["method=kd_feature", "model=lenet300", "method.callbacks.distill.student_layer=last_conv"],
         r"student_layer='last_conv' is not valid: LeNet300 has no Conv2d layer; allowed: classifier"),
        (["method=kd_feature", "model=lenet300", "method.callbacks.distill.hint=attention"],
         r"student_layer='penultimate' gives \(100,\) features; allowed with hint=attention: a layer with \(channels"),
        (["method=magnitude", "method.callbacks.prune.skip_layers=[first,fc9]"],
         r"method.callbacks.prune: unknown layers \['fc9'\] for LeNet5; allowed: first, last, features.0, features.3"),
        (["method=channel", "method.callbacks.prune.sparsity=0.95"],
         r"method.callbacks.prune: sparsity=0.95 is not valid: it removes all 6 channels of features.0; "
         r"allowed: a fraction in \[0, 0.9167\) for this layer"),
        (["method=channel", "method.callbacks.prune.skip_layers=[conv9]"],
         r"method.callbacks.prune: channel pruning knows no producer layers \['conv9'\]; allowed: classifier.1"),
        (["hardware.latency.noisy_speedup_error=-0.1"],
         r"hardware.latency.noisy_speedup_error=-0.1 is not valid; allowed: a fraction of the speedup >= 0"),
        (["++run_checks.chance_margin=-1"], r"run_checks.chance_margin=-1 is not valid; allowed: points above chance >= 0"),
        (["hardware.latency.retries=-1"], r"hardware.latency.retries=-1 is not valid"),
        (["hardware.latency.exclusive=sometimes"],
         r"hardware.latency.exclusive='sometimes' is not valid; allowed: true or false"),
        (["hardware.train_threads=0"], r"hardware.train_threads=0 is not valid"),
    ],
)
def test_bad_model_settings_and_layer_names_fail_validation(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(["data=digits", *overrides]))


@pytest.mark.parametrize("model", ["lenet300", "lenet5", "resnet8", "resnet20", "mobilenetv2"])
def test_kd_feature_defaults_resolve_on_every_model(model: str) -> None:
    validate(compose_config(["data=digits", "method=kd_feature", f"model={model}"]))


@pytest.mark.slow
def test_width_zero_stops_before_any_run_opens(tmp_path, store_uri: str) -> None:
    single = run_train([*FAST, "model.net.width_multiplier=0"], tmp_path / "single")
    assert single.returncode != 0
    assert "model.net.width_multiplier=0 is not valid" in single.stderr
    sweep = run_train(["-m", *FAST, "model=lenet300", "model.net.width_multiplier=1.0,0"], tmp_path / "sweep")
    assert sweep.returncode == 2 and "Nothing was run" in sweep.stderr
    assert all_runs(store_uri) == []


# ----------------------------------------------------------------------------- 4, 5. timing noise, slower runs


def _latency(bs32_low: float, bs32_high: float, spread: float = 3.0) -> dict[str, float]:
    return {"speedup_bs1": 1.0, "speedup_bs1_ci95_low": 0.99, "speedup_bs1_ci95_high": 1.01,
            "speedup_bs32": 2.0, "speedup_bs32_ci95_low": bs32_low, "speedup_bs32_ci95_high": bs32_high,
            "latency_spread_bs1": spread, "latency_spread_bs32": spread}


def test_noisy_timing_names_load_and_the_speedups_interval() -> None:
    # a long p95 tail alone (sub-millisecond models on an idle machine) is not noise in the comparison
    assert noisy_timing_reason(0.5, _latency(1.9, 2.15, spread=3.0), [1, 32], 0.1) is None
    reason = noisy_timing_reason(1.8, _latency(1.5, 2.1), [1, 32], 0.1)
    assert reason == ("load 1.80 per core while timing (above 1.0: more runnable threads than cores); "
                      "speedup_bs32 2.00 has a 95% interval [1.50, 2.10] (+-25%, over "
                      "hardware.latency.noisy_speedup_error=0.1)")
    assert noisy_timing_reason(0.5, {}, [1, 32], 0.1) is None  # the baseline's own run compares nothing


@pytest.mark.parametrize(
    ("speedup", "tags", "label", "skipped", "expected"),
    [
        (0.96, {}, None, [], None),
        (0.80, {}, None, [], "speedup_bs32 0.80: no known cause: re-measure"),
        (0.80, {"latency_noisy": "load 3.00 per core"}, None, [],
         "speedup_bs32 0.80: timed under contention (latency_noisy: load 3.00 per core)"),
        (0.50, {}, "dequantized", [], "speedup_bs32 0.50: weights decoded to float at load (dequantized)"),
        (0.50, {}, "simulated", [], "speedup_bs32 0.50: int8 simulated in float kernels"),
        (0.90, {}, None, ["conv1"], "speedup_bs32 0.90: ptq left 1 layer(s) unconverted (conv1; see ptq_summary.csv)"),
        (0.92, {}, None, [], "speedup_bs32 0.92: within the timing noise (95% interval [0.89, 0.95] reaches 0.95)"),
    ],
)
def test_a_slower_run_says_why(speedup, tags, label, skipped, expected) -> None:
    interval = {"speedup_bs32_ci95_low": speedup - 0.03, "speedup_bs32_ci95_high": speedup + 0.03}
    report = Report({"speedup_bs1": 1.0, "speedup_bs32": speedup, **interval}, tags=tags, latency_label=label)
    rows = [{"layer": "fc"}, *({"layer": name, "skipped": "left in float"} for name in skipped)]
    reason = slower_reason(report, {"ptq": rows}, [1, 32])
    if expected is None:
        assert reason is None
    else:
        assert reason.startswith(expected)


def test_a_model_slower_on_int8_kernels_says_so() -> None:
    # lowbit on Inductor (cpu_1t): its 4-bit codes run widened on int8 kernels, 0.8x of fp32 on LeNet-5
    report = Report({"speedup_bs1": 0.7, "speedup_bs32": 0.8, "int8_kernel_ops": 5.0}, tags={}, latency_label=None)
    assert slower_reason(report, {}, [1, 32]).startswith("speedup_bs32 0.80: runs on 5 int8 kernel op(s)")


@pytest.mark.slow
def test_noisy_and_slower_runs_are_tagged_and_starred_in_the_grid(tmp_path, store_uri: str) -> None:
    result = run_train(["-m", *CHECKED, "model=lenet300", f"model.net._target_={__name__}.SlowWhenPrunedNet",
                        "method=magnitude", "method.fine_tune.epochs=1", "hardware=cpu_1t",
                        "method.callbacks.prune.skip_layers=[first,last]",
                        "hardware.latency.noisy_speedup_error=0"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(store_uri)
    assert all("latency_spread_bs1" in run.data.metrics and "latency_load_avg" in run.data.metrics
               and "latency_others_cores" in run.data.metrics for run in runs if run.data.tags.get("method"))
    [pruned] = [run for run in runs if run.data.tags.get("method") == "magnitude"]
    assert "noisy_speedup_error=0" in pruned.data.tags["latency_noisy"]
    assert pruned.data.metrics["speedup_bs32_ci95_low"] <= pruned.data.metrics["speedup_bs32"] \
        <= pruned.data.metrics["speedup_bs32_ci95_high"]
    assert pruned.data.metrics["speedup_bs32"] < 0.95
    assert pruned.data.tags["slower_reason"].startswith("speedup_bs32 0.")
    assert "timed under contention" in pruned.data.tags["slower_reason"]
    assert "magnitude left 2 layer(s) unconverted" in pruned.data.tags["slower_reason"]  # first and last stay dense
    assert "* timed under contention (tag latency_noisy)" in result.stdout
    assert "slower than the baseline (tag slower_reason)" in result.stdout


# ----------------------------------------------------------------------------- 3, 6. kd_feature everywhere, teacher figures


@pytest.mark.slow
def test_kd_feature_runs_on_every_model_and_logs_figures_against_its_teacher(tmp_path, store_uri: str) -> None:
    result = run_train(["-m", *UNCHECKED, "model=lenet300,lenet5,resnet8,resnet20,mobilenetv2", "method=kd_feature",
                        "hardware=cpu_1t", "kd_teacher=resnet20"], tmp_path)  # the default grid's is lenet5
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the teacher (resnet20 baseline, data digits, seed 0) is not in the store: training it first" in (
        result.stdout + result.stderr)
    runs = [run for run in all_runs(store_uri) if run.data.tags.get("method") == "kd_feature"]
    assert sorted(run.data.tags["model"] for run in runs) == ["lenet300", "lenet5", "mobilenetv2", "resnet20", "resnet8"]
    for run in runs:
        assert run.info.status == "FINISHED", run.data.tags.get("error")
        metrics = run.data.metrics
        assert [name for name in TEACHER_METRICS if name not in metrics] == []
        assert metrics["acc_drop_vs_teacher"] == pytest.approx(metrics["teacher_test_acc"] - metrics["test_acc"])
        assert metrics["compression_ratio_vs_teacher"] == pytest.approx(metrics["teacher_size_bytes"] / metrics["size_bytes"])
    resnet20 = next(run for run in runs if run.data.tags["model"] == "resnet20")
    # its own architecture (the files differ by a few header bytes)
    assert resnet20.data.metrics["compression_ratio_vs_teacher"] == pytest.approx(1.0, abs=0.02)
    assert "runs with a teacher: the student against its teacher" in result.stdout


# ----------------------------------------------------------------------------- training threads apart from measuring


def test_a_run_trains_on_train_threads_and_scores_and_times_on_its_hardware_threads(tmp_path, monkeypatch,
                                                                                   store_uri: str) -> None:
    import pytorch_lightning as pl

    from lightning_modules import experiment

    seen: dict[str, int] = {}
    fit, measure = pl.Trainer.fit, experiment.measure

    def counting_fit(self, *args, **kwargs):
        seen["fit"] = torch.get_num_threads()
        return fit(self, *args, **kwargs)

    def counting_measure(*args, **kwargs):
        seen["measure"] = torch.get_num_threads()
        return measure(*args, **kwargs)

    monkeypatch.setattr(pl.Trainer, "fit", counting_fit)
    monkeypatch.setattr(experiment, "measure", counting_measure)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # an earlier job of the process left 2: the run sets its own either way
    try:
        metrics = experiment.run_experiment(compose_config(
            [*UNCHECKED, "data=digits", "method=magnitude", "hardware=cpu", "hardware.threads=3",
             "hardware.train_threads=1", f"tracking.uri={store_uri}"]))
    finally:
        torch.set_num_threads(before)
    assert seen == {"fit": 1, "measure": 3}
    # the training energy estimate counts the one core it trained on
    assert metrics["energy_train_kj_estimate"] == pytest.approx(metrics["train_time_s"] * 7.0 / 1000)

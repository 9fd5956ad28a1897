"""scripts/scorecard.py: the verdict logic on synthetic rows (fast), the script end to end on digits
with a shrunk trainer, and a few real defaults on mnist5k with their real epochs (slow)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from lightning_modules.contract import EXPERIMENT
from lightning_modules.tracking import copy_baselines
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]


def _load_scorecard():
    spec = importlib.util.spec_from_file_location("scorecard", ROOT / "scripts" / "scorecard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scorecard"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


sc = _load_scorecard()


def run(seed: int, status: str = "FINISHED", tags: dict | None = None, params: dict | None = None, **metrics) -> "sc.RunRecord":
    base = {"test_acc": 97.0, "acc_drop": 0.1, "acc_drop_ci95_low": -0.4, "acc_drop_ci95_high": 0.6,
            "compression_ratio": 4.0, "speedup_bs1": 1.0, "speedup_bs32": 1.0, "sparsity": 0.8}
    return sc.RunRecord(seed, status, {**base, **metrics}, dict(tags or {}), dict(params or {"method.sparsity": "0.8"}))


def row(key: str, runs: list, model: str = "lenet5", method: str | None = None) -> "sc.Row":
    spec = next((spec for spec in sc.all_row_specs() if spec.key == key), None)
    if spec is None:
        spec = sc.RowSpec(key, method or key, sc.DEFAULT_HARDWARE)
    return sc.Row(spec, model, runs)


def judged(*rows):
    return sc.judge(list(rows))


def three(**metrics) -> list:
    return [run(seed, **metrics) for seed in (0, 1, 2)]


# ----------------------------------------------------------------------------- the target table itself


def test_every_target_names_known_rows_and_checks():
    keys = {spec.key for spec in sc.all_row_specs()}
    for target in sc.TARGETS:
        assert target.check in sc.CHECKS, target
        assert target.cite, target
        for key in target.rows:
            assert key == "*" or key in keys, f"target names unknown row {key!r}"


def test_methods_are_discovered_from_conf():
    assert set(sc.discover_methods()) == {path.stem for path in (ROOT / "conf" / "method").glob("*.yaml")}
    assert {"agp", "kd", "ptq_static", "baseline"} <= set(sc.discover_methods())


# ----------------------------------------------------------------------------- verdicts


def test_a_row_meeting_its_targets_passes():
    (result,) = judged(row("agp", three(sparsity=0.805, acc_drop=0.3)))
    assert result.verdict == "PASS", result.reasons


def test_a_row_without_targets_passes_when_finished_and_not_collapsed():
    (result,) = judged(row("random", three(acc_drop=40.0)))
    assert result.verdict == "PASS"


def test_a_failed_run_fails_the_row_with_its_error_and_is_never_aggregated():
    runs = [run(0, acc_drop=0.1), run(1, acc_drop=0.1),
            run(2, status="FAILED", tags={"error": "RuntimeError: boom"}, acc_drop=60.0, test_acc=10.0)]
    (result,) = judged(row("random", runs))
    assert result.verdict == "FAIL"
    assert "seed 2 FAILED (RuntimeError: boom)" in result.reasons[0]
    assert result.mean("acc_drop") == pytest.approx(0.1)
    assert result.mean("test_acc") == pytest.approx(97.0)
    assert "collapsed" not in " ".join(result.reasons)  # the FAILED run's figures judge nothing


def test_missing_runs_fail():
    (result,) = judged(row("random", [run(0), sc.RunRecord(1, "MISSING")]))
    assert result.verdict == "FAIL" and "MISSING" in result.reasons[0]


def test_a_row_with_no_run_yet_is_not_run_and_not_a_pass():
    (result,) = judged(row("agp", [sc.RunRecord(0, "MISSING"), sc.RunRecord(1, "MISSING")]))
    assert result.verdict == "NOT RUN"


def test_collapsed_model_fails():
    (result,) = judged(row("random", [run(0), run(1, test_acc=11.5)]))
    assert result.verdict == "FAIL" and "collapsed: seed 1" in result.reasons[0]


def test_a_slower_run_needs_a_slower_reason_tag():
    (untold,) = judged(row("random", [run(0, speedup_bs32=0.8)]))
    assert untold.verdict == "FAIL" and "no slower_reason" in untold.reasons[0]
    (told,) = judged(row("random", [run(0, speedup_bs32=0.8, tags={"slower_reason": "dequantizes per call"})]))
    assert told.verdict == "PASS"


def test_sparsity_off_by_more_than_001_fails():
    (result,) = judged(row("magnitude", three(sparsity=0.09, acc_drop=0.0)))
    assert result.verdict == "FAIL" and "sparsity 0.090 asked 0.80" in result.reasons[0]
    (extra,) = judged(row("agp@0.9", [run(s, sparsity=0.895, acc_drop=0.0, params={"method.sparsity": "0.9"})
                                      for s in (0, 1, 2)], model="lenet300"))
    assert extra.verdict == "PASS", extra.reasons


def test_drop_targets_are_judged_on_the_mean_over_seeds():
    # one seed above 0.5, the mean below: PASS; the mean above: FAIL with the interval
    (mean_ok,) = judged(row("agp", [run(0, acc_drop=0.9), run(1, acc_drop=0.2), run(2, acc_drop=0.1)]))
    assert mean_ok.verdict == "PASS"
    (mean_bad,) = judged(row("agp", [run(0, acc_drop=0.9), run(1, acc_drop=0.6), run(2, acc_drop=0.3)]))
    assert mean_bad.verdict == "FAIL" and mean_bad.reasons[0].startswith("mean drop 0.60 > 0.5 (95% CI")


def test_channel_speed_target_applies_on_lenet5_not_lenet300():
    slow = three(acc_drop=0.2, speedup_bs32=1.2, sparsity=0.0)
    (lenet5,) = judged(row("channel", slow))
    assert lenet5.verdict == "FAIL" and "speedup_bs32 1.20 < 1.5" in lenet5.reasons[0]
    (lenet300,) = judged(row("channel", three(acc_drop=0.2, speedup_bs32=1.2, sparsity=0.0), model="lenet300"))
    assert lenet300.verdict == "PASS"


def test_lowrank_compression_ratio_and_speed():
    (result,) = judged(row("tucker", three(acc_drop=0.2, compression_ratio=1.02, speedup_bs32=0.97)))
    assert result.verdict == "FAIL" and result.reasons == ["compression_ratio 1.02 < 1.5"]


def test_lowbit_needs_its_fakequant_metric_and_a_small_gap():
    (missing,) = judged(row("lowbit", three(acc_drop=0.2)))
    assert missing.verdict == "FAIL" and missing.reasons == ["metric missing: test_acc_fakequant"]
    (gap,) = judged(row("lowbit", [run(0, acc_drop=0.2, test_acc=97.0, test_acc_fakequant=97.5)]))
    assert gap.verdict == "FAIL" and "0.50 points > 0.3" in gap.reasons[0]


def test_int8_slower_than_fp32_fails():
    (result,) = judged(row("ptq_static", three(acc_drop=0.0, speedup_bs32=0.48, sparsity=0.0)))
    assert result.verdict == "FAIL"
    assert any("speedup_bs32 0.48 < 0.95" in reason for reason in result.reasons)


def test_int8_slower_only_within_its_timing_interval_passes_with_a_remark():
    def runs(low: float, high: float) -> list:
        return [run(seed, tags={"slower_reason": "speedup_bs32 0.90: within the timing noise"}, acc_drop=0.0,
                    sparsity=0.0, compression_ratio=3.9, speedup_bs32=0.90, speedup_bs32_ci95_low=low,
                    speedup_bs32_ci95_high=high) for seed in (0, 1, 2)]

    (noisy,) = judged(row("ptq_static", runs(0.80, 1.02)))
    assert noisy.verdict == "PASS"
    assert "speedup_bs32 0.90 < 0.95, within timing noise (interval up to 1.02)" in sc.notes(noisy)
    (steady,) = judged(row("ptq_static", runs(0.88, 0.92)))
    assert steady.verdict == "FAIL" and "speedup_bs32 0.90 < 0.95" in steady.reasons


def test_kd_needs_its_teacher_metrics_and_a_nonpositive_mean_drop():
    (missing,) = judged(row("kd", three(acc_drop=-0.1)))
    assert missing.verdict == "FAIL" and missing.reasons[0].startswith("metric missing: teacher_test_acc")
    teacher = {name: 1.0 for name in sc.KD_METRICS}
    (ok,) = judged(row("kd", three(acc_drop=-0.1, **teacher)))
    assert ok.verdict == "PASS"
    (worse,) = judged(row("kd", three(acc_drop=0.1, **teacher)))
    assert worse.verdict == "FAIL" and worse.reasons[0].startswith("mean drop 0.10 > 0")


def test_agp_no_worse_than_lightning_at_095():
    agp = row("agp@0.95", [run(s, acc_drop=0.9, sparsity=0.95, params={"method.sparsity": "0.95"}) for s in (0, 1, 2)])
    lightning_better = row("lightning@0.95", three(acc_drop=0.5))
    _, peer = judged(agp, lightning_better)
    assert peer.verdict == "FAIL" and "agp@0.95 drop 0.90 > lightning@0.95 drop 0.50" in peer.reasons[0]
    lightning_worse = row("lightning@0.95", three(acc_drop=3.0))
    _, peer = judged(agp, lightning_worse)
    assert peer.verdict == "PASS"
    (alone,) = judged(row("lightning@0.95", three(acc_drop=0.5)))  # no agp row to compare with: not judged
    assert alone.verdict == "PASS"


def test_a_hybrid_on_one_seed_is_judged_against_its_parts_with_the_test_images_noise():
    # --full runs one seed a row: no seed spread to pool, so the runs' own intervals (+-1.0 here: a standard
    # error of 0.51 each, 0.72 for the difference, margin 1.19) set the noise instead of +-0.00
    def one(key: str, drop: float, half: float = 1.0) -> "sc.Row":
        return row(key, [run(0, acc_drop=drop, acc_drop_ci95_low=drop - half, acc_drop_ci95_high=drop + half)],
                   model="resnet8")
    _, _, within = judged(one("agp", 0.2), one("qat", 0.2), one("agp_qat", 0.5))
    assert within.verdict == "PASS" and within.remarks == ["drop +0.30 vs agp, within noise (+-1.19)"]
    _, _, beyond = judged(one("agp", 0.2), one("qat", 0.2), one("agp_qat", 2.0))
    assert beyond.verdict == "FAIL" and "by 1.80 (noise +-1.19): the lossier of its parts" in beyond.reasons[0]


def test_a_hybrid_whose_parts_were_not_measured_says_it_was_not_compared():
    # mobilenetv2 channel_qat measured alone (--methods channel_qat) lost 5.40 and read PASS with nothing said
    (alone,) = judged(row("channel_qat", [run(0, acc_drop=5.4, acc_drop_ci95_low=3.8, acc_drop_ci95_high=7.0)],
                          model="mobilenetv2"))
    assert alone.remarks == ["not compared with channel, qat: no FINISHED row of them here"]
    assert "not compared with channel, qat" in sc.notes(alone)
    # with qat measured and channel not, the missing part may be the lossier: not judged against qat alone
    qat = row("qat", [run(0, acc_drop=0.1, acc_drop_ci95_low=-0.1, acc_drop_ci95_high=0.3)], model="mobilenetv2")
    _, partly = judged(qat, row("channel_qat", [run(0, acc_drop=1.5, acc_drop_ci95_low=1.3, acc_drop_ci95_high=1.7)],
                                model="mobilenetv2"))
    assert partly.verdict == "PASS" and "not compared with channel: no FINISHED row of it here" in partly.remarks


# ----------------------------------------------------------------------------- statistics


def test_mean_drop_interval_one_seed_is_its_own_bootstrap_interval():
    assert sc.mean_drop_interval([0.3], [-0.2], [0.9]) == (-0.2, 0.9)


def test_mean_drop_interval_widens_with_seed_spread_and_holds_image_noise():
    tight = sc.mean_drop_interval([0.3, 0.3, 0.3], [-0.2, -0.2, -0.2], [0.8, 0.8, 0.8])
    assert tight == pytest.approx((-0.2, 0.8))  # no seed spread: the shared image noise, not divided by sqrt(3)
    spread = sc.mean_drop_interval([0.0, 0.3, 0.6], [-0.5, -0.2, 0.1], [0.5, 0.8, 1.1])
    assert spread[0] < -0.2 and spread[1] > 0.8
    assert sum(spread) / 2 == pytest.approx(0.3)


# ----------------------------------------------------------------------------- the plan and the table


def test_a_method_name_brings_its_extra_rows_and_unknown_names_are_refused():
    assert [spec.key for spec in sc.select_specs(["agp"])] == ["agp", "agp@0.9", "agp@0.95"]
    assert [spec.key for spec in sc.select_specs(["agp@0.9"])] == ["agp@0.9"]
    assert [spec.key for spec in sc.select_specs(["agp"], exact=True)] == ["agp"]
    with pytest.raises(SystemExit, match="unknown nope"):
        sc.select_specs(["nope"])


def test_hardware_per_method():
    specs = {spec.key: spec for spec in sc.all_row_specs()}
    assert specs["ptq_static"].hardware == "cpu_ort" and specs["qat"].hardware == "cpu_ort"
    assert specs["ptq_static@cpu"].hardware == "cpu" and specs["qat@cpu"].hardware == "cpu"
    assert specs["agp"].hardware == "cpu_1t" and specs["channel"].hardware == "cpu_1t"


@pytest.mark.parametrize("method", sorted(sc.HARDWARE))
def test_int8_rows_run_on_the_hardware_their_method_ships_with(method):
    from tests.conftest import compose_config

    assert compose_config([f"method={method}"]).hardware.name == sc.HARDWARE[method]
    assert compose_config([f"method={method}", "hardware=cpu"]).hardware.name == "cpu"  # the command line wins


def test_int8_speed_passes_when_faster_or_when_every_run_kept_the_model_float():
    float_runs = [run(seed, tags={"slower_reason": "timed under contention"}, compression_ratio=1.0, speedup_bs32=0.90,
                      layers_skipped_ptq_static=5.0) for seed in (0, 1, 2)]
    (kept_float,) = judged(row("ptq_static@cpu", float_runs, method="ptq_static"))
    assert kept_float.verdict == "PASS" and "float model 3/3" in sc.notes(kept_float)
    (slower,) = judged(row("ptq_static@cpu", three(compression_ratio=3.9, speedup_bs32=0.9), method="ptq_static"))
    assert slower.verdict == "FAIL" and "speedup_bs32 0.90 < 0.95" in slower.reasons
    int8_seed = run(2, compression_ratio=2.9, speedup_bs32=1.0)
    (mixed,) = judged(row("ptq_static@cpu", [*float_runs[:2], int8_seed], method="ptq_static"))
    assert mixed.verdict == "PASS"  # the float seeds' 0.90 is their baseline's wobble, not int8's
    int8_seed.metrics["speedup_bs32"] = 0.85
    (mixed,) = judged(row("ptq_static@cpu", [*float_runs[:2], int8_seed], method="ptq_static"))
    assert mixed.verdict == "FAIL" and "speedup_bs32 0.85 < 0.95 (the 1 int8 seed)" in mixed.reasons


def test_a_model_with_an_int8_kernel_running_is_not_called_float_however_small_its_int8_share():
    # ptq_dynamic on resnet20: its convolutions stay float (no dynamic int8 conv kernel), the classifier runs int8
    dynamic = [run(seed, compression_ratio=1.001, speedup_bs32=1.16, layers_skipped_ptq_dynamic=21.0,
                   int8_kernel_ops=1.0) for seed in (0, 1, 2)]
    (judged_dynamic,) = judged(row("ptq_dynamic", dynamic, method="ptq_dynamic"))
    assert judged_dynamic.verdict == "PASS" and "float model" not in sc.notes(judged_dynamic)
    kept_float = [run(seed, compression_ratio=1.0, speedup_bs32=0.9, layers_skipped_qat=5.0, int8_kernel_ops=0.0)
                  for seed in (0, 1, 2)]
    (judged_float,) = judged(row("qat", kept_float, method="qat"))
    assert "float model 3/3" in sc.notes(judged_float)


def test_the_mean_count_of_skipped_layers_is_read_to_one_decimal():
    runs = [run(seed, layers_skipped_qat=count) for seed, count in ((0, 3.0), (1, 4.0), (2, 4.0))]
    (judged_row,) = judged(row("qat", runs, method="qat"))
    assert "skipped layers qat 3.7" in sc.notes(judged_row)


def test_plan_skips_conv_only_methods_on_lenet300_and_full_covers_every_model():
    specs = sc.select_specs(["tucker", "svd"])
    default = {(job.spec.key, job.model) for job in sc.plan(specs, ["lenet300", "lenet5"], [0, 1, 2], full=False)}
    assert ("tucker", "lenet300") not in default and ("svd", "lenet300") in default
    full = sc.plan(specs, ["lenet300", "lenet5"], [0, 1, 2], full=True)
    assert {job.model for job in full} == set(sc.discover_models())
    seeds = {(job.spec.key, job.model): job.seeds for job in full}
    assert seeds[("tucker", "resnet20")] == (0, 1, 2) and seeds[("svd", "mobilenetv2")] == (0,)


def test_groups_give_each_row_its_hardware_and_overrides(tmp_path):
    groups = sc.group_jobs(sc.plan(sc.select_specs(["agp", "lightning", "ptq_static"]), ["lenet5"], [0], False))
    commands = [" ".join(group.command("t", tmp_path)) for group in groups]
    assert any("method=ptq_static" in c and "hardware=cpu " in c for c in commands)
    assert any("method=agp,lightning" in c and "method.sparsity=0.95" in c and "hardware=cpu_1t" in c for c in commands)
    assert any(group.name("t").endswith("-sparsity0.95") for group in groups)
    assert all(f"tracking.uri=sqlite:///{tmp_path}" in c and "hydra.sweep.dir=" in c for c in commands)
    assert len({group.name("t") for group in groups}) == len(groups)


def test_students_of_every_seed_share_one_teacher_and_only_distillation_rows_pin_it(tmp_path):
    groups = sc.group_jobs(sc.plan(sc.select_specs(["kd", "kd_feature", "agp_kd"]), ["lenet5"], [0, 1, 2], False))
    by_method = {method: group for group in groups for method in group.methods}
    assert by_method["kd"] is by_method["kd_feature"] and by_method["kd"].overrides == ("method.teacher.seed=0",)
    # agp_kd's teacher is the student's own baseline of its seed: nothing extra to train, nothing pinned
    assert by_method["agp_kd"].overrides == ()
    command = by_method["kd"].command("t", tmp_path)
    assert "seed=0,1,2" in command and "method.teacher.seed=0" in command


def test_the_command_sets_the_shipped_teacher_per_model_over_the_default_grids(tmp_path):
    # the default grid teaches with lenet5; the scorecard passes config.yaml's own rule, which reads its kd_teachers table
    (group,) = sc.group_jobs(sc.plan(sc.select_specs(["kd"]), ["lenet5", "mobilenetv2"], [0], False))
    (teacher,) = [arg for arg in group.command("t", tmp_path) if arg.startswith("kd_teacher=")]
    (parsed,) = OverridesParser.create().parse_overrides([teacher])
    assert not parsed.is_sweep_override()  # the rule's comma is inside quotes: one value, not a sweep
    for model, expected in (("lenet5", "resnet20"), ("mobilenetv2", "mobilenetv2")):
        assert compose_config([f"model={model}", "method=kd", teacher]).method.teacher.model == expected


def test_units_train_the_teacher_and_each_seeds_baselines_first_and_the_rest_waits_for_them(tmp_path):
    groups = sc.group_jobs(sc.plan(sc.select_specs(["baseline", "agp", "kd", "qat"], exact=True), ["lenet300", "lenet5"],
                                   [0, 1], False))
    units = sc.plan_units(groups)
    teacher, first, second = units[:3]
    assert (teacher.part, teacher.methods, teacher.models, teacher.provides) == (
        "teacher", ("baseline",), ("resnet20",), frozenset({("resnet20", 0)}))
    assert first.provides == {("lenet300", 0), ("lenet5", 0)} and second.provides == {("lenet300", 1), ("lenet5", 1)}
    assert all(unit.methods == ("baseline",) for unit in units[:3])
    assert not any("baseline" in unit.methods for unit in units[3:])  # the baseline rows are the baseline units
    kd_units = [unit for unit in units if "kd" in unit.methods]
    # a small group's seeds share one unit; seed 0's teacher teaches them all
    assert [sorted(unit.needs) for unit in kd_units] == [
        [("lenet300", 0), ("lenet300", 1), ("lenet5", 0), ("lenet5", 1), ("resnet20", 0)]]
    assert len({unit.name("t") for unit in units}) == len(units)
    assert {(method, model, seed) for unit in units for method in unit.methods for model in unit.models
            for seed in unit.seeds} >= {(job.spec.method, job.model, seed) for job in
                                        sc.plan(sc.select_specs(["baseline", "agp", "kd", "qat"], exact=True),
                                                ["lenet300", "lenet5"], [0, 1], False) for seed in job.seeds}
    assert all("hydra/launcher=basic" in unit.command("t", tmp_path) for unit in units)  # units run side by side
    # a group's unit folders are read back as the group's (the seeds part and its suffix are not compared)
    assert all(unit.group.ran(unit.name("t"), "t") for unit in units if unit.part != "teacher")


def test_units_too_big_are_split_by_seed_then_by_model_and_folder_names_stay_distinct():
    groups = sc.group_jobs(sc.plan(sc.select_specs(None), ["lenet300", "lenet5"], [0, 1, 2], False))
    units = sc.plan_units(groups)
    assert all(unit.runs <= sc.UNIT_RUNS for unit in units if unit.part != "baseline")
    assert len({unit.name("t") for unit in units}) == len(units)  # the cp/tucker lenet5 unit beside the big one
    seeds_of = {unit.seeds for unit in units if unit.part not in ("baseline", "teacher")}
    assert seeds_of == {(0, 1, 2), (0,), (1,), (2,)}  # small groups in one unit, the others one per seed
    assert all(len(unit.models) == 1 for unit in units if len(unit.methods) * 2 > sc.UNIT_RUNS)


def test_run_units_runs_jobs_at_a_time_and_a_unit_after_what_it_needs(tmp_path, monkeypatch):
    events = tmp_path / "events"
    group = sc.Group(0, "cpu_1t", (), ("lenet5",), (0,), ["agp"])
    provider = sc.Unit(group, ("baseline",), ("lenet5",), (0,), "baseline", frozenset({("lenet5", 0)}))
    needing = sc.Unit(group, ("agp",), ("lenet5",), (0,), "a", needs=frozenset({("lenet5", 0)}))
    free = sc.Unit(group, ("agp",), ("lenet5",), (0,), "b")
    extras = []

    def command(unit, tag, store, data=sc.DATA, extra=()):
        extras.append(list(extra))
        script = ("import sys, time; f = open(sys.argv[1], 'a'); f.write('start ' + sys.argv[2] + chr(10)); f.flush(); "
                  "time.sleep(1.0); f.write('end ' + sys.argv[2] + chr(10))")
        return [sys.executable, "-c", script, str(events), unit.part]

    monkeypatch.setattr(sc.Unit, "command", command)
    sc.run_units([provider, needing, free], "t", tmp_path, jobs=2)
    order = events.read_text().split("\n")
    assert order.index("start a") > order.index("end baseline")  # waited for its baseline
    assert order.index("start b") < order.index("end baseline")  # needing nothing: beside the provider
    assert all("hardware.train_threads=1" in extra for extra in extras)  # side by side: each trains on one thread
    extras.clear()
    sc.run_units([free], "t", tmp_path, jobs=1)
    assert extras == [[]]
    with pytest.raises(SystemExit):
        sc.parse_args(["--jobs", "0"])


def test_the_table_is_markdown():
    rows = judged(row("agp", three(sparsity=0.8)), row("random", [run(0, status="FAILED", tags={"error": "E"})]))
    lines = sc.render(rows).splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert set(lines[1]) <= {"|", "-"}
    assert "PASS" in lines[2] and "FAIL: seed 0 FAILED (E)" in lines[3]


def test_the_summary_names_the_processors_the_rows_were_timed_on(tmp_path):
    args = sc.parse_args(["--store", str(tmp_path)])
    one = [row("agp", [run(seed, tags={"timed_on": "AMD EPYC, AVX2 without VNNI, 2 cores"}) for seed in (0, 1)])]
    assert "Timed on: AMD EPYC, AVX2 without VNNI, 2 cores (speedups" in sc.summary(judged(*one), None, args)
    two = [*one, row("random", [run(0, tags={"timed_on": "Intel Xeon, AVX512 with VNNI, 2 cores"})])]
    assert "AMD EPYC, AVX2 without VNNI, 2 cores (2 runs); Intel Xeon, AVX512 with VNNI, 2 cores (1 run)" in \
        sc.summary(judged(*two), None, args)
    assert "Timed on" not in sc.summary(judged(row("agp", three())), None, args)  # runs from before the tag
    mixed = sc.summary(judged(*one, row("random", three())), None, args)
    assert "AMD EPYC, AVX2 without VNNI, 2 cores (2 runs); not recorded for 3 runs (older code)" in mixed


def test_exit_code_is_nonzero_when_a_target_fails(tmp_path, monkeypatch):
    passing = [row("agp", three(sparsity=0.8))]
    monkeypatch.setattr(sc, "read_rows", lambda *args: passing)
    args = ["--report-only", "--store", str(tmp_path), "--methods", "agp", "--out", str(tmp_path / "s.md")]
    assert sc.main(args) == 0
    assert "| lenet5 | agp" in (tmp_path / "s.md").read_text().replace("  ", "")
    failing = [row("agp", three(sparsity=0.1))]
    monkeypatch.setattr(sc, "read_rows", lambda *args: failing)
    assert sc.main(args) == 1


def test_report_only_reads_a_store_with_nothing_yet(tmp_path):
    rows, code = sc.scorecard(["--report-only", "--store", str(tmp_path), "--methods", "svd", "--models", "lenet300",
                               "--seeds", "0", "--out", str(tmp_path / "s.md")])
    assert code == 1 and rows[0].runs[0].status == "MISSING" and rows[0].verdict == "NOT RUN"


def test_report_only_joins_the_seeds_of_several_passes_and_tags_into_one_row(tmp_path):
    from mlflow.tracking import MlflowClient

    store = tmp_path / "store"
    store.mkdir()
    client = MlflowClient(tracking_uri=sc.store_uri(store))
    experiment = client.create_experiment(EXPERIMENT, artifact_location=(store / "artifacts").as_uri())

    started = iter(range(1_000, 100_000, 1_000))  # start times in order of logging: the later attempt is known

    def logged(sweep: str, seed: int, test_acc: float, method: str = "svd") -> None:
        run = client.create_run(experiment, start_time=next(started),
                                tags={"sweep": sweep, "model": "lenet5", "method": method, "seed": str(seed)})
        client.log_metric(run.info.run_id, "test_acc", test_acc)
        client.set_terminated(run.info.run_id, "FINISHED")

    args = ["--store", str(store), "--methods", "svd", "--exact", "--models", "lenet5", "--seeds", "0,1,2",
            "--out", str(tmp_path / "s.md")]
    (group,) = sc.group_jobs(sc.plan(sc.select_specs(["svd"], exact=True), ["lenet5"], [0], False))
    first, second = group.name("a"), group.name("b").replace("-s0", "-s1_2")  # a seed-0 pass, then seeds 1 and 2
    logged(first, 0, 90.0)
    logged(first, 0, 91.0)  # the same seed again in a later attempt: the later one counts
    logged(second, 1, 92.0)
    logged(second, 2, 93.0)
    logged(second.replace(group.hardware, "cpu_ort"), 2, 50.0)  # another row's sweep (other hardware): not this row
    logged(second, 1, 60.0, method="tucker")  # another method in the same sweep: not this row

    (joined,), _ = sc.scorecard(["--report-only", "--tag", "a,b", *args])
    assert [(run.seed, run.metrics["test_acc"]) for run in joined.runs] == [(0, 91.0), (1, 92.0), (2, 93.0)]
    (one_tag,), _ = sc.scorecard(["--report-only", "--tag", "a", *args])
    assert [run.status for run in one_tag.runs] == ["FINISHED", "MISSING", "MISSING"]
    with pytest.raises(SystemExit):  # running names its sweeps with one tag
        sc.parse_args(["--tag", "a,b", "--store", str(store)])


# ----------------------------------------------------------------------------- end to end

SHRUNK = ["--data", "digits", "--override", "baseline.epochs=1", "--override", "trainer.limit_train_batches=4",
          "--override", "hardware.latency.warmup=1", "--override", "hardware.latency.repeats=3"]


@pytest.mark.slow  # ~25 s on 2 quiet cores, ~70 s when they are shared: two train.py processes start
def test_end_to_end_on_digits_reads_back_what_train_py_logged(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    rows, code = sc.scorecard([*SHRUNK, "--store", str(store), "--models", "lenet300", "--methods", "magnitude,baseline",
                               "--seeds", "0", "--out", str(tmp_path / "s.md")])
    by_key = {row.spec.key: row for row in rows}
    assert by_key["magnitude"].runs[0].status == "FINISHED"
    assert by_key["magnitude"].runs[0].params["method.sparsity"] == "0.8"
    assert by_key["baseline"].mean("acc_drop") == 0.0
    assert code in (0, 1) and (tmp_path / "s.md").read_text().count("| lenet300") == 2
    # the same store again, report only: the same rows
    again, _ = sc.scorecard(["--report-only", "--store", str(store), "--models", "lenet300", "--methods",
                             "magnitude,baseline", "--seeds", "0", "--out", str(tmp_path / "again.md")])
    assert [r.mean("test_acc") for r in again] == [r.mean("test_acc") for r in rows]


def _real(tmp_path, methods: str, models: str, seeds: str, exact: bool = False) -> dict:
    """The scorecard on mnist5k; WORKBENCH_BASELINES_DB (an mlflow.db with the mnist5k baselines) saves training them."""
    baselines = os.environ.get("WORKBENCH_BASELINES_DB")
    rows, _ = sc.scorecard(["--store", str(tmp_path / "store"), "--models", models, "--methods", methods,
                            "--seeds", seeds, "--out", str(tmp_path / "scorecard.md"), *(["--exact"] if exact else []),
                            *(["--baselines-from", baselines] if baselines else [])])
    return {(row.model, row.spec.key): row for row in rows}


@pytest.mark.slow  # mnist5k: a lenet5 baseline, ptq_static and qat on their ONNX Runtime default
def test_lenet5_int8_defaults_keep_accuracy(tmp_path, monkeypatch):
    # One seed: the 3-seed mean target (drop <= 0.3) is the scorecard script's to judge; a seed's model is
    # deterministic here, so the bound below cannot flicker. The cpu_ort rows only: the Inductor (@cpu) rows
    # compile every model (minutes) and are not asserted here. agp at 0.9 and lowbit's collapse are checked
    # through train.py by test_pruning_defaults.py and test_lowbit.py.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = _real(tmp_path, "ptq_static,qat", "lenet5", "0", exact=True)
    for key in ("ptq_static", "qat"):
        result = rows[("lenet5", key)]
        assert len(result.finished) == 1, result.reasons
        assert result.mean("acc_drop") <= 0.5, result.reasons


def test_readme_section_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n## What the defaults deliver\nintro\n{sc.README_START}\nold\n{sc.README_END}\n## next\n")
    sc.write_readme_section(readme, "new table\n")
    assert readme.read_text() == (f"# x\n## What the defaults deliver\nintro\n{sc.README_START}\nnew table\n"
                                  f"{sc.README_END}\n## next\n")
    unmarked = tmp_path / "OTHER.md"
    unmarked.write_text("# no section\n")
    with pytest.raises(SystemExit, match="no <!-- scorecard:start -->"):
        sc.write_readme_section(unmarked, "x")


def test_baselines_from_copies_then_merges_finished_baselines(tmp_path):
    from mlflow.tracking import MlflowClient

    source_uri = f"sqlite:///{tmp_path / 'source' / 'mlflow.db'}"
    (tmp_path / "source").mkdir()
    source = MlflowClient(tracking_uri=source_uri)
    experiment = source.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "source" / "artifacts").as_uri())

    def baseline(fingerprint: str, finished: bool) -> str:
        run = source.create_run(experiment, tags={"baseline_fingerprint": fingerprint})
        source.log_metric(run.info.run_id, "test_acc", 97.0)
        if finished:
            source.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    done, training = baseline("a", True), baseline("b", False)
    store = tmp_path / "store"
    copy_baselines(store, tmp_path / "source" / "mlflow.db")
    target = MlflowClient(tracking_uri=sc.store_uri(store))
    assert target.get_run(done).info.status == "FINISHED"
    assert target.get_run(training).info.status == "FAILED"  # its claim would make jobs here wait forever
    assert target.get_experiment_by_name(EXPERIMENT).artifact_location == (store.resolve() / "artifacts").as_uri()

    source.set_terminated(training, "FINISHED")  # the teacher finished there meanwhile
    later = baseline("c", True)
    copy_baselines(store, tmp_path / "source" / "mlflow.db")
    assert target.get_run(training).info.status == "FINISHED"
    assert target.get_run(later).data.metrics == {"test_acc": 97.0}
    assert target.get_run(later).data.tags["baseline_fingerprint"] == "c"


def test_a_mean_drop_at_the_limit_passes_whatever_the_float_rounding():
    drops = (0.7000000000000006, 0.5000000000000004, 0.30000000000000027)  # lenet5 taylor, 2026-12-01
    (at_limit,) = judged(row("taylor", [run(s, acc_drop=d) for s, d in enumerate(drops)]))
    assert at_limit.verdict == "PASS"
    (over,) = judged(row("taylor", [run(s, acc_drop=d + 0.1) for s, d in enumerate(drops)]))
    assert over.verdict == "FAIL" and over.reasons[0].startswith("mean drop 0.60 > 0.5")

"""The search across methods: its space, the study (constraint, resume), the front and winner, and a small
search end to end through train.py (trials as tracked runs under the parent run, then resumed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest

from lightning_modules import search
from lightning_modules.contract import (
    ENERGY_J_PER_IMAGE_ESTIMATE, ENERGY_SOURCE_TAG, ERROR_TAG, ENERGY_TRAIN_KJ_ESTIMATE, ROLE_SWEEP, ROLE_TAG, SEARCH_FILE,
    SEARCH_TRIALS_ARTIFACT, STUDY_DB, STUDY_TAG, TRIAL_TAG, WINNER_RUN_TAG, figure_artifact,
)
from lightning_modules.search import Knob, Objectives, SearchSettings, parse_knob
from lightning_modules.tracking import Store
from tests.conftest import FAST, FAST_SHIPPED, all_runs, run_train

# ----------------------------------------------------------------------------- the space


@pytest.mark.parametrize("spec, knob", [
    ("interval(0.5, 0.98)", Knob("k", "float", 0.5, 0.98)),
    ("interval(2, 9)", Knob("k", "float", 2.0, 9.0)),  # Hydra reads interval ends as floats: range for integers
    ("tag(log, interval(1e-4, 1e-2))", Knob("k", "float", 1e-4, 1e-2, log=True)),
    ("range(3, 21, 2)", Knob("k", "int", 3, 19, step=2)),
    ("range(1, 7)", Knob("k", "int", 1, 6, step=1)),
    ("choice(2, 4, ternary)", Knob("k", "categorical", choices=(2, 4, "ternary"))),
    ("0.25", Knob("k", "fixed", choices=(0.25,))),
])
def test_knobs_read_hydras_sweep_grammar(spec: str, knob: Knob) -> None:
    assert parse_knob("k", spec) == knob


@pytest.mark.parametrize("spec, match", [
    ("interval(0.9, 0.5)", r"k='interval\(0.9, 0.5\)': interval needs lo < hi"),
    ("range(0.1, 0.5, 0.1)", r"range takes whole numbers and a positive step"),
    ("interval(0.5", r"does not parse as a Hydra override value"),
])
def test_bad_knobs_name_the_key_and_the_grammar(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_knob("k", spec)


def test_an_empty_space_says_how_to_pick_methods() -> None:
    with pytest.raises(ValueError, match=r"hydra.sweeper.space is empty: pick methods"):
        search.parse_space({})


def test_the_space_is_conditional_on_the_method() -> None:
    space = search.parse_space({"agp": {"method.sparsity": "interval(0.5, 0.9)"},
                                "lowbit": {"method.bits": "choice(2, 4)", "method.fine_tune.epochs": "range(1, 3)"}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = {}
    for _ in range(12):
        trial = study.ask()
        overrides = search.suggest_overrides(trial, space)
        seen[overrides[0]] = overrides
        keys = {name.split(":")[0] for name in trial.params if name != search.METHOD_PARAM}
        assert keys == {trial.params[search.METHOD_PARAM]}  # only the chosen method's knobs are sampled
        study.tell(trial, 0.0)
    assert set(seen) == {"method=agp", "method=lowbit"}
    assert seen["method=lowbit"][1].startswith("method.bits=") and seen["method=lowbit"][2] in (
        "method.fine_tune.epochs=1", "method.fine_tune.epochs=2")


# ----------------------------------------------------------------------------- objectives, front, winner


def test_objectives_check_their_directions() -> None:
    with pytest.raises(ValueError, match=r"one direction per objective"):
        Objectives(("acc_drop", "size_bytes"), ("minimize",))
    with pytest.raises(ValueError, match=r"'smallest' is not one of minimize, maximize"):
        Objectives(("acc_drop",), ("smallest",))


def test_violation_and_values() -> None:
    objectives = Objectives(("acc_drop", "size_bytes"), ("minimize", "minimize"), budget=0.5)
    assert objectives.violation({"acc_drop": 0.7}) == pytest.approx(0.2)
    assert objectives.violation({}) == math.inf
    assert objectives.values({"acc_drop": 0.1}) is None
    assert objectives.values({"acc_drop": 0.1, "size_bytes": 10}) == [0.1, 10.0]


def test_hypervolume_2d_adds_the_strips_each_point_dominates() -> None:
    assert search.hypervolume_2d([(0.0, 0.5)], (1.0, 1.0)) == pytest.approx(0.5)
    # two points: 0.5 x 1.0 of the first plus the second's extra strip 0.5 x 0.25
    assert search.hypervolume_2d([(0.0, 0.5), (0.5, 0.25)], (1.0, 1.0)) == pytest.approx(0.5 + 0.125)
    assert search.hypervolume_2d([(2.0, 0.1), (0.5, 1.5)], (1.0, 1.0)) == 0.0  # outside the reference box


def test_front_and_winner_count_feasible_trials_only() -> None:
    table = pd.DataFrame({"acc_drop": [0.1, 0.4, 2.0, 0.3], "size_bytes": [900, 300, 50, 600],
                          "feasible": [True, True, False, True], "trial": [0, 1, 2, 3]})
    front = search.pareto(table, ["acc_drop", "size_bytes"], ["minimize", "minimize"])
    assert front.tolist() == [True, True, False, True]
    best = search.winner(table, ["acc_drop", "size_bytes"])
    assert best["trial"] == 1  # the smallest within the budget; trial 2 is smaller but over it


def log_run(store: Store, sweep: str, method: str, drop: float, size: float, status: str = "FINISHED",
            **tags: str) -> None:
    """A finished run as the workbench logs it, reduced to what the fronts read."""
    run = store.client.create_run(store.experiment_id, tags={
        "data": "digits", "model": "lenet5", "seed": "0", "sweep": sweep, "method": method, **tags})
    for name, value in {"acc_drop": drop, "size_bytes": size, "baseline_size_bytes": 1000.0,
                        "compression_ratio": 1000.0 / size}.items():
        store.client.log_metric(run.info.run_id, name, value)
    store.client.set_terminated(run.info.run_id, status)


def test_the_study_front_against_the_grid_front(toy_store: Store) -> None:
    parent = toy_store.client.create_run(toy_store.experiment_id, tags={
        ROLE_TAG: ROLE_SWEEP, "sweep": "search-1", STUDY_TAG: "size-digits-lenet5-seed0", "search_budget": "acc_drop <= 0.5"})
    toy_store.client.set_terminated(parent.info.run_id, "FINISHED")
    for method, drop, size in [("agp", 0.2, 300), ("lowbit", 0.1, 150), ("svd", 0.0, 600)]:  # lowbit dominates agp
        log_run(toy_store, "grid-1", method, drop, size)
    log_run(toy_store, "grid-1", "baseline", 0.0, 1000)
    log_run(toy_store, "grid-1", "agp", 0.0, 200, model="lenet300")  # another model: not compared
    log_run(toy_store, "search-1", "agp_cluster", 0.3, 50, trial="0")
    log_run(toy_store, "search-1", "cluster", -0.1, 120, trial="1")
    log_run(toy_store, "search-1", "lowbit", 0.1, 10, status="FAILED", trial="2")  # collapsed: never on the front
    log_run(toy_store, "search-1", "lowbit", 0.9, 20, trial="3")  # over the budget

    from lightning_modules.analysis import load_runs

    grid = load_runs(toy_store.uri, "workbench")  # every run: the search's are left out of the grid
    comparison = search.study_against_grid(grid, toy_store.uri, "workbench")
    assert comparison.study == "size-digits-lenet5-seed0" and comparison.budget == 0.5
    fronts = comparison.fronts
    assert fronts[fronts["source"] == "grid"]["method"].tolist() == ["svd", "lowbit"]
    assert fronts[fronts["source"] == "search"]["method"].tolist() == ["cluster", "agp_cluster"]
    # from the reference (drop 0.5, size 1.0), drops counted from -0.5, over the 1.0 x 1.0 box
    grid_volume = ((0.5 - 0.0) * (1 - 0.6) + (0.5 - 0.1) * (0.6 - 0.15))
    search_volume = ((0.5 + 0.1) * (1 - 0.12) + (0.5 - 0.3) * (0.12 - 0.05))
    assert comparison.hypervolumes == pytest.approx({"grid": grid_volume, "search": search_volume})
    assert comparison.ratio == pytest.approx(search_volume / grid_volume)

    def decades(share: float) -> float:  # the height on the log axis: 1x at 1.0 down to 100x smaller at 0.0
        return 1 + math.log10(share) / 2

    grid_log = (0.5 - 0.0) * (1 - decades(0.6)) + (0.5 - 0.1) * (decades(0.6) - decades(0.15))
    search_log = (0.5 + 0.1) * (1 - decades(0.12)) + (0.5 - 0.3) * (decades(0.12) - decades(0.05))
    assert comparison.hypervolumes_log == pytest.approx({"grid": grid_log, "search": search_log})
    assert comparison.ratio_log == pytest.approx(search_log / grid_log)
    assert "on a log size axis (1x to 100x smaller)" in comparison.summary()
    assert comparison.smallest("search")["method"] == "agp_cluster" and comparison.smallest("grid")["method"] == "lowbit"
    assert "hypervolume search / grid: 1.426" in comparison.summary()
    assert len(comparison.figure.axes[0].lines) >= 2  # both fronts drawn
    with pytest.raises(ValueError, match=r"study='other' is not in the store; it has: size-digits-lenet5-seed0"):
        search.study_against_grid(grid, toy_store.uri, "workbench", study="other")


def test_a_log_size_axis_credits_a_smaller_model_past_ten_times() -> None:
    """An 18x model covers 94% of the linear box's height: a 40x one adds 3 points there, 18 on the log axis."""
    def table(ratios: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"acc_drop": [0.0] * len(ratios), "size_bytes": [1000 / r for r in ratios], "feasible": True})

    grid, search_front = table([18.0]), table([18.0, 40.0])
    linear = [search.front_hypervolume(t, ["acc_drop", "size_bytes"], 0.5, 1000.0) for t in (grid, search_front)]
    logged = [search.front_hypervolume(t, ["acc_drop", "size_bytes"], 0.5, 1000.0, 2.0) for t in (grid, search_front)]
    assert linear[1] / linear[0] == pytest.approx((1 - 1 / 40) / (1 - 1 / 18))  # 1.03
    assert logged[1] / logged[0] == pytest.approx(math.log10(40) / math.log10(18))  # 1.28
    beyond = search.front_hypervolume(table([1000.0]), ["acc_drop", "size_bytes"], 0.5, 1000.0, 2.0)
    assert beyond == pytest.approx(0.5)  # past 100x counts as 100x: the box's whole height, half its width


def test_the_study_front_holds_the_grid_runs_it_started_from(toy_store: Store) -> None:
    parent = toy_store.client.create_run(toy_store.experiment_id, tags={
        ROLE_TAG: ROLE_SWEEP, "sweep": "search-1", STUDY_TAG: "size-digits-lenet5-seed0", "search_budget": "acc_drop <= 0.5"})
    toy_store.client.set_terminated(parent.info.run_id, "FINISHED")
    for method, drop, size in [("agp", 0.2, 300), ("lowbit", 0.1, 150)]:
        log_run(toy_store, "grid-1", method, drop, size)
    log_run(toy_store, "search-1", "agp_cluster", 0.3, 200, trial="2")  # the only trial run: worse than lowbit
    from lightning_modules.analysis import load_runs

    grid = load_runs(toy_store.uri, "workbench")
    seed = grid.loc[grid["method"] == "lowbit", "run_id"].item()
    trials = pd.DataFrame([{"trial": 0, "run_id": seed, "seeded": True},
                           {"trial": 2, "run_id": "x", "seeded": False}])
    toy_store.client.log_text(parent.info.run_id, trials.to_csv(index=False), SEARCH_TRIALS_ARTIFACT)

    started = search.study_against_grid(grid, toy_store.uri, "workbench")
    front = started.fronts[started.fronts["source"] == "search"]
    assert front["method"].tolist() == ["lowbit"] and front["seeded"].tolist() == [True]
    assert started.ratio == pytest.approx(1.0)  # the grid's front is lowbit alone: the search holds it too
    assert "search: 2 runs (1 trials run + 1 of the store's it started from)" in started.summary()
    alone = search.study_against_grid(grid, toy_store.uri, "workbench", with_seeds=False)
    assert alone.fronts[alone.fronts["source"] == "search"]["method"].tolist() == ["agp_cluster"] and alone.ratio < 1


def test_front_rows_tell_a_methods_knobs_apart_across_search_and_grid() -> None:
    def runs(rows: list[tuple[str, float, float, str]]) -> pd.DataFrame:
        return pd.DataFrame([{"run_name": f"{method}-{sparsity}", "data": "mnist5k", "model": "resnet20",
                              "hardware": "cpu", "method": method, "status": "FINISHED", "acc_drop": drop,
                              "size_bytes": size, "baseline_size_bytes": 1000.0, "params.method.sparsity": sparsity}
                             for method, drop, size, sparsity in rows])

    # one agp run each: only side by side does the sparsity vary, and so become the knob that labels them
    comparison = search.compare_fronts(runs([("agp", 0.1, 100.0, "0.95")]), runs([("agp", 0.0, 300.0, "0.8")]), 0.5)
    assert sorted(comparison.fronts["knobs"]) == ["sparsity=0.8", "sparsity=0.95"]


def test_no_study_in_the_store_is_none(toy_store: Store) -> None:
    log_run(toy_store, "grid-1", "agp", 0.2, 300)
    from lightning_modules.analysis import load_runs

    assert search.study_against_grid(load_runs(toy_store.uri, "workbench"), toy_store.uri, "workbench") is None


# ----------------------------------------------------------------------------- the study, without training


def fake_job(metrics: dict[str, float] | None) -> SimpleNamespace:
    return SimpleNamespace(return_value=metrics)


def toy_metrics(overrides: list[str]) -> dict[str, float]:
    """A method's made-up figures: higher sparsity is smaller and loses more."""
    values = dict(item.split("=", 1) for item in overrides)
    sparsity = float(values.get("method.sparsity", 0.5))
    return {"acc_drop": 4 * (sparsity - 0.5), "size_bytes": 1000 * (1 - sparsity)}


def settings(tmp_path: Path, n_trials: int, sampler: str = "tpe") -> SearchSettings:
    return SearchSettings(
        study="toy", storage=f"sqlite:///{tmp_path / STUDY_DB}",
        space=search.parse_space({"agp": {"method.sparsity": "interval(0.5, 0.99)"}}),
        objectives=Objectives(("acc_drop", "size_bytes"), ("minimize", "minimize"), budget=0.5),
        n_trials=n_trials, sampler=sampler, startup_trials=2)


@pytest.fixture
def toy_store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "workbench")


def test_infeasible_trials_are_kept_and_never_win(tmp_path: Path, toy_store: Store) -> None:
    launched = []

    def launch(batch: list[list[str]], first: int) -> list:
        launched.append(first)
        return [fake_job(toy_metrics(job)) for job in batch]

    study = search.run_search(settings(tmp_path, 6), ["data=digits"], launch, toy_store)
    table = search.trials_table(study)
    assert len(table) == 6 and (table["state"] == "COMPLETE").all()
    assert not table["feasible"].all()  # some went over the budget: kept, marked infeasible
    assert all(v > 0 for v in table.loc[~table["feasible"], "violation"])
    assert table.loc[table["on_front"], "feasible"].all()
    assert search.winner(table, ["acc_drop", "size_bytes"])["acc_drop"] <= 0.5
    # constraints reach the sampler: Optuna holds one on every trial
    assert all(set(t.constraints) == {"acc_drop"} for t in study.trials)


def test_a_job_without_its_objectives_is_a_failed_trial(tmp_path: Path, toy_store: Store) -> None:
    study = search.run_search(settings(tmp_path, 2), [], lambda batch, first: [fake_job(None) for _ in batch],
                              toy_store)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    table = search.trials_table(study)
    assert (table["run_status"] == "FAILED").all() and not table["feasible"].any()
    assert table["error"].str.startswith("the job of trial ").all()
    assert search.failure_lines(table)[0].startswith("2 of 2 trials failed")


def test_a_failed_run_is_never_feasible_even_within_the_budget(tmp_path: Path, toy_store: Store) -> None:
    """A collapsed run logs its figures, then ends FAILED: its trial is COMPLETE (the sampler learns
    from it) but infeasible, whatever its drop, and the reason is on the trial."""
    def launch(batch: list[list[str]], first: int) -> list:
        run = toy_store.client.create_run(toy_store.experiment_id, tags={STUDY_TAG: "toy", TRIAL_TAG: str(first)})
        if first == 0:  # the smallest and within the budget on paper: but its run FAILED
            toy_store.client.log_metric(run.info.run_id, "acc_drop", 0.0)
            toy_store.client.log_metric(run.info.run_id, "size_bytes", 1.0)
            toy_store.client.set_tag(run.info.run_id, ERROR_TAG, "collapsed: test_acc 10.0% is within 2 points of chance")
            toy_store.client.set_terminated(run.info.run_id, "FAILED")
        else:
            for name, value in toy_metrics(batch[0]).items():
                toy_store.client.log_metric(run.info.run_id, name, value)
            toy_store.client.set_terminated(run.info.run_id, "FINISHED")
        return [fake_job(None)]

    study = search.run_search(settings(tmp_path, 4), [], launch, toy_store)
    table = search.trials_table(study).set_index("trial")
    collapsed = table.loc[0]
    assert collapsed["state"] == "COMPLETE" and collapsed["run_status"] == "FAILED"
    assert not collapsed["feasible"] and not collapsed["on_front"] and collapsed["violation"] == math.inf
    assert collapsed["error"].startswith("collapsed:")
    assert (table.loc[[1, 2, 3], "run_status"] == "FINISHED").all()
    best = search.winner(table.reset_index(), ["acc_drop", "size_bytes"])
    assert best is None or best["trial"] != 0
    lines = search.failure_lines(table.reset_index())
    assert lines[0].startswith("1 of 4 trials failed") and lines[1].startswith("    trial 0 agp method.sparsity=")


def test_a_killed_study_resumes_where_it_stopped(tmp_path: Path, toy_store: Store) -> None:
    calls: list[list[str]] = []

    def dies_on_the_third(batch: list[list[str]], first: int) -> list:
        calls.append(batch[0])
        if first == 2:
            raise KeyboardInterrupt  # the search is killed while trial 2 runs
        return [fake_job(toy_metrics(job)) for job in batch]

    with pytest.raises(KeyboardInterrupt):
        search.run_search(settings(tmp_path, 4), [], dies_on_the_third, toy_store)
    interrupted = calls[-1]

    relaunched: list[tuple[int, list[str]]] = []

    def launch(batch: list[list[str]], first: int) -> list:
        relaunched.append((first, batch[0]))
        return [fake_job(toy_metrics(job)) for job in batch]

    study = search.run_search(settings(tmp_path, 4), [], launch, toy_store)  # the same storage: resumed
    states = [t.state.name for t in study.trials]
    # trial 2 was killed: marked FAIL, left out of the count; its rerun (trial 3) and one more make 4
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert relaunched[0] == (3, interrupted)  # the interrupted trial runs first, with its parameters
    assert study.trials[3].params == study.trials[2].params
    assert len(search.trials_table(study)) == 4



# ----------------------------------------------------------------------------- the warm start: the store's runs as trials


def toy_config(overrides: list[str] | tuple[str, ...]) -> dict[str, str]:
    """What compose_params gives for the toy space: the run's data, model, seed, hardware, method and knobs,
    and where it ran (tracking.uri: never compared)."""
    values = dict(item.split("=", 1) for item in overrides)
    return {"data.name": "digits", "model.name": "lenet5", "seed": 0, "hardware.name": "cpu",
            "method.name": values.get("method", "baseline"), "method.sparsity": float(values.get("method.sparsity", 0.8)),
            "method.fine_tune.epochs": 30, "tracking.uri": "sqlite:////here/mlflow.db"}


def log_config_run(store: Store, params: dict, metrics: dict[str, float], status: str = "FINISHED",
                   **tags: str) -> str:
    """A run as the workbench logs it: its config as params, the identity tags, its objectives."""
    run = store.client.create_run(store.experiment_id, tags={
        "data": params["data.name"], "model": params["model.name"], "seed": str(params["seed"]),
        "hardware": params["hardware.name"], "method": params["method.name"], **tags})
    for key, value in params.items():
        store.client.log_param(run.info.run_id, key, str(value))
    for name, value in metrics.items():
        store.client.log_metric(run.info.run_id, name, value)
    store.client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_knob_values_are_read_from_a_runs_params_within_the_space() -> None:
    sparsity, bits = Knob("method.sparsity", "float", 0.5, 0.98), Knob("method.bits", "categorical", choices=(2, 4, "ternary"))
    assert search.knob_value(sparsity, "0.8") == 0.8
    assert search.knob_value(bits, "4") == 4 and search.knob_value(bits, "ternary") == "ternary"
    assert search.knob_value(Knob("+method.epochs", "int", 1, 6, step=1), "3") == 3
    with pytest.raises(ValueError, match=r"method.sparsity=0.99 lies outside \[0.5, 0.98\]"):
        search.knob_value(sparsity, "0.99")
    with pytest.raises(ValueError, match=r"method.bits=8 is not one of \[2, 4, 'ternary'\]"):
        search.knob_value(bits, "8")
    with pytest.raises(ValueError, match="no param method.epochs"):
        search.knob_value(Knob("++method.epochs", "int", 1, 6, step=1), None)


def test_the_stores_runs_that_are_points_of_the_space_seed_the_study(tmp_path: Path, toy_store: Store) -> None:
    grid = {sparsity: log_config_run(toy_store, toy_config(["method=agp", f"method.sparsity={sparsity}"]),
                                     toy_metrics([f"method.sparsity={sparsity}"]), sweep="grid")
            for sparsity in (0.6, 0.7)}  # drops 0.4 (within the budget) and 0.8 (over it)
    # not points of this space, each for its reason
    other_recipe = {**toy_config(["method=agp", "method.sparsity=0.65"]), "method.fine_tune.epochs": 3}
    log_config_run(toy_store, other_recipe, toy_metrics(["method.sparsity=0.65"]))
    log_config_run(toy_store, toy_config(["method=agp", "method.sparsity=0.995"]), toy_metrics(["method.sparsity=0.995"]))
    log_config_run(toy_store, toy_config(["method=agp", "method.sparsity=0.55"]), toy_metrics(["method.sparsity=0.55"]),
                   status="FAILED")
    log_config_run(toy_store, toy_config(["method=agp", "method.sparsity=0.75"]), toy_metrics(["method.sparsity=0.75"]),
                   study="another", trial="0")  # another search's trial
    log_config_run(toy_store, {**toy_config(["method=agp", "method.sparsity=0.6"]), "seed": 1}, {"acc_drop": 0.0})
    log_config_run(toy_store, toy_config(["method=lowbit"]), {"acc_drop": 0.0, "size_bytes": 1.0})  # not in the space
    # a run whose where-it-ran differs (another store's path) is the same run
    moved = {**toy_config(["method=agp", "method.sparsity=0.9"]), "tracking.uri": "sqlite:////elsewhere/mlflow.db"}
    grid[0.9] = log_config_run(toy_store, moved, toy_metrics(["method.sparsity=0.9"]))

    seeds, left_out = search.store_seeds(toy_store, settings(tmp_path, 1).space, toy_config)
    assert sorted(seed.run_id for seed in seeds) == sorted(grid.values())
    reasons = sorted(left_out.values())
    assert len(reasons) == 2
    assert "its config differs at 1 keys: method.fine_tune.epochs 3 (a trial: 30)" in reasons[0] + reasons[1]
    assert "method.sparsity=0.995 lies outside [0.5, 0.99]" in reasons[0] + reasons[1]

    launched: list[list[str]] = []

    def launch(batch: list[list[str]], first: int) -> list:
        launched.extend(batch)
        return [fake_job(toy_metrics(job)) for job in batch]

    seen: list[int] = []  # trials the study held at each progress call: after the warm start, after each trial
    study = search.run_search(settings(tmp_path, 2), [], launch, toy_store, toy_config,
                              progress=lambda study: seen.append(len(study.trials)))
    assert seen == [3, 4, 5]
    table = search.trials_table(study)
    seeded = table[table["seeded"]]
    assert sorted(seeded["run_id"]) == sorted(grid.values()) and (seeded["state"] == "COMPLETE").all()
    assert sorted(seeded["knobs"]) == ["method.sparsity=0.6", "method.sparsity=0.7", "method.sparsity=0.9"]
    assert seeded.set_index("knobs").loc["method.sparsity=0.7", "violation"] == pytest.approx(0.3)
    assert len(launched) == 2 and len(table) == 5  # n_trials counts the trials run, not the seeds
    assert search.finished_trials(study) == 2
    # the sampler sees the seeds as its own trials: their parameters in the space's distributions
    assert {t.params["agp:method.sparsity"] for t in study.trials if t.user_attrs.get(search.SEEDED_ATTR)} == {0.6, 0.7, 0.9}

    # a relaunch adds only the runs new since; a repeated suggestion of a seed's point would reuse its run
    grid[0.62] = log_config_run(toy_store, toy_config(["method=agp", "method.sparsity=0.62"]),
                                toy_metrics(["method.sparsity=0.62"]))
    again = search.run_search(settings(tmp_path, 3), [], launch, toy_store, toy_config)
    table = search.trials_table(again)
    assert sorted(table.loc[table["seeded"], "run_id"]) == sorted(grid.values())
    assert search.finished_trials(again) == 3 and len(launched) == 3
    without = search.run_search(SearchSettings(**{**settings(tmp_path, 3).__dict__, "study": "cold", "warm_start": False}),
                                [], launch, toy_store, toy_config)
    assert not search.trials_table(without)["seeded"].any()


# ----------------------------------------------------------------------------- end to end through train.py


SEARCH_ARGS = ["-m", "experiment=search_size", "search@hydra.sweeper.space=[lowbit,cluster]", "hydra.sweeper.startup_trials=2",
               *FAST]


@pytest.mark.slow
def test_a_search_runs_trials_as_tracked_runs_and_resumes(tmp_path: Path, store_uri: str) -> None:
    result = run_train([*SEARCH_ARGS, "hydra.sweeper.n_trials=4"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = all_runs(store_uri)
    parent = next(r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP)
    study = parent.data.tags[STUDY_TAG]
    assert study == "size-digits-lenet5-seed0"
    trials = [r for r in runs if r.data.tags.get(STUDY_TAG) == study and r.info.run_id != parent.info.run_id]
    table = trials_csv(store_uri, parent.info.run_id)
    assert table["trial"].tolist() == [0, 1, 2, 3] and (table["state"] == "COMPLETE").all()
    # every trial is a run tagged with its number, or repeats an earlier trial's overrides and reuses its run
    tagged = {int(r.data.tags[TRIAL_TAG]): r.info.run_id for r in trials}
    assert set(tagged) <= {0, 1, 2, 3} and 0 in tagged
    assert set(table["run_id"]) == set(tagged.values())
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    assert {r.data.tags["method"] for r in trials} <= {"lowbit", "cluster"}
    # the baseline the first trial trained is a run of the sweep, not a trial
    assert any(r.data.tags["method"] == "baseline" and TRIAL_TAG not in r.data.tags for r in runs)
    for run in trials:  # energy, named as estimates, and the tag that says why there is no measurement
        assert run.data.metrics[ENERGY_J_PER_IMAGE_ESTIMATE] > 0 and run.data.metrics[ENERGY_TRAIN_KJ_ESTIMATE] > 0
        assert run.data.tags[ENERGY_SOURCE_TAG]
    # the study beside the store; the front and its figure on the parent run
    assert (Path(store_uri.removeprefix("sqlite:///")).parent / STUDY_DB).exists()
    assert json.loads((tmp_path / "sweep" / SEARCH_FILE).read_text()) == {STUDY_TAG: study}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store_uri)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)} | {
        a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {SEARCH_TRIALS_ARTIFACT, figure_artifact("search_front")} <= logged
    assert "Pareto front within acc_drop <= 0.5" in result.stdout
    assert client.get_run(parent.info.run_id).data.tags.get(WINNER_RUN_TAG) or "no trial within the budget" in result.stdout

    # relaunched with a larger n_trials: the same study and parent run go on from trial 4
    again = run_train([*SEARCH_ARGS, "hydra.sweeper.n_trials=5"], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = all_runs(store_uri)
    assert sum(r.data.tags.get(ROLE_TAG) == ROLE_SWEEP for r in runs) == 1
    assert trials_csv(store_uri, parent.info.run_id)["trial"].tolist() == [0, 1, 2, 3, 4]


# runs that log their MLflow model (a search's winner can be registered) and train on every batch of digits for
# 3 baseline epochs: far enough from chance for the registry to take them
LOGGED = [*(o for o in FAST_SHIPPED if not o.startswith(("baseline.epochs", "trainer.limit_train_batches"))),
          "baseline.epochs=3", "++hardware.export_onnx=false", "tracking.claim_settle_s=0"]


@pytest.mark.slow
def test_a_search_starts_from_the_stores_runs_of_its_space(tmp_path: Path, store_uri: str) -> None:
    # a plain run at cluster's shipped defaults (4 bits, 2 epochs: a point of conf/search/cluster.yaml), and one
    # at a recipe the space cannot express
    assert run_train([*LOGGED, "method=cluster"], tmp_path).returncode == 0
    assert run_train([*LOGGED, "method=cluster", "method.fine_tune.optimizer.lr=0.01"], tmp_path).returncode == 0
    shipped = [r.info.run_id for r in all_runs(store_uri)
               if r.data.tags.get("method") == "cluster" and r.data.params["method.fine_tune.optimizer.lr"] != "0.01"]
    result = run_train(["-m", "experiment=search_size", "search@hydra.sweeper.space=[lowbit,cluster]", *LOGGED,
                        "hydra.sweeper.n_trials=1", "hydra.sweeper.sampler=random", "hydra.sweeper.register_as=digits-small"],
                       tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = " ".join(result.stdout.split())
    assert "warm start: 1 runs of the store are points of the space, 1 joined the study now" in printed
    assert "its config differs at 1 keys: method.fine_tune.optimizer.lr 0.01" in printed
    parent = next(r for r in all_runs(store_uri) if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP)
    table = trials_csv(store_uri, parent.info.run_id)
    seeded = table[table["seeded"]]
    assert seeded["run_id"].tolist() == shipped
    assert seeded["knobs"].tolist() == ["method.bits=4 method.fine_tune.epochs=2"]
    assert (~table["seeded"]).sum() == 1  # n_trials=1: one trial run beside the seed
    # the winner within the budget (a trial run or a seed: the study's best), registered with how it was chosen
    from mlflow.tracking import MlflowClient

    winner = MlflowClient(store_uri).get_run(parent.info.run_id).data.tags[WINNER_RUN_TAG]
    (version,) = MlflowClient(store_uri).search_model_versions("name = 'digits-small'")
    assert version.run_id == winner and version.tags["objective"] == "search"
    assert "the winner of search study size-digits-lenet5-seed0" in version.description
    assert f"as digits-small version 1: models:/digits-small/1" in printed


def trials_csv(uri: str, run_id: str) -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, SEARCH_TRIALS_ARTIFACT)
    return pd.read_csv(path)


def test_a_bad_search_stops_before_any_run(tmp_path: Path, store_uri: str) -> None:
    result = run_train([*SEARCH_ARGS, "hydra.sweeper.objectives=[acc_drop,size_kb]"], tmp_path)
    assert result.returncode == 2
    assert "'size_kb' is not a metric every run logs" in result.stderr and "Nothing was run." in result.stderr
    assert not [r for r in all_runs(store_uri) if r.data.tags.get(ROLE_TAG) != ROLE_SWEEP]


# the space of lowbit and cluster (conf/search/), with knobs that fail for sure: every lowbit model counts as
# collapsed (within 95 points of chance), every cluster fine-tune diverges at once (Adam at lr 1e30: a
# non-finite loss at its second step). Set on the command line: the sweep checks jobs without hydra.searchpath
FAILING_SPACE = [
    "search@hydra.sweeper.space=[lowbit,cluster]",
    "++hydra.sweeper.space.lowbit={method.bits: 'choice(3, 4, 6)', run_checks.chance_margin: 95.0}",
    "++hydra.sweeper.space.cluster={method.bits: 'choice(3, 4, 5)', method.fine_tune.optimizer.lr: 1.0e30}",
]


@pytest.mark.slow
def test_failed_trials_are_recorded_and_the_search_exits_1(tmp_path: Path, store_uri: str) -> None:
    # the baseline first, as its own run: the trials find it in the store, none of their knobs touch it
    assert run_train([*FAST, "method=baseline"], tmp_path).returncode == 0
    # the random sampler at seed 2 picks lowbit (collapsed), then cluster twice (crashed)
    result = run_train(["-m", "experiment=search_size", *FAST, *FAILING_SPACE, "hydra.sweeper.sampler=random",
                        "hydra.sweeper.seed=2", "hydra.sweeper.n_trials=3"], tmp_path)

    # the search completed (every trial told, the front reported), then exits 1 as a grid with a FAILED run does
    assert result.returncode == 1, result.stderr[-3000:]
    printed = " ".join(result.stdout.split())  # rich wraps long lines
    assert "Pareto front within acc_drop <= 0.5 (0 of 3 trials within the budget)" in printed
    assert "no trial within the budget" in printed and "3 of 3 trials failed" in printed
    assert "trial 0 lowbit method.bits=" in printed and "collapsed: test_acc" in printed
    assert "runs FAILED; their errors are in the runs' `error` tag" in result.stderr
    runs = all_runs(store_uri)
    parent = next(r for r in runs if r.data.tags.get(ROLE_TAG) == ROLE_SWEEP)
    assert parent.info.status == "FAILED" and WINNER_RUN_TAG not in parent.data.tags
    table = trials_csv(store_uri, parent.info.run_id)
    assert table["trial"].tolist() == [0, 1, 2] and not table["on_front"].any() and not table["feasible"].any()
    assert (table["run_status"] == "FAILED").all()
    collapsed, crashed = table[table["method"] == "lowbit"], table[table["method"] == "cluster"]
    assert collapsed["trial"].tolist() == [0] and crashed["trial"].tolist() == [1, 2]
    # a collapsed run logged its figures: a COMPLETE trial, infeasible; a crashed one has none: FAIL
    assert (collapsed["state"] == "COMPLETE").all() and collapsed["acc_drop"].notna().all()
    assert collapsed["error"].str.startswith("collapsed: test_acc").all()
    assert (crashed["state"] == "FAIL").all() and crashed["error"].str.contains("non-finite loss").all()
    trial_runs = [r for r in runs if r.data.tags.get(TRIAL_TAG) is not None]
    assert trial_runs and all(r.info.status == "FAILED" and r.data.tags[ERROR_TAG] for r in trial_runs)
    assert set(table["run_id"]) == {r.info.run_id for r in trial_runs}

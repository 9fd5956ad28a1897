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
    ENERGY_J_PER_IMAGE_ESTIMATE, ENERGY_SOURCE_TAG, ENERGY_TRAIN_KJ_ESTIMATE, ROLE_SWEEP, ROLE_TAG, SEARCH_FILE,
    SEARCH_TRIALS_ARTIFACT, STUDY_DB, STUDY_TAG, TRIAL_TAG, WINNER_RUN_TAG, figure_artifact,
)
from lightning_modules.search import Knob, Objectives, SearchSettings, parse_knob
from lightning_modules.tracking import Store
from tests.conftest import FAST, all_runs, run_train

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


def trials_csv(uri: str, run_id: str) -> pd.DataFrame:
    from mlflow.tracking import MlflowClient

    path = MlflowClient(uri).download_artifacts(run_id, SEARCH_TRIALS_ARTIFACT)
    return pd.read_csv(path)


def test_a_bad_search_stops_before_any_run(tmp_path: Path, store_uri: str) -> None:
    result = run_train([*SEARCH_ARGS, "hydra.sweeper.objectives=[acc_drop,size_kb]"], tmp_path)
    assert result.returncode == 2
    assert "'size_kb' is not a metric every run logs" in result.stderr and "Nothing was run." in result.stderr
    assert not [r for r in all_runs(store_uri) if r.data.tags.get(ROLE_TAG) != ROLE_SWEEP]

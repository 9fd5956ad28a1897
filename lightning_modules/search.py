"""A search across methods: an Optuna study whose trials are ordinary runs of the workbench.

`python train.py -m experiment=search_size` (or `search_latency`) asks Optuna, trial after trial, for a
method (a categorical choice among the families and hybrids of `hydra.sweeper.space`) and that
method's knobs (conditional on it), launches the run with those overrides like any sweep job, and
tells the study the run's objectives (accuracy drop against size, or against latency at a batch size)
with the accuracy budget as a constraint: a trial over it is infeasible, kept and known to the sampler,
never the winner. The study lives in its own SQLite file beside the MLflow store (`optuna.db` next to
`mlflow.db`), so a killed search relaunched with the same study name resumes where it stopped.

    space           `parse_space`: conf/search/<method>.yaml in Hydra's override grammar
    a trial         `suggest_overrides` -> the launcher runs it -> `trial_outcome` from the store -> `tell`
                    (a FAILED run: infeasible, or a failed trial; never on the front; `failure_lines` say why)
    the study       `open_study` (storage beside the store, sampler with the constraint), `resume_interrupted`
    warm start      `store_seeds` (the store's runs that are points of the space: `seed_from_run`), `seed_study`
                    (told as trials that cost nothing and count toward no n_trials)
    the end         `trials_table`, `pareto`, `hypervolume_2d`, `winner`, `front_figure`, `report_study`,
                    `register_winner` (hydra.sweeper.register_as)
    against a grid  `compare_fronts` (two sets of runs), `study_against_grid` (a study of the store against the
                    grid's runs: the grid notebook's last section, scripts/benchmark_search.py)

The Hydra side (a Sweeper plugin) is hydra_plugins/workbench_optuna_sweeper: it only wires this module
to Hydra's launcher. Optuna is imported inside the functions that need it: the jobs import this module
for `STUDY_TAG`-style names only.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from lightning_modules.contract import (
    ACC_DROP, ACC_DROP_CI95_HIGH, BASELINE_METHOD, BASELINE_SIZE_BYTES, DATA_TAG, ERROR_TAG, HYPERVOLUME, METHOD_TAG,
    MODEL_TAG, SEARCH_BUDGET_TAG, SEARCH_FILE, SEARCH_FRONT, SEARCH_TRIALS_ARTIFACT, SEED_TAG, SIZE_BYTES, STUDY_DB,
    STUDY_TAG, TRIAL_TAG, WINNER_RUN_TAG, WINNER_TRIAL_TAG, baseline_metric, figure_artifact, sqlite_path,
)
from lightning_modules.liveness import end_killed

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

    from lightning_modules.tracking import Store

log = logging.getLogger(__name__)

METHOD_PARAM = "method"  # the study's categorical parameter: which method (family or hybrid) a trial runs
RUN_ID_ATTR, OVERRIDES_ATTR, REUSED_ATTR = "run_id", "overrides", "same_as_trial"
RUN_STATUS_ATTR, ERROR_ATTR = "run_status", "error"  # the trial's run: its MLflow status, and why it FAILED
FAILED, FINISHED = "FAILED", "FINISHED"  # MLflow run statuses
INTERRUPTED_ATTR = "interrupted_trials"  # study attribute: trials a killed search left RUNNING (rerun, not counted)
SEEDED_ATTR = "seeded"  # trial attribute: a FINISHED run of the store told as a trial (warm start; not counted)
SAMPLERS = ("tpe", "nsgaii", "random")
DIRECTIONS = ("minimize", "maximize")


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Knob:
    """One override a trial sets for its method: searched (float, int, categorical) or fixed."""

    key: str  # the override's key, e.g. method.sparsity
    kind: str  # float | int | categorical | fixed
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        if self.kind == "float":
            return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        if self.kind == "categorical":
            return trial.suggest_categorical(name, list(self.choices))
        return self.choices[0]


def parse_knob(key: str, spec: Any) -> Knob:
    """A knob from Hydra's override grammar, as `hydra.sweeper.space` declares it:
    interval(lo, hi) a float, range(lo, hi[, step]) the integers of Python's range, choice(a, b, ...) one of them, tag(log, interval(...)) on a log scale; a plain value is set as is.

    Raises:
        ValueError: the spec does not parse, or is a sweep this search cannot sample (a float range).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{key}={spec}")
    except Exception as error:
        raise ValueError(f"hydra.sweeper.space: {key}={spec!r} does not parse as a Hydra override value "
                         f"(allowed: interval(lo, hi), range(lo, hi[, step]), choice(a, b, ...), "
                         f"tag(log, interval(lo, hi)), or a plain value): {error}") from error
    value = override.value()
    log_scale = "log" in getattr(value, "tags", set())
    if isinstance(value, IntervalSweep):
        if not value.start < value.end:
            raise ValueError(f"hydra.sweeper.space: {key}={spec!r}: interval needs lo < hi")
        return Knob(key, "float", float(value.start), float(value.end), log=log_scale)
    if isinstance(value, RangeSweep):
        numbers = (value.start, value.stop, value.step)
        if not all(float(number).is_integer() for number in numbers) or value.step <= 0:
            raise ValueError(f"hydra.sweeper.space: {key}={spec!r}: range takes whole numbers and a positive step "
                             f"(for floats: interval(lo, hi))")
        last = int(value.start) + ((int(value.stop) - 1 - int(value.start)) // int(value.step)) * int(value.step)
        return Knob(key, "int", int(value.start), last, step=int(value.step), log=log_scale)
    if isinstance(value, ChoiceSweep):
        return Knob(key, "categorical", choices=tuple(value.list))
    if override.is_sweep_override():
        raise ValueError(f"hydra.sweeper.space: {key}={spec!r}: a search samples interval, range and choice only")
    return Knob(key, "fixed", choices=(value,))


def parse_space(space: Mapping[str, Mapping[str, Any] | None]) -> dict[str, list[Knob]]:
    """{method: its knobs} from `hydra.sweeper.space` (conf/search/<method>.yaml, one method each).

    Raises:
        ValueError: an empty space, or a knob that does not parse (parse_knob).
    """
    if not space:
        raise ValueError("hydra.sweeper.space is empty: pick methods, e.g. experiment=search_size "
                         "or 'search@hydra.sweeper.space=[agp,lowbit]' (files in conf/search/)")
    return {str(method): [parse_knob(str(key), spec) for key, spec in (knobs or {}).items()]
            for method, knobs in space.items()}


def format_value(value: Any) -> str:
    """An override's value as Hydra reads it back: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "null" if value is None else str(value)


def suggest_overrides(trial: optuna.Trial, space: Mapping[str, list[Knob]]) -> list[str]:
    """The trial's method, then its own knobs (named `<method>:<key>` in the study: each method's
    distributions are its own, so the space is conditional on the method)."""
    method = trial.suggest_categorical(METHOD_PARAM, list(space))
    overrides = [f"method={method}"]
    for knob in space[method]:
        overrides.append(f"{knob.key}={format_value(knob.suggest(trial, f'{method}:{knob.key}'))}")
    return overrides


# ----------------------------------------------------------------------------- objectives and the constraint


@dataclass(frozen=True)
class Objectives:
    """What a trial is judged by: metrics to minimise (or maximise), and `constraint <= budget`."""

    metrics: tuple[str, ...]
    directions: tuple[str, ...]
    constraint: str = ACC_DROP
    budget: float = 0.5

    def __post_init__(self) -> None:
        if len(self.metrics) != len(self.directions) or not self.metrics:
            raise ValueError(f"hydra.sweeper.objectives={list(self.metrics)} and directions={list(self.directions)}: "
                             "one direction per objective, at least one objective")
        for direction in self.directions:
            if direction not in DIRECTIONS:
                raise ValueError(f"hydra.sweeper.directions: {direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not math.isfinite(self.budget):
            raise ValueError(f"hydra.sweeper.budget={self.budget}: a finite number of points")

    def values(self, metrics: Mapping[str, float]) -> list[float] | None:
        """The objectives of a run's metrics; None when one is missing or not a number."""
        found = [metrics.get(name) for name in self.metrics]
        if any(value is None or not math.isfinite(value) for value in found):
            return None
        return [float(value) for value in found]

    def violation(self, metrics: Mapping[str, float]) -> float:
        """constraint - budget: <= 0 is feasible; a run without the metric is infeasible (inf)."""
        value = metrics.get(self.constraint)
        return float(value) - self.budget if value is not None and math.isfinite(value) else math.inf


def trial_violation(trial: optuna.trial.FrozenTrial) -> float:
    """The violation a trial was told with (Trial.set_constraint; <= 0 feasible); inf when it has none."""
    return max(trial.constraints.values(), default=math.inf)


# ----------------------------------------------------------------------------- the study


def study_storage(storage: str | None, tracking_uri: str) -> str:
    """Where the study lives: `storage` when given (any Optuna RDB URL), else optuna.db beside the
    SQLite file of the MLflow store, so that the study and its runs travel together.

    Raises:
        ValueError: no storage given and the store is a server (no folder to put the file in).
    """
    if storage:
        return storage
    database = sqlite_path(tracking_uri)
    if database is None:
        raise ValueError(f"hydra.sweeper.storage=null needs a local store to sit beside; the store is "
                         f"{tracking_uri}: give an Optuna storage URL (e.g. the server's PostgreSQL)")
    return f"sqlite:///{database.parent / STUDY_DB}"


def make_sampler(name: str, seed: int | None, startup_trials: int) -> optuna.samplers.BaseSampler:
    """tpe (multivariate, grouped by method: fits a conditional space), nsgaii, or random. Optuna 5's
    samplers read each trial's constraint (Trial.set_constraint): tpe and nsgaii keep infeasible trials
    and rank them behind the feasible ones.

    Raises:
        ValueError: an unknown sampler name.
    """
    import optuna

    if name == "tpe":
        with warnings.catch_warnings():  # multivariate/group are marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup_trials)
    if name == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"hydra.sweeper.sampler={name!r}: allowed {', '.join(SAMPLERS)}")


def open_study(name: str, storage: str, objectives: Objectives, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """The study `name` in `storage`, created or loaded (a relaunch resumes it).

    Raises:
        ValueError: the stored study has other directions (another search under the same name).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, load_if_exists=True,
                                directions=list(objectives.directions))
    stored = study.user_attrs.get("objectives")
    if stored is None:
        study.set_user_attr("objectives", list(objectives.metrics))
        study.set_user_attr("constraint", [objectives.constraint, objectives.budget])
    elif stored != list(objectives.metrics):
        raise ValueError(f"hydra.sweeper.study={name!r} exists in {storage} with objectives {stored}, not "
                         f"{list(objectives.metrics)}: give another study name")
    return study


def resume_interrupted(study: optuna.Study, store: Store | None = None) -> list[int]:
    """Trials left RUNNING by a killed search: each is marked FAIL and its parameters queued again, so
    the relaunch runs it first; its MLflow run, left RUNNING, is marked KILLED. Returns their numbers."""
    import optuna

    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if stale:  # they do not count toward n_trials: their rerun does
        study.set_user_attr(INTERRUPTED_ATTR, [*study.user_attrs.get(INTERRUPTED_ATTR, []), *(t.number for t in stale)])
    for trial in stale:
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
        if store is not None:
            for run in trial_runs(store, study.study_name, trial.number):
                if run.info.status == "RUNNING":
                    end_killed(store, run.info.run_id, f"trial {trial.number} was interrupted with its search; "
                                                       "queued again when the search resumed")
        log.info("trial %d was interrupted: queued again with its parameters", trial.number)
    return [trial.number for trial in stale]


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward n_trials: told COMPLETE or FAIL, those a killed search left (and queued
    again) and the store's runs it started from (seed_study) left out."""
    import optuna

    done = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    return sum(1 for trial in study.get_trials(deepcopy=False, states=done)
               if trial.number not in interrupted and not trial.user_attrs.get(SEEDED_ATTR))


# ----------------------------------------------------------------------------- the store's runs as trials (warm start)


@dataclass(frozen=True)
class Seed:
    """A run of the store that is a point of the space: what a trial with `params` would have run."""

    run_id: str
    params: dict[str, Any]  # the study's parameters: METHOD_PARAM, then `<method>:<key>` per searched knob
    overrides: list[str]  # as suggest_overrides writes them
    metrics: dict[str, float]


SHOWN_LEFT_OUT = 5  # the runs left out of a warm start the log names (a store of older runs can hold hundreds)
ComposeParams = Callable[[list[str]], Mapping[str, Any]]  # overrides -> the run's config flattened (config_params)


def knob_distribution(knob: Knob) -> optuna.distributions.BaseDistribution | None:
    """The distribution `Knob.suggest` samples from; None for a fixed knob (no parameter of the study)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if knob.kind == "float":
        return FloatDistribution(knob.low, knob.high, log=knob.log, step=knob.step)
    if knob.kind == "int":
        return IntDistribution(int(knob.low), int(knob.high), log=knob.log, step=int(knob.step or 1))
    if knob.kind == "categorical":
        return CategoricalDistribution(list(knob.choices))
    return None


def knob_value(knob: Knob, logged: str | None) -> Any:
    """The knob's value in a run's logged param (a string), as the study holds it.

    Raises:
        ValueError: the run has no such param, or its value lies outside the knob's distribution.
    """
    if logged is None:
        raise ValueError(f"no param {knob.key.lstrip('+')}")
    if knob.kind in ("categorical", "fixed"):
        for choice in knob.choices:
            if logged in (str(choice), format_value(choice)):
                return choice
        raise ValueError(f"{knob.key.lstrip('+')}={logged} is not one of {list(knob.choices)}")
    number = float(logged)
    value = int(number) if knob.kind == "int" and number.is_integer() else number
    distribution = knob_distribution(knob)
    if not distribution._contains(distribution.to_internal_repr(value)):  # noqa: SLF001 - Optuna's own check
        raise ValueError(f"{knob.key.lstrip('+')}={logged} lies outside [{knob.low:g}, {knob.high:g}]"
                         + (f" step {knob.step:g}" if knob.step else ""))
    return value


def seed_from_run(run: Any, space: Mapping[str, list[Knob]], compose_params: ComposeParams) -> Seed:
    """The point of the space a FINISHED run of the store is, if its whole config is what a trial at that
    point would run (every param but those that never change what a run measures: analysis.is_noise_param).

    Raises:
        ValueError: why the run is no point of the space (another method, a knob outside it, a config that
            differs: another recipe, older code's defaults, a command-line override the search lacks).
    """
    method = run.data.tags.get(METHOD_TAG)
    if method not in space:
        raise ValueError(f"method {method} is not in the space")
    params: dict[str, Any] = {METHOD_PARAM: method}
    overrides = [f"method={method}"]
    for knob in space[method]:
        value = knob_value(knob, run.data.params.get(knob.key.lstrip("+")))
        overrides.append(f"{knob.key}={format_value(value)}")
        if knob.kind != "fixed":
            params[f"{method}:{knob.key}"] = value
    from lightning_modules.analysis import is_noise_param  # (analysis imports this module)

    expected = {key: str(value)[:6000] for key, value in compose_params(overrides).items()}
    logged = run.data.params
    differ = sorted(key for key in expected.keys() | logged.keys()
                    if not is_noise_param(key) and expected.get(key) != logged.get(key))
    if differ:
        shown = ", ".join(f"{key} {logged.get(key, '(unset)')} (a trial: {expected.get(key, '(unset)')})"
                          for key in differ[:3])
        raise ValueError(f"its config differs at {len(differ)} keys: {shown}")
    return Seed(run.info.run_id, params, overrides, dict(run.data.metrics))


def store_seeds(store: Store, space: Mapping[str, list[Knob]], compose_params: ComposeParams) -> tuple[list[Seed], dict[str, str]]:
    """The FINISHED runs of the store (not trials of a search) of the search's data, model and seed that are points of its space (`seed_from_run`), and why each other candidate is not ({run id: reason})."""
    from lightning_modules.analysis import search_all

    base = compose_params([])
    # not the hardware: a method may pick its own (qat runs on cpu_ort); seed_from_run compares hardware.*
    where = {DATA_TAG: base["data.name"], MODEL_TAG: base["model.name"], SEED_TAG: base["seed"]}
    filter_string = " and ".join([*(f"tags.{tag} = '{value}'" for tag, value in where.items()),
                                  "attributes.status = 'FINISHED'"])
    seeds, left_out = [], {}
    for run in search_all(store.client, [store.experiment_id], filter_string):
        if run.data.tags.get(STUDY_TAG) or run.data.tags.get(METHOD_TAG) not in space:
            continue  # a search's trial (of this study or another), a baseline, a method outside the space
        try:
            seeds.append(seed_from_run(run, space, compose_params))
        except ValueError as reason:
            left_out[run.info.run_id] = f"{run.data.tags.get('mlflow.runName', run.info.run_id)}: {reason}"
    return seeds, left_out


def seed_study(study: optuna.Study, seeds: Sequence[Seed], space: Mapping[str, list[Knob]],
               objectives: Objectives) -> list[int]:
    """Each seed not in the study yet becomes a COMPLETE trial (its objectives, its constraint, its run),
    marked SEEDED_ATTR: the sampler starts from what the store knows; n_trials counts the trials run.
    Returns the numbers of the trials added."""
    import optuna

    known = {t.user_attrs.get(RUN_ID_ATTR) for t in study.get_trials(deepcopy=False) if t.user_attrs.get(SEEDED_ATTR)}
    added = []
    for seed in seeds:
        values = objectives.values(seed.metrics)
        if seed.run_id in known or values is None:
            continue
        method = seed.params[METHOD_PARAM]
        distributions = {METHOD_PARAM: optuna.distributions.CategoricalDistribution(list(space))}
        distributions.update({f"{method}:{knob.key}": knob_distribution(knob) for knob in space[method]
                              if knob.kind != "fixed"})
        study.add_trial(optuna.trial.create_trial(
            params=seed.params, distributions=distributions, values=values,
            constraints={objectives.constraint: objectives.violation(seed.metrics)},
            user_attrs={RUN_ID_ATTR: seed.run_id, RUN_STATUS_ATTR: FINISHED, OVERRIDES_ATTR: seed.overrides,
                        SEEDED_ATTR: True}))
        added.append(study.get_trials(deepcopy=False)[-1].number)
    return added


# ----------------------------------------------------------------------------- a trial's outcome


def write_search_file(sweep_dir: str | Path, study: str) -> None:
    """Tell the sweep's jobs which study they are trials of (sweep.trial_tags reads it)."""
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    (Path(sweep_dir) / SEARCH_FILE).write_text(json.dumps({STUDY_TAG: study}))


def trial_runs(store: Store, study: str, number: int) -> list:
    """The runs tagged as this trial of the study, newest first."""
    return store.client.search_runs([store.experiment_id],
                                    filter_string=f"tags.{STUDY_TAG} = '{study}' and tags.{TRIAL_TAG} = '{number}'",
                                    order_by=["attributes.start_time DESC"], max_results=10)


@dataclass
class Outcome:
    """What a trial's run left in the store: its metrics (a collapsed run's too), run id, status and,
    for a FAILED run, why (its `error` tag)."""

    run_id: str | None
    status: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


def trial_outcome(store: Store, study: str, number: int, job: Any = None) -> Outcome:
    """The run of trial `number` as the store has it; else what the job returned (a job skipped as
    already FINISHED in this sweep returns that run's metrics); a job that returned nothing and left
    no run (it stopped before opening one) gets a FAILED run recorded here (`record_lost_trial`)."""
    runs = trial_runs(store, study, number)
    if runs:
        run = runs[0]
        return Outcome(run.info.run_id, run.info.status, dict(run.data.metrics), run.data.tags.get(ERROR_TAG))
    returned = _return_value(job)
    if isinstance(returned, Mapping):
        return Outcome(None, None, dict(returned))
    return record_lost_trial(store, study, number, job)


def record_lost_trial(store: Store, study: str, number: int, job: Any) -> Outcome:
    """A FAILED run for a trial whose job left none (refused by the run's own checks, or stopped before
    its run opened), under the sweep's parent run with the trial's tags: the trial is counted, and the
    search ends with the exit status of a sweep with a FAILED run. Its reason points at the job's log."""
    from omegaconf import OmegaConf

    from lightning_modules.tracking import TrackedRun, open_run, read_sweep_info, record_failure, run_name, run_tags

    hydra_cfg, cfg = getattr(job, "hydra_cfg", None), getattr(job, "cfg", None)
    folder = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir", default=None) if hydra_cfg is not None else None
    error = f"the job of trial {number} recorded no run and returned no metrics" + (
        f" (its log: {folder})" if folder else "")
    sweep_dir = OmegaConf.select(hydra_cfg, "hydra.sweep.dir", default=None) if hydra_cfg is not None else None
    sweep = read_sweep_info(sweep_dir) if sweep_dir is not None else None
    if cfg is None or sweep is None:
        return Outcome(None, FAILED, {}, error)
    tags = {**run_tags(cfg, sweep.name), STUDY_TAG: study, TRIAL_TAG: str(number)}
    run: TrackedRun = open_run(store, run_name(cfg), tags, sweep.parent_run_id)
    record_failure(run, RuntimeError(error))
    return Outcome(run.run_id, FAILED, {}, f"RuntimeError: {error}")


def tell(study: optuna.Study, trial: optuna.Trial, objectives: Objectives, outcome: Outcome) -> None:
    """Record the outcome: COMPLETE with its objectives and constraint when the run measured them, else
    FAIL. A run that ended FAILED (a collapsed model logs its figures first) is COMPLETE when it has
    its objectives, so the sampler learns that region, but infeasible whatever its drop: never on the
    front, never the winner. The run's status and error go on the trial."""
    import optuna

    trial.set_user_attr(RUN_ID_ATTR, outcome.run_id)
    trial.set_user_attr(RUN_STATUS_ATTR, outcome.status)
    if outcome.error is not None:
        trial.set_user_attr(ERROR_ATTR, outcome.error[:500])
    values = objectives.values(outcome.metrics)
    violation = math.inf if outcome.status == FAILED else objectives.violation(outcome.metrics)
    trial.set_constraint(objectives.constraint, violation)
    if outcome.status == FAILED:
        log.warning("trial %d: its run FAILED (%s): recorded %s", trial.number, outcome.error or "no reason given",
                    "as infeasible" if values is not None else "as a failed trial")
    if values is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, values)


def same_trial(study: optuna.Study, overrides: list[str]) -> optuna.trial.FrozenTrial | None:
    """An earlier COMPLETE trial with these very overrides (a repeated suggestion reuses its run)."""
    import optuna

    for done in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if done.user_attrs.get(OVERRIDES_ATTR) == overrides:
            return done
    return None


Launch = Callable[[list[list[str]], int], Sequence[Any]]  # (job overrides, first job number) -> job returns


@dataclass
class SearchSettings:
    study: str
    storage: str
    space: dict[str, list[Knob]]
    objectives: Objectives
    n_trials: int
    n_jobs: int = 1
    sampler: str = "tpe"
    seed: int | None = 0
    startup_trials: int = 5
    warm_start: bool = True


def run_search(settings: SearchSettings, base_overrides: list[str], launch: Launch, store: Store,
               compose_params: ComposeParams | None = None,
               progress: Callable[[optuna.Study], None] | None = None) -> optuna.Study:
    """Ask, launch, tell until the study holds n_trials finished trials (a relaunch counts the earlier ones).
    With warm_start (and `compose_params`), the store's runs that are points of the space join the study
    first, as trials that cost nothing and count toward nothing (warm_start_study). `progress` is called
    after the warm start and after each batch of trials (the sweeper logs the trials table)."""
    sampler = make_sampler(settings.sampler, settings.seed, settings.startup_trials)
    study = open_study(settings.study, settings.storage, settings.objectives, sampler)
    resume_interrupted(study, store)
    if settings.warm_start and compose_params is not None:
        warm_start_study(study, settings, store, compose_params)
    if progress is not None:
        progress(study)
    while (done := finished_trials(study)) < settings.n_trials:
        trials = [study.ask() for _ in range(min(settings.n_jobs, settings.n_trials - done))]
        to_launch = []
        for trial in trials:
            overrides = suggest_overrides(trial, settings.space)
            trial.set_user_attr(OVERRIDES_ATTR, overrides)
            earlier = same_trial(study, overrides)
            if earlier is not None:  # nothing to train: the same run again
                trial.set_user_attr(REUSED_ATTR, earlier.number)
                trial.set_constraint(settings.objectives.constraint, trial_violation(earlier))
                for attr in (RUN_ID_ATTR, RUN_STATUS_ATTR, ERROR_ATTR):
                    if attr in earlier.user_attrs:
                        trial.set_user_attr(attr, earlier.user_attrs[attr])
                study.tell(trial, earlier.values)
                log.info("trial %d: %s repeats trial %d, its run reused", trial.number, " ".join(overrides), earlier.number)
            else:
                to_launch.append((trial, overrides))
        if not to_launch:
            continue
        # job numbers are trial numbers: the job's run is tagged trial=<its hydra.job.num>
        first = to_launch[0][0].number
        if [trial.number for trial, _ in to_launch] != list(range(first, first + len(to_launch))):
            raise RuntimeError("trial numbers of one batch are not consecutive: another process writes to the study")
        returns = launch([[*base_overrides, *overrides] for _, overrides in to_launch], first)
        for (trial, overrides), job in zip(to_launch, returns):
            outcome = trial_outcome(store, settings.study, trial.number, job)
            tell(study, trial, settings.objectives, outcome)
            log.info("trial %d: %s -> %s", trial.number, " ".join(overrides),
                     {name: outcome.metrics.get(name) for name in settings.objectives.metrics})
        if progress is not None:
            progress(study)
    return study


def warm_start_study(study: optuna.Study, settings: SearchSettings, store: Store, compose_params: ComposeParams) -> list[int]:
    """Seed the study with the store's runs that are points of its space; log what joined and why others did not."""
    seeds, left_out = store_seeds(store, settings.space, compose_params)
    added = seed_study(study, seeds, settings.space, settings.objectives)
    log.info("warm start: %d runs of the store are points of the space, %d joined the study now as trials %s "
             "(they count toward no n_trials)", len(seeds), len(added), added)
    for reason in list(left_out.values())[:SHOWN_LEFT_OUT]:
        log.info("warm start: not a point of the space: %s", reason)
    if len(left_out) > SHOWN_LEFT_OUT:
        log.info("warm start: %d more runs of the same data, model and seed are not points of the space",
                 len(left_out) - SHOWN_LEFT_OUT)
    return added


def _return_value(job: Any) -> Any:
    try:
        return job.return_value  # a Hydra JobReturn re-raises the job's exception here
    except Exception:
        return None


# ----------------------------------------------------------------------------- the end: front, winner, figure


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per finished trial: number, state, run id, method, its knobs (as overrides), the
    objectives, the violation, feasible, and whether it is on the feasible Pareto front."""
    import optuna

    metrics = list(study.user_attrs.get("objectives", []))
    rows = []
    interrupted = set(study.user_attrs.get(INTERRUPTED_ATTR, []))
    for trial in study.get_trials(deepcopy=False):
        if trial.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL) or trial.number in interrupted:
            continue
        overrides = trial.user_attrs.get(OVERRIDES_ATTR, [])
        violation = trial_violation(trial)
        row = {"trial": trial.number, "state": trial.state.name, "run_id": trial.user_attrs.get(RUN_ID_ATTR),
               "run_status": trial.user_attrs.get(RUN_STATUS_ATTR), "error": trial.user_attrs.get(ERROR_ATTR),
               "method": trial.params.get(METHOD_PARAM), "knobs": " ".join(o for o in overrides if not o.startswith("method=")),
               "feasible": trial.state == optuna.trial.TrialState.COMPLETE and violation <= 0, "violation": violation,
               "seeded": bool(trial.user_attrs.get(SEEDED_ATTR))}
        row.update({name: (trial.values[i] if trial.values else math.nan) for i, name in enumerate(metrics)})
        rows.append(row)
    table = pd.DataFrame(rows, columns=["trial", "state", "run_id", "run_status", "method", "knobs", *metrics, "violation",
                                        "feasible", "seeded", "error"])
    table["feasible"] = table["feasible"].astype(bool)  # an empty object column would select columns, not rows
    table["on_front"] = pareto(table, metrics, [direction.name.lower() for direction in study.directions])
    return table


def pareto(table: pd.DataFrame, metrics: Sequence[str], directions: Sequence[str], feasible_only: bool = True) -> pd.Series:
    """Rows no other (feasible) row beats on every objective (at least as good on all, better on one)."""
    candidates = table[table["feasible"]] if feasible_only and "feasible" in table else table
    candidates = candidates.dropna(subset=list(metrics))
    signs = [1.0 if direction == "minimize" else -1.0 for direction in directions]
    points = [tuple(sign * row[m] for sign, m in zip(signs, metrics)) for _, row in candidates.iterrows()]
    on_front = pd.Series(False, index=table.index)
    for index, point in zip(candidates.index, points):
        dominated = any(all(o <= p for o, p in zip(other, point)) and other != point for other in points)
        on_front[index] = not dominated
    return on_front


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area both objectives (minimised) dominate between the points and `reference`; points not
    better than the reference on both count nothing."""
    inside = sorted({p for p in points if p[0] < reference[0] and p[1] < reference[1]})
    area, best_y = 0.0, reference[1]
    for x, y in inside:  # by the first objective, ascending: each point adds its strip below the last best
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area


# The log-size box spans 1x to 100x smaller than the baseline: Deep Compression reaches 40-50x on the LeNets.
LOG_SIZE_DECADES = 2.0


def _size_share(value: float, reference: float, log_decades: float | None) -> float:
    """A size (or latency) as a share of the box's height: value / reference, or with `log_decades` its
    log10 over that many decades (1.0 at the reference, 0.0 at reference / 10**log_decades and below)."""
    share = value / reference
    if log_decades is None:
        return share
    return 1.0 + max(math.log10(share), -log_decades) / log_decades if share > 0 else 0.0


def front_hypervolume(table: pd.DataFrame, metrics: Sequence[str], budget: float, reference_size: float,
                      log_decades: float | None = None) -> float:
    """Hypervolume of the feasible points of (drop, second objective / reference_size), from the
    reference (budget, 1.0): the share of 'within budget and no larger (slower) than the baseline' covered.
    Accuracy gains (negative drops) count down to -budget (the box is 2 x budget wide). With `log_decades`
    the second axis is log10 of the ratio over that many decades: on a linear axis every model past about
    10x shares the last tenth of the box, so a 40x model adds little over an 18x one; on the log axis each
    halving of the size weighs alike."""
    feasible = table[table["feasible"]].dropna(subset=list(metrics))
    points = [(max(float(row[metrics[0]]), -budget), _size_share(float(row[metrics[1]]), reference_size, log_decades))
              for _, row in feasible.iterrows()]
    return hypervolume_2d(points, (budget, 1.0)) / (2 * budget)


def winner(table: pd.DataFrame, metrics: Sequence[str]) -> pd.Series | None:
    """The feasible trial best on the second objective (smallest, fastest), the lower drop on a tie."""
    feasible = table[table["feasible"]].dropna(subset=list(metrics))
    if feasible.empty:
        return None
    return feasible.sort_values([metrics[1], metrics[0]]).iloc[0]


def front_figure(table: pd.DataFrame, metrics: Sequence[str], budget: float, title: str = "",
                 reference: pd.DataFrame | None = None, reference_label: str = "grid") -> Figure:
    """Every trial (x: first objective, the drop; y: second, log scale), infeasible ones hollow, the
    feasible front joined, the budget as a line; `reference` (another front's points) drawn beside."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.5, 4.5))
    ax = figure.subplots()
    x, y = metrics[0], metrics[1]
    feasible = table[table["feasible"]]
    ax.scatter(feasible[x], feasible[y], s=22, color="tab:blue", label="trials within the budget")
    infeasible = table[~table["feasible"]]
    ax.scatter(infeasible[x], infeasible[y], s=22, facecolors="none", edgecolors="tab:gray", label="over the budget")
    front = table[table["on_front"]].sort_values(x)
    ax.plot(front[x], front[y], "o--", color="tab:red", label="search front")
    if reference is not None and not reference.empty:
        ref = reference.sort_values(x)
        ax.plot(ref[x], ref[y], "s:", color="tab:green", label=f"{reference_label} front")
    ax.axvline(budget, color="black", linewidth=0.8, linestyle="-.", label=f"budget {budget:g}")
    shown = [table[y], *([] if reference is None else [reference[y]])]
    if any((values > 0).any() for values in shown):  # no point yet (every trial failed): a linear empty axis
        ax.set_yscale("log")
    ax.set_xlabel(f"{x} (points)")
    ax.set_ylabel(y)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def log_trials_table(table: pd.DataFrame, store: Store, parent_run_id: str) -> None:
    """The trials table (trials_table) as search_trials.csv on the parent run: the notebook and
    study_against_grid read it (which runs the study started from), during a search as after it."""
    from lightning_modules.tracking import TrackedRun

    TrackedRun(store, parent_run_id).log_table(table.to_dict("records"), SEARCH_TRIALS_ARTIFACT)


def report_study(study: optuna.Study, objectives: Objectives, store: Store, parent_run_id: str | None) -> pd.DataFrame:
    """Print the trials on the front and the winner within the budget; log the table, the figure and
    the winner's tags on the parent run. Returns the trials table."""
    from rich.console import Console
    from rich.table import Table

    from lightning_modules.tracking import TrackedRun

    metrics = list(objectives.metrics)
    table = trials_table(study)
    best = winner(table, metrics)
    console = Console(width=140)
    seeded = int(table["seeded"].sum())
    view = Table(title=f"study {study.study_name}: Pareto front within {objectives.constraint} <= {objectives.budget:g} "
                       f"({int(table['feasible'].sum())} of {len(table)} trials within the budget"
                       + (f"; {seeded} of them the store's runs it started from, `store`)" if seeded else ")"))
    columns = ["trial", "from", "method", "knobs", *metrics, "run_id"]
    for column in columns:
        view.add_column(column, justify="left" if column in ("from", "method", "knobs", "run_id") else "right")
    front = table[table["on_front"]].assign(**{"from": lambda t: t["seeded"].map({True: "store", False: "search"})})
    for _, row in front.sort_values(metrics[0]).iterrows():
        view.add_row(*[_cell(row[column]) for column in columns])
    console.print(view)
    if best is None:
        console.print(f"no trial within the budget ({objectives.constraint} <= {objectives.budget:g})", highlight=False)
    else:
        console.print(f"winner within the budget: trial {best['trial']} {best['method']} {best['knobs']}: "
                      + ", ".join(f"{m} {_cell(best[m])}" for m in metrics) + f" (run {best['run_id']})", highlight=False)
    for line in failure_lines(table):
        console.print(line, highlight=False, soft_wrap=True)
    if parent_run_id is None:
        return table
    parent = TrackedRun(store, parent_run_id)
    log_trials_table(table, store, parent_run_id)
    tags = {STUDY_TAG: study.study_name, SEARCH_BUDGET_TAG: f"{objectives.constraint} <= {objectives.budget:g}"}
    if best is not None:
        tags.update({WINNER_RUN_TAG: str(best["run_id"]), WINNER_TRIAL_TAG: str(best["trial"])})
    parent.set_tags(tags)
    reference = _baseline_figure(store, best, metrics[1])
    if reference is not None and len(metrics) == 2:
        parent.log_metrics({HYPERVOLUME: front_hypervolume(table, metrics, objectives.budget, reference)})
    try:
        figure = front_figure(table, metrics, objectives.budget, f"study {study.study_name}")
        store.client.log_figure(parent_run_id, figure, figure_artifact(SEARCH_FRONT), save_kwargs={"dpi": 100})
    except Exception as error:  # noqa: BLE001 - a figure is a convenience: the table and tags are logged already
        log.warning("search front figure not logged: %s", error)
    return table


def register_winner(table: pd.DataFrame, objectives: Objectives, store: Store, study: str, name: str) -> str:
    """The winner within the budget (`winner`), registered as a new version of `name` in the Model Registry the
    way scripts/register_best.py registers a grid's best (registry.register: the run's logged pyfunc model, its
    figures as tags, how each was measured); a winner that cannot be (no logged model, at chance) gives way to the
    next trial in the same order, and the version says so. Returns the line the search prints."""
    from lightning_modules import registry
    from lightning_modules.analysis import tidy_runs

    metrics = list(objectives.metrics)
    feasible = table[table["feasible"]].dropna(subset=[*metrics, "run_id"]).sort_values([metrics[1], metrics[0]])
    goal = registry.Objective("search", metrics[1], False, f"the winner of search study {study} (the lowest "
                              f"{metrics[1]} within the budget, the lower {metrics[0]} on a tie)")
    passed_over: list[str] = []
    for _, trial in feasible.iterrows():
        row = tidy_runs([store.client.get_run(str(trial["run_id"]))]).iloc[0]
        row["knobs"] = trial["knobs"]
        reason, model_id = registry.why_unusable(row, store.client, store.uri)
        if reason is not None:
            passed_over.append(f"trial {trial['trial']} {row['run_name']} ({row['run_id']}): {reason}")
            continue
        choice = registry.Choice(row, model_id, goal, objectives.budget, objectives.constraint == ACC_DROP_CI95_HIGH,
                                 None, len(feasible), passed_over)
        version = registry.register(choice, name, store.uri)
        return (f"registered trial {trial['trial']} (run {choice.run_id}) as {name} version {version.version}: "
                f"models:/{name}/{version.version}")
    return (f"nothing registered as {name}: no trial within the budget that can be registered"
            + (f" ({'; '.join(passed_over)})" if passed_over else ""))


# ----------------------------------------------------------------------------- the study against the grid


NO_STUDY_MESSAGE = ("No search study in this store: run one, e.g. `python train.py -m experiment=search_size model=lenet5 "
                    "hydra.sweeper.budget=0.5`, then run this cell again to see its front against the grid's.")
SOURCES = ("search", "grid")
FRONT_COLUMNS = ["source", "seeded", "run_name", "method", "knobs", ACC_DROP, SIZE_BYTES, "compression_ratio"]


@dataclass
class FrontComparison:
    """A study's trials and a grid's runs judged alike: within the budget (`feasible`, FINISHED runs
    only), on their own Pareto front (`on_front`), the hypervolume of each front (front_hypervolume).
    The search's set holds the store's runs it started from (column `seeded`) when compare_fronts got them."""

    study: str
    budget: float
    runs: pd.DataFrame  # both sets, column `source`: search | grid
    hypervolumes: dict[str, float]
    figure: Figure
    hypervolumes_log: dict[str, float] = field(default_factory=dict)  # size on a log axis (LOG_SIZE_DECADES)

    @property
    def ratio(self) -> float:
        """Hypervolume of the search's front over the grid's (> 1: the search's dominates more)."""
        return _ratio(self.hypervolumes)

    @property
    def ratio_log(self) -> float:
        """The same ratio with sizes on a log axis: what a smaller model adds past 10x shows there."""
        return _ratio(self.hypervolumes_log)

    @property
    def fronts(self) -> pd.DataFrame:
        """The runs on either front, by source then drop."""
        front = self.runs[self.runs["on_front"]].sort_values(["source", ACC_DROP])
        return front[[c for c in FRONT_COLUMNS if c in front]].reset_index(drop=True)

    def smallest(self, source: str) -> pd.Series | None:
        """The smallest run of `source` within the budget (the lower drop on a tie)."""
        return winner(self.runs[self.runs["source"] == source], [ACC_DROP, SIZE_BYTES])

    def summary(self) -> str:
        lines = [f"study {self.study}: budget {self.budget:g} points of {ACC_DROP}"]
        for source in SOURCES:
            runs = self.runs[self.runs["source"] == source]
            best = self.smallest(source)
            seeded = int(runs["seeded"].sum())
            counted = f"{len(runs)} runs" + (f" ({len(runs) - seeded} trials run + {seeded} of the store's it started "
                                             "from)" if seeded else "")
            lines.append(f"{source}: {counted}, {int(runs['feasible'].sum())} within the budget, hypervolume "
                         f"{self.hypervolumes[source]:.4f}; smallest within the budget: " + (
                             "none" if best is None else f"{best['run_name']} {best['method']} {best['knobs']} "
                             f"{best[SIZE_BYTES]:.0f} bytes, drop {best[ACC_DROP]:+.2f}"))
        lines.append(f"hypervolume search / grid: {self.ratio:.3f} (> 1: the search's front dominates more)")
        if self.hypervolumes_log:
            lines.append(f"on a log size axis (1x to {10 ** LOG_SIZE_DECADES:.0f}x smaller): grid "
                         f"{self.hypervolumes_log['grid']:.4f}, search {self.hypervolumes_log['search']:.4f}, "
                         f"ratio {self.ratio_log:.3f}")
        return "\n".join(lines)


def _ratio(volumes: dict[str, float]) -> float:
    grid = volumes["grid"]
    return volumes["search"] / grid if grid > 0 else math.inf


def compare_fronts(trials: pd.DataFrame, grid: pd.DataFrame, budget: float, study: str = "",
                   seeds: pd.DataFrame | None = None) -> FrontComparison:
    """The fronts of acc_drop against size_bytes of a study's trial runs and a grid's runs (load_runs
    frames; their baseline runs left out), each within the budget, with the hypervolumes measured against
    the dense baseline's size (`baseline_size_bytes` of the runs) and the figure of both. `seeds`: the
    store's runs the study started from (warm start), counted in the search's set (`seeded`).

    Raises:
        ValueError: no run logged baseline_size_bytes (nothing to measure the sizes against).
    """
    frames = []
    if seeds is not None and not seeds.empty:
        trials = pd.concat([trials.assign(seeded=False), seeds.assign(seeded=True)], ignore_index=True)
    for source, runs in zip(SOURCES, (trials, grid)):
        runs = runs.reindex(columns=list(dict.fromkeys([*runs.columns, "method", ACC_DROP, SIZE_BYTES])))  # none yet
        runs = runs[runs["method"] != BASELINE_METHOD].dropna(subset=[ACC_DROP, SIZE_BYTES]).copy()
        runs["source"] = source
        runs["seeded"] = runs["seeded"].fillna(False).astype(bool) if "seeded" in runs else False
        finished = runs["status"] == FINISHED if "status" in runs else True
        runs["feasible"] = finished & (runs[ACC_DROP] <= budget)
        runs["on_front"] = pareto(runs, [ACC_DROP, SIZE_BYTES], ["minimize", "minimize"])
        frames.append(runs)
    from lightning_modules.analysis import with_configs  # (analysis imports this module)

    # knobs read across both sets: a method with one run in each still shows what set them apart
    both = with_configs(pd.concat(frames, ignore_index=True).drop(columns=["knobs", "config"], errors="ignore"))
    sizes = both[BASELINE_SIZE_BYTES].dropna() if BASELINE_SIZE_BYTES in both else pd.Series(dtype=float)
    if sizes.empty:
        raise ValueError(f"no run logged {BASELINE_SIZE_BYTES}: the hypervolume has no reference size")
    reference = float(sizes.iloc[0])
    volumes, volumes_log = ({source: front_hypervolume(frame, [ACC_DROP, SIZE_BYTES], budget, reference, decades)
                             for source, frame in zip(SOURCES, frames)} for decades in (None, LOG_SIZE_DECADES))
    grid_front = frames[1][frames[1]["on_front"]]
    figure = front_figure(frames[0], [ACC_DROP, SIZE_BYTES], budget, f"study {study}: search against the grid",
                          reference=grid_front, reference_label="grid")
    return FrontComparison(study, budget, both, volumes, figure, volumes_log)


def study_against_grid(grid: pd.DataFrame, tracking_uri: str | None = None, experiment: str | None = None,
                       study: str = "latest", budget: float | None = None, with_seeds: bool = True) -> FrontComparison | None:
    """The study's front (its trial runs, read from the store, and with_seeds the store's runs it started
    from) against the grid's (`grid`: load_runs of the grid, of the same data and model as the study; runs
    of any search are left out of it); None when the store holds no study. `budget` None: the study's own
    (its parent run's tag search_budget). With seeds the search's front holds the grid's runs of its space:
    it dominates at least as much as the grid's whenever the grid's front lies in the space.

    Raises:
        ValueError: `study` names no study of the store (the message lists them).
    """
    from lightning_modules.analysis import experiment_id, load_runs, open_client
    from lightning_modules.contract import EXPERIMENT, ROLE_SWEEP, ROLE_TAG, SWEEP_TAG

    experiment = experiment or EXPERIMENT
    client = open_client(tracking_uri)
    parents = client.search_runs([experiment_id(client, experiment)],
                                 f"tags.{ROLE_TAG} = '{ROLE_SWEEP}' and tags.{STUDY_TAG} != ''",
                                 order_by=["attributes.start_time DESC"], max_results=1000)
    if not parents:
        return None
    studies = {run.data.tags[STUDY_TAG]: run for run in reversed(parents)}  # the newest parent of each study
    name = parents[0].data.tags[STUDY_TAG] if study == "latest" else study
    if name not in studies:
        raise ValueError(f"study={study!r} is not in the store; it has: {', '.join(studies)}")
    parent = studies[name]
    trials = load_runs(tracking_uri, experiment, parent.data.tags[SWEEP_TAG], statuses=None)
    if budget is None:
        budget = float(parent.data.tags.get(SEARCH_BUDGET_TAG, "<= 0.5").split("<=")[-1])
    searches = {run.data.tags.get(SWEEP_TAG) for run in parents}
    same = grid["sweep"].map(lambda sweep: sweep not in searches)
    for tag in ("data", "model", "seed"):
        same &= grid[tag].isin(trials[tag].unique())
    seeds = study_seeds(client, parent.info.run_id) if with_seeds else None
    return compare_fronts(trials, grid[same], budget, name, seeds)


def study_seeds(client: Any, parent_run_id: str) -> pd.DataFrame:
    """The store's runs a study started from (its trials table's `seeded` rows, logged on its parent run at
    the end of each launch), as load_runs rows; empty before the first launch ended, or for an older study."""
    from lightning_modules.analysis import read_csv_artifact, tidy_runs

    table = read_csv_artifact(client, parent_run_id, SEARCH_TRIALS_ARTIFACT)
    if table is None or "seeded" not in table:
        return tidy_runs([])
    seeded = table.loc[table["seeded"].astype(str).str.lower() == "true", "run_id"]
    return tidy_runs(client.get_run(run_id) for run_id in seeded)


def failed_trials(table: pd.DataFrame) -> pd.DataFrame:
    """The trials whose run ended FAILED (collapsed, crashed, or recorded by the search for a job that
    left no run) or that Optuna holds as FAIL (no objectives)."""
    return table[(table["run_status"] == FAILED) | (table["state"] == "FAIL")]


def failure_lines(table: pd.DataFrame) -> list[str]:
    """What the search prints under its front about the trials that failed: each with its reason."""
    failed = failed_trials(table)
    if failed.empty:
        return []
    lines = [f"{len(failed)} of {len(table)} trials failed: infeasible (or failed) in the study, never on the front; "
             f"their runs FAILED with the reason in tag `{ERROR_TAG}`, and the command exits 1, as a grid does"]
    lines += [f"    trial {row.trial} {row.method} {row.knobs}: {row.error or 'no objectives logged'}"
              for row in failed.itertuples(index=False)]
    return lines


def _baseline_figure(store: Store, best: pd.Series | None, metric: str) -> float | None:
    """The dense baseline's figure of `metric` (baseline_<metric>), read from the winner's run."""
    if best is None or not best["run_id"]:
        return None
    run = store.client.get_run(str(best["run_id"]))
    name = BASELINE_SIZE_BYTES if metric == "size_bytes" else baseline_metric(metric)
    return run.data.metrics.get(name)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


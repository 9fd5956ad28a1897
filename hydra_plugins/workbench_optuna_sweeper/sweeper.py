"""A Hydra Sweeper that runs an Optuna study of workbench runs (lightning_modules/search.py does the work).

Hydra imports every module under hydra_plugins at start-up to find plugins: this one imports only
Hydra and OmegaConf at its top, the search (Optuna, MLflow) once a search starts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class WorkbenchOptunaSweeper(Sweeper):
    """Each argument is set in hydra.sweeper (conf/hydra/sweeper/optuna.yaml documents them)."""

    def __init__(self, study: str, space: Any, objectives: Any, directions: Any, budget: float,
                 constraint: str = "acc_drop", storage: str | None = None, n_trials: int = 20, n_jobs: int = 1,
                 sampler: str = "tpe", seed: int | None = 0, startup_trials: int = 5, warm_start: bool = True,
                 register_as: str | None = None, params: Any = None) -> None:
        self.study, self.storage, self.budget, self.constraint = study, storage, budget, constraint
        self.space = OmegaConf.to_container(space, resolve=True) if isinstance(space, DictConfig) else dict(space or {})
        self.objectives, self.directions = list(objectives), list(directions)
        self.n_trials, self.n_jobs, self.sampler, self.seed, self.startup_trials = (
            n_trials, n_jobs, sampler, seed, startup_trials)
        self.warm_start, self.register_as = bool(warm_start), register_as
        self.params = params
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from lightning_modules.search import log_trials_table, register_winner, report_study, run_search, trials_table

        settings, store, parent_run_id = self._prepare(arguments)

        def launch(batch: list[list[str]], first: int) -> Any:
            return self.launcher.launch(batch, initial_job_idx=first)

        def progress(study: Any) -> None:  # the trials table on the parent run, current after every trial
            if parent_run_id is not None:
                log_trials_table(trials_table(study), store, parent_run_id)

        study = run_search(settings, list(arguments), launch, store, self._compose_params(arguments), progress)
        table = report_study(study, settings.objectives, store, parent_run_id)
        if self.register_as:
            print(register_winner(table, settings.objectives, store, settings.study, str(self.register_as)))
        return study

    def _prepare(self, arguments: list[str]):
        """The search's settings, checked (with every method's config composed and validated) before
        any trial; a bad value ends the sweep here with the reason, as a grid's does."""
        from lightning_modules.contract import STUDY_TAG
        from lightning_modules.search import Objectives, SearchSettings, parse_space, study_storage, write_search_file
        from lightning_modules.tracking import Store, read_sweep_info

        sweep_dir = Path(self.config.hydra.sweep.dir)
        info = read_sweep_info(sweep_dir)
        store = Store(info.tracking_uri, info.experiment) if info else Store.from_config(self.config.tracking)
        try:
            if self.params:
                raise ValueError(f"hydra.sweeper.params={dict(self.params)}: a search takes its space from "
                                 "hydra.sweeper.space; start it through an experiment that clears the default grid "
                                 "(experiment=search_size or search_latency)")
            for override in OverridesParser.create().parse_overrides(arguments):
                if override.is_sweep_override():
                    raise ValueError(f"{override.input_line}: a search runs one value per key; the method and its "
                                     "knobs come from hydra.sweeper.space")
            space = parse_space(self.space)
            objectives = Objectives(tuple(self.objectives), tuple(self.directions), self.constraint, float(self.budget))
            self._check_metrics(objectives)
            self._validate_methods(arguments, space)
            settings = SearchSettings(self.study, study_storage(self.storage, store.uri), space, objectives,
                                      int(self.n_trials), int(self.n_jobs), self.sampler, self.seed,
                                      int(self.startup_trials), self.warm_start)
        except Exception as error:
            if info is not None:
                store.client.set_terminated(info.parent_run_id, "FAILED")
            print(f"Error: {error}\nNothing was run.", file=sys.stderr)
            raise SystemExit(2) from error
        write_search_file(sweep_dir, self.study)
        if info is not None:
            store.client.set_tag(info.parent_run_id, STUDY_TAG, self.study)
        log.info("study %s in %s: %d trials over %s", self.study, settings.storage, settings.n_trials,
                 ", ".join(space))
        return settings, store, info.parent_run_id if info else None

    def _compose_params(self, arguments: list[str]):
        """overrides -> the params a run of this search with them logs (the warm start matches the store's runs to them)."""
        from functools import lru_cache

        from hydra import compose

        from lightning_modules.tracking import config_params

        @lru_cache(maxsize=256)
        def params(overrides: tuple[str, ...]) -> dict[str, Any]:
            return config_params(compose(config_name=self.config.hydra.job.config_name or "config",
                                         overrides=[*arguments, *overrides]))

        return lambda overrides: params(tuple(overrides))

    def _check_metrics(self, objectives) -> None:
        from lightning_modules.contract import ENERGY_METRICS, contract_metrics

        batches = tuple(self.config.hardware.latency.batch_sizes)
        known = [*contract_metrics(batches), *ENERGY_METRICS]
        for name in (*objectives.metrics, objectives.constraint):
            if name not in known:
                raise ValueError(f"hydra.sweeper objective or constraint {name!r} is not a metric every run logs on "
                                 f"hardware={self.config.hardware.name}; allowed: {', '.join(known)}")

    def _validate_methods(self, arguments: list[str], space) -> None:
        """Compose and validate each method of the space at its knobs' first values."""
        from hydra import compose

        from lightning_modules.config import validate

        for method, knobs in space.items():
            first = [f"{knob.key}={_first(knob)}" for knob in knobs]
            validate(compose(config_name=self.config.hydra.job.config_name or "config",
                             overrides=[*arguments, f"method={method}", *first]))


def _first(knob) -> str:
    from lightning_modules.search import format_value

    return format_value(knob.choices[0] if knob.choices else knob.low)

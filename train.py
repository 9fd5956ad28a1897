"""Entry point: `python train.py` runs one run, `python train.py -m` the default grid.

Any Hydra override works, e.g. `python train.py -m model=lenet300,lenet5 seed=0,1,2 hardware=cpu,cpu_1t`.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

# Paths in conf/ are relative to the repository, wherever the command is started from.
os.environ.setdefault("WORKBENCH_ROOT", str(Path(__file__).resolve().parent))
# Baselines are fetched from the store for every run: no progress bar for a local file copy.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Lightning 2.6 trips over its own use of a torch API deprecated in 2.14, once per fit.
warnings.filterwarnings("ignore", message=".*LeafSpec.*")

log = logging.getLogger("train")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, float] | None:
    from lightning_modules.config import ConfigError
    from lightning_modules.experiment import run_experiment  # after Hydra parsed the command: fast --help

    from lightning_modules.signals import runs_end_killed_on_signals

    try:
        with runs_end_killed_on_signals():  # in joblib's workers too: each job's own process
            return run_experiment(cfg)
    except Exception as error:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            if isinstance(error, ConfigError):  # refused before any run opened: the key and what is allowed
                print(f"Error: {error}\nNothing was run.", file=sys.stderr)
                raise SystemExit(2) from error
            raise
        # Recorded as FAILED in the store with its error; the sweep goes on with the next job.
        log.exception("run failed; the sweep goes on")
        return None


def method_values_per_job(argv: list[str]) -> list[str]:
    """In a sweep, `method.<key>=<value>` goes to Hydra as the one-value sweep `method.<key>=choice(<value>)`.

    Hydra composes a sweep's base config with the default method (baseline), leaving the swept keys out:
    a plain value for a key the baseline lacks (`method=agp,channel method.sparsity=0.9`) failed there,
    with advice (`+method.sparsity`) that then fails on the methods that have the key. As a one-value
    sweep, it is set in each job's own method, as meant; a job whose method lacks the key is refused
    before any job runs, naming it."""
    if not {"-m", "--multirun"} & set(argv):
        return argv
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    def per_job(arg: str) -> str:
        key, _, value = arg.partition("=")
        if not arg.startswith("method.") or not value:
            return arg
        try:
            if parser.parse_overrides([arg])[0].is_sweep_override():
                return arg
        except Exception:  # not a valid override: Hydra says so, with its own message
            return arg
        return f"{key}=choice({value})"

    return [argv[0], *(per_job(arg) for arg in argv[1:])]


def run_until_killed() -> None:
    """main() with SIGTERM, Ctrl-C and SIGHUP ending the open run (and the sweep's parent run) KILLED with
    the reason; the process then exits 128 + the signal's number, as a shell reports a killed process."""
    from lightning_modules.signals import RunKilled, kill_reason, runs_end_killed_on_signals

    try:
        with runs_end_killed_on_signals():
            main()
    except RunKilled as killed:
        kill_reason(killed)  # seen: no more deliveries
        from lightning_modules.sweep import end_running_sweep_killed

        end_running_sweep_killed(str(killed))
        print(f"{killed}. The run was recorded KILLED; launch the same command again (a sweep: with "
              "hydra.sweep.dir=<its folder>) to run it again, from its last checkpoint.", file=sys.stderr)
        sys.exit(killed.exit_code)


if __name__ == "__main__":
    sys.argv = method_values_per_job(sys.argv)
    run_until_killed()

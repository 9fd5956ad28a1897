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

    try:
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


if __name__ == "__main__":
    main()

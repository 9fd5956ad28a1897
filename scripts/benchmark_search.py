"""Benchmark of the search across methods (issue 17, "What to measure") against the default grid.

For each model (lenet5 and resnet20 on mnist5k by default), in one MLflow store:
    1. the default grid for that model: `train.py -m model=<m>` (conf/config.yaml's methods, shipped defaults)
    2. a search with as many trials as the grid has compressed runs:
       `train.py -m experiment=search_size model=<m> hydra.sweeper.n_trials=<n> hydra.sweeper.budget=<b>`
then prints both fronts (acc_drop vs size_bytes, runs within the budget), their hypervolumes (the share of
the box "drop in [-budget, budget], size up to the dense baseline's" each front dominates; search.front_hypervolume)
and the ratio search / grid, the smallest model within the budget each found, and the wall time per trial
against a grid run (run_time_s of the runs, and the search command's wall time over its trials: its overhead).

    PYTHONPATH=. .venv/bin/python scripts/benchmark_search.py --store /tmp/search-bench
    ... --models lenet5 --budget 0.5                        # one model
    ... --report-only --store DIR                           # the tables from the runs already in the store
    # a check of the plumbing in minutes (digits, a few batches; the figures mean nothing):
    ... --store /tmp/sb --models lenet5 --data digits --trials 3 --grid-methods baseline,lowbit,cluster \\
        --space lowbit,cluster --fast

Rerunning into the same store resumes: grid jobs with a FINISHED run are skipped, the study goes on.
resnet20's baseline trains 10-18 minutes on 2 cores, once per store (`--baselines-from DB` copies the baselines
of another store in: scripts/scorecard.py's stores hold resnet20's). Run it on a quiet machine.
`--label v2 --search-only` runs a second search (its own study, search-<model>-v2) against the grid already there.

Measured 2026-12-01 (03:08-04:01 UTC), lenet5 on mnist5k, seed 0, budget 0.5, 9 trials (the default grid's 9
compressed runs), hardware=cpu, the shipped search_size space (10 methods) and sampler (tpe, 5 random startup
trials, seed 0); the 2-core machine shared with other sessions' training (load 2 during the grid, 5-7 during the
search): sizes and drops do not depend on it, wall times do. resnet20 not run (its baseline alone 10-18 min).
    grid front:   agp sparsity 0.8 (drop -0.8, 58448 B, 4.2x), cluster 4 bits (-0.2, 32618 B, 7.6x)
    search front: agp_cluster sparsity 0.719 bits 4 (-1.0, 16040 B, 15.4x),
                  agp_cluster sparsity 0.835 bits 4 (-0.5, 11189 B, 22.1x)
    hypervolume:  grid 0.8367, search 0.9547, ratio 1.141 (the search's front dominates the grid's: each grid
                  front point is beaten on both axes by a trial)
    smallest within the budget: search 11189 B (22.1x, drop -0.5); grid 32618 B (cluster, 7.6x, drop -0.2)
    all 9 trials and all 9 grid runs within the budget; trials: qat, agp_qat 0.884 (-0.9, 9.5x), agp_cluster x3,
    agp_kd 0.562, cluster 6 bits, channel 0.319, lowbit 6 bits
    wall time: grid command 720 s (10 jobs, the baseline's 55 s included), run_time_s 70.3 s a compressed run;
    search command 2201 s, 240.4 s a trial (5 of 9 trials ran AGP's 30-epoch recipe, and under 3x the grid's
    load: the grid's agp run took 47 s, the search's agp_cluster 350-396 s); the search's own overhead outside
    the runs (process, Hydra, Optuna, the front at the end) 4.1 s a trial.

Measured 2026-12-02, resnet20 on mnist5k, seed 0, budget 0.5 (store /tmp/q11/search; the machine shared with
other training, so wall times are not comparable between runs): the default grid's 10 compressed runs on
`cpu`: within the budget deep_compression (-0.6, 59077 B, 18.6x), agp (-0.5, 4.1x), ptq_static (0.0, 3.9x),
cluster (0.1, 7.3x), kd (0.2, 1.0x), lowbit (0.4, 7.6x); over it channel 0.7, qat 0.6, tucker 0.8, svd 2.6.
The first study's space (10 methods) lacked deep_compression; stopped after 5 trials (qat, agp_qat 0.88
14.8x, agp_cluster 0.72/4 bits 13.9x, agp_kd, cluster): hypervolume 0.932 against the grid's 0.946, ratio
0.985. deep_compression then joined search_size's space (a second study, `--label v2`), 10 trials:
hypervolume 0.881, ratio 0.931; TPE spent them on agp / agp_kd / agp_qat at sparsity 0.64-0.87 (smallest
within the budget agp_qat 0.87, 13.9x, -0.3) and never sampled deep_compression. 546 s a trial against 387 s a
grid run (run_time_s; three trials beside the test suite); overhead outside the runs 3.8 s a trial.

Since 2026-12-02 a search starts from the store's runs that are points of its space (warm start: the grid's runs of
its methods at their shipped knobs join the study as trials that cost nothing and count toward no n_trials), and
ptq_static joined the space (12 methods). The report judges the search's front both with those runs (what a user
gets: a superset of the grid's runs of the space) and of its own trials alone.
Measured 2026-12-02 (04:03-04:49 UTC, store /tmp/q14/l5), lenet5 on mnist5k, seed 0, budget 0.5, 10 trials, the
current default grid (10 compressed runs, deep_compression among them), on a machine shared with the resnet20
search below (load 3-5):
    warm start: 8 of the grid's runs (svd's 10 epochs lay outside the space's 1-7 then; now 4-12)
    grid front:   agp 0.8 (-0.3, 58444 B, 4.2x), deep_compression 0.92 / 8 / 5 bits (+0.1, 8771 B, 28.2x)
    trials:       agp 0.83 (-0.5, 4.9x), agp_qat 0.95 (+0.2, 14.1x), agp 0.97 (+0.9, over), deep_compression
                  0.79 / 8 / 5 (-0.3, 15.7x), 0.76 / 5 / 5 (-0.4, 15.2x), 0.71 / 5 / 3 (-0.3, 16.4x), agp_cluster 0.65 / 4
                  (-0.4), svd 0.34 (0.0, 1.8x), agp_kd 0.72 (0.0), agp 0.50 (-0.7)
    hypervolume:  grid 0.6913; search with the grid's runs 0.9343 (ratio 1.352); its 10 trials alone 0.9242 (1.337)
    smallest within the budget: the grid's deep_compression (8771 B, +0.1), in the search's front as a seed; the
                  trials' own smallest deep_compression 0.71 / 5 / 3 bits (15057 B, 16.4x, -0.3): TPE spent its
                  trials on the low-drop side of the front, not below 8771 B
    wall time:    grid command 1064 s (99 s a run), search 1646 s (158 s a trial: 6 of 10 ran the 30-epoch agp
                  recipes); the search's overhead outside the runs 6.8 s a trial (the warm start's config matching
                  included)
resnet20 the same way (`--label v3 --search-only` against the grid above, store /tmp/q11/search, 03:58-06:12, 11
methods: ptq_static joined the space after this study began; the machine shared with the lenet5 benchmark and the
test suite): 7 grid runs seeded it (svd's 3-epoch run differed from the shipped recipe; two cpu_1t runs from older
code). Trials: deep_compression 0.91 / 8 / 5 (-0.6, 17.6x), agp_cluster 0.69 / 2 (-0.3), deep_compression 0.98 / 5 / 5
(+0.3, 26913 B, 40.7x), agp_qat 0.95 / 0.96 / 0.98 (-0.3 / -0.4 / +0.3, 18.1-20.5x), agp_kd 0.70, svd 0.47, deep_compression
0.75 / 8 / 4, agp_qat 0.56: all 10 within the budget.
    hypervolume:  grid 0.9461; search 0.9556 with the grid's runs, 0.9553 its trials alone: ratio 1.010 both ways (the
                  grid's 18.6x point already covers 95% of the box, drawn on a linear size axis: the rest is thin)
    smallest within the budget: search deep_compression 0.98 / 5 / 5 bits 26913 B (40.7x, +0.3); grid
                  deep_compression 59077 B (18.6x, -0.6)
    wall time:    802 s a trial (run_time_s; 5 of 10 ran 30-epoch agp-family recipes beside other work) against 387 s
                  a grid run; the search's own overhead 4.2 s a trial

With the size on a log axis (1x to 100x smaller; the report's summary, since 2026-12-02, read again from the
same stores): lenet5 grid 0.4153, search with the grid's runs 0.6266 (ratio 1.509), its trials alone 0.5797
(1.396); resnet20 grid 0.6343, search 0.6839 (1.078), trials alone 0.6827 (1.076). The linear axis's 1.010 for
resnet20 hid most of what the 40.7x model added over the grid's 18.6x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lightning_modules.analysis import load_runs
from lightning_modules.contract import BASELINE_METHOD, EXPERIMENT, RUN_TIME_S, sqlite_uri
from lightning_modules.search import study_against_grid
from lightning_modules.tracking import copy_baselines

ROOT = Path(__file__).resolve().parents[1]
FAST = ["baseline.epochs=1", "trainer.limit_train_batches=4", "trainer.enable_progress_bar=false",
        "hardware.latency.warmup=1", "hardware.latency.repeats=3", "run_checks.chance_margin=null"]


def train(args: list[str], store: Path) -> float:
    """`python train.py ARGS` into the store; returns its wall time in seconds."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri(store), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           "WORKBENCH_ROOT": str(ROOT)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env)
    if result.returncode not in (0, 1):  # 1: some run FAILED (recorded), the others stand
        raise SystemExit(f"train.py {' '.join(args)} exited {result.returncode}")
    return time.perf_counter() - started


def grid_jobs(methods: str | None) -> int:
    """Compressed runs of the default grid per model (its methods less the baseline)."""
    if methods is None:
        methods = str(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.sweeper.params.method)
    return len([m for m in methods.split(",") if m.strip() != BASELINE_METHOD])


def search_name(model: str, opts: argparse.Namespace) -> str:
    """The search's sweep folder (and, with --label, its study): search-<model>[-<label>]."""
    return f"search-{model}" + (f"-{opts.label}" if opts.label else "")


def run_model(model: str, opts: argparse.Namespace, trials: int) -> dict[str, float]:
    common = [f"model={model}", f"data={opts.data}", *(FAST if opts.fast else [])]
    grid = ["-m", *common, f"hydra.sweep.dir={opts.store / f'grid-{model}'}"]
    if opts.grid_methods:
        grid.append(f"method={opts.grid_methods}")
    search = ["-m", "experiment=search_size", *common, f"hydra.sweeper.n_trials={trials}",
              f"hydra.sweeper.budget={opts.budget}", f"hydra.sweep.dir={opts.store / search_name(model, opts)}"]
    if opts.label:  # another study beside the first (another space or sampler): its own name, not a resumption
        search.append(f"hydra.sweeper.study={search_name(model, opts)}")
    if opts.space:
        search.append(f"search@hydra.sweeper.space=[{opts.space}]")
    grid_wall = math.nan if opts.search_only else train(grid, opts.store)
    return {"grid_wall_s": grid_wall, "search_wall_s": train(search, opts.store)}


def report(model: str, opts: argparse.Namespace, walls: dict[str, float] | None) -> None:
    uri = sqlite_uri(opts.store)
    grid = load_runs(uri, EXPERIMENT, sweep=f"grid-{model}", statuses=None)
    trials = load_runs(uri, EXPERIMENT, sweep=search_name(model, opts), statuses=None)
    compressed = {name: runs[runs["method"] != BASELINE_METHOD] for name, runs in (("grid", grid), ("search", trials))}
    if any(runs.empty for runs in compressed.values()):
        print(f"{model}: no runs yet (grid {len(compressed['grid'])}, search {len(compressed['search'])})")
        return
    print(f"\n=== {model} on {opts.data}")
    study = search_name(model, opts) if opts.label else f"size-{opts.data}-{model}-seed0"
    # the search's product (its trials and the grid's runs it started from), and what its own trials added
    for label, with_seeds in (("", True), ("-alone", False)):
        comparison = study_against_grid(grid, uri, EXPERIMENT, study, opts.budget, with_seeds=with_seeds)
        print(f"\n--- the search's front {'with the store runs it started from' if with_seeds else 'of its trials alone'}")
        print(comparison.summary())
        print(comparison.fronts.to_string(index=False))
        figure = opts.store / f"fronts-{search_name(model, opts)}{label}.png"
        comparison.figure.savefig(figure, dpi=100)
        print(f"figure: {figure}")
    per_trial, per_grid_run = compressed["search"][RUN_TIME_S].mean(), compressed["grid"][RUN_TIME_S].mean()
    print(f"wall time per run: search trial {per_trial:.1f} s, grid run {per_grid_run:.1f} s (run_time_s means)")
    if walls:
        overhead = (walls["search_wall_s"] - compressed["search"][RUN_TIME_S].sum()) / len(compressed["search"])
        print(f"commands: grid {walls['grid_wall_s']:.0f} s, search {walls['search_wall_s']:.0f} s; search overhead "
              f"outside the runs {overhead:.1f} s per trial (process start, Hydra, Optuna, the front at the end)")
        (opts.store / f"walls-{search_name(model, opts)}.json").write_text(json.dumps(walls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="folder of the MLflow store (and the study)")
    parser.add_argument("--models", default="lenet5,resnet20")
    parser.add_argument("--data", default="mnist5k")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--trials", type=int, default=None, help="default: the grid's compressed runs per model")
    parser.add_argument("--grid-methods", default=None, help="a subset of the default grid's methods (a check)")
    parser.add_argument("--space", default=None, help="a subset of conf/search/ for the search (a check)")
    parser.add_argument("--label", default=None, help="a second search beside the first (search-<model>-<label>)")
    parser.add_argument("--search-only", action="store_true", help="the grid is in the store already")
    parser.add_argument("--fast", action="store_true", help="a few batches per run: checks the plumbing only")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--baselines-from", type=Path, default=None,
                        help="an mlflow.db with trained baselines (resnet20's: 10-18 min saved)")
    opts = parser.parse_args()
    opts.store = opts.store.resolve()
    opts.store.mkdir(parents=True, exist_ok=True)
    if opts.baselines_from is not None and not opts.report_only:
        print(copy_baselines(opts.store, opts.baselines_from) or f"{opts.store} has every baseline of {opts.baselines_from}")
    trials = opts.trials or grid_jobs(opts.grid_methods)
    for model in opts.models.split(","):
        walls = None
        if not opts.report_only:
            walls = run_model(model, opts, trials)
        elif (opts.store / f"walls-{search_name(model, opts)}.json").exists():
            walls = json.loads((opts.store / f"walls-{search_name(model, opts)}.json").read_text())
        report(model, opts, walls)


if __name__ == "__main__":
    main()

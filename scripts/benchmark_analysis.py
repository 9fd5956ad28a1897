"""Time to load and render the grid overview (notebooks/01) for a store of N runs (default 1,000).

The runs are written cheaply, straight into a scratch SQLite store with MlflowClient.log_batch
(tags, the contract's metrics and ~60 config params each, as a real run has), not trained. The pruning
methods sweep `method.sparsity` over SPARSITIES (so the summaries have configurations to tell apart) and
one run in NOISY_EVERY carries the `latency_noisy` tag. Then,
`--repeats` times, it measures:
    load     analysis.load_runs: search the store, build the tidy DataFrame
    figures  analysis.grid_overview: configurations, fronts, budget table, the three figures drawn
    render   every figure rendered to PNG (Agg), as the notebook and the sweep's parent run show it

    .venv/bin/python scripts/benchmark_analysis.py                  # 1,000 runs
    .venv/bin/python scripts/benchmark_analysis.py --runs 5000 --store /tmp/big   # keep the store, reuse it
    .venv/bin/python scripts/benchmark_analysis.py --notebook      # and the notebook itself, headless
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere, installed or not

from lightning_modules import analysis  # noqa: E402
from lightning_modules.contract import (  # noqa: E402
    EXPERIMENT, MACS_DENSE, MACS_EFFECTIVE, MACS_EFFECTIVE_THEORETICAL, ROLE_SWEEP, ROLE_TAG, SWEEP_TAG, sqlite_uri,
)

SWEEP = "benchmark"
MODELS = {"lenet300": 1.0, "lenet5": 1.6, "resnet20": 4.0, "mobilenetv2": 6.0}  # model -> relative latency
METHODS = {  # method -> (compression ratio, sparsity, accuracy cost in points, speedup)
    "baseline": (1.0, 0.0, 0.0, 1.0), "magnitude": (4.5, 0.8, 0.4, 0.95), "agp": (8.0, 0.9, 0.6, 0.95),
    "channel": (2.5, 0.6, 0.9, 1.8), "ptq": (3.9, 0.0, 0.5, 1.6), "qat": (3.9, 0.0, 0.2, 1.6),
    "kd": (3.0, 0.0, 1.2, 2.5), "svd": (2.2, 0.0, 0.8, 1.3), "agp_qat": (25.0, 0.9, 1.0, 1.5),
    "deep_compression": (35.0, 0.9, 1.3, 1.0),
}
HARDWARE = {"cpu": 1.0, "cpu_1t": 2.5, "cuda": 0.1}
PARAMS_PER_RUN = 60
SPARSITIES = (0.8, 0.9, 0.95)  # method.sparsity of the methods that prune (the sweep axis of the real grid)
NOISY_EVERY = 20  # one run in 20 timed "under contention"


def grid(count: int) -> Iterator[tuple[str, str, str, int]]:
    """(model, method, hardware, seed) cells, seeds growing until `count` runs."""
    cells = ((model, method, hardware, seed) for seed in itertools.count()
             for model, method, hardware in itertools.product(MODELS, METHODS, HARDWARE))
    yield from itertools.islice(cells, count)


def knob_sparsity(method: str, seed: int) -> float | None:
    """The pruning methods' swept sparsity: seeds take SPARSITIES in turn (None for the other methods)."""
    return SPARSITIES[seed % len(SPARSITIES)] if METHODS[method][1] > 0 else None


def fake_metrics(model: str, method: str, hardware: str, rng: np.random.Generator,
                 sparsity: float | None = None) -> dict[str, float]:
    ratio, default_sparsity, cost, speedup = METHODS[method]
    if sparsity is not None:  # a swept sparsity: ratio and cost scale with the weights left
        ratio, cost = ratio * (1 - default_sparsity) / (1 - sparsity), cost * sparsity / default_sparsity
    else:
        sparsity = default_sparsity
    baseline_acc = 98.0 - 2.0 * list(MODELS).index(model) + rng.normal(0, 0.3)
    drop = max(0.0, cost + rng.normal(0, 0.3)) if method != "baseline" else 0.0
    baseline_latency = MODELS[model] * HARDWARE[hardware] * 0.1
    metrics = {
        "test_acc": baseline_acc - drop, "test_loss": 0.1 + drop / 50, "baseline_test_acc": baseline_acc,
        "acc_drop": drop, "acc_drop_ci95_low": drop - 0.6, "acc_drop_ci95_high": drop + 0.6,
        "params_total": 60000.0 * MODELS[model], "params_nonzero": 60000.0 * MODELS[model] * (1 - sparsity),
        "sparsity": sparsity, "size_bytes": 240000.0 * MODELS[model] / ratio, "compression_ratio": ratio,
        MACS_DENSE: 4.0e5 * MODELS[model], MACS_EFFECTIVE: 4.0e5 * MODELS[model],
        MACS_EFFECTIVE_THEORETICAL: 4.0e5 * MODELS[model] * (1 - sparsity), "train_time_s": 30 * rng.random(),
    }
    for batch in (1, 32):
        latency = baseline_latency * batch ** 0.5 / speedup * rng.lognormal(0, 0.05)
        metrics |= {f"latency_ms_p50_bs{batch}": latency, f"latency_ms_p95_bs{batch}": latency * 1.2,
                    f"throughput_bs{batch}": 1000 * batch / latency, f"speedup_bs{batch}": speedup}
    return metrics


def write_store(root: Path, count: int) -> tuple[str, bool]:
    """A store holding one sweep of `count` fake runs: (its URI, whether it was written now or reused)."""
    uri = sqlite_uri(root)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    if found is not None and len(client.search_runs([found.experiment_id], max_results=count + 1)) > count:
        return uri, False
    exp_id = found.experiment_id if found is not None else client.create_experiment(
        EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    parent = client.create_run(exp_id, run_name=f"sweep-{SWEEP}", tags={SWEEP_TAG: SWEEP, ROLE_TAG: ROLE_SWEEP}).info.run_id
    rng = np.random.default_rng(0)
    now = int(time.time() * 1000)
    for index, (model, method, hardware, seed) in enumerate(grid(count)):
        name = f"{model}-{method}-{hardware}-s{seed}"
        tags = {"data": "mnist5k", "model": model, "method": method, "hardware": hardware, "seed": str(seed),
                "sweep": SWEEP, "git_commit": "0" * 40, MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: name}
        if index % NOISY_EVERY == NOISY_EVERY - 1:
            tags[analysis.LATENCY_NOISY_TAG] = "true"
        run_id = client.create_run(exp_id, run_name=name, tags=tags).info.run_id
        sparsity = knob_sparsity(method, seed)
        params = {f"config.key_{i:02d}": str(i) for i in range(PARAMS_PER_RUN - 3)} | {
            "method.name": method, "seed": str(seed), "method.sparsity": str(sparsity if sparsity is not None else "")}
        metrics = fake_metrics(model, method, hardware, rng, sparsity)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                         params=[Param(k, v) for k, v in params.items()])
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return uri, True


def measure_once(uri: str, png_dir: Path) -> dict[str, float]:
    """Seconds of each phase: load, figures, render."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    runs = analysis.load_runs(uri, sweep=SWEEP)
    seconds["load"] = time.perf_counter() - started
    started = time.perf_counter()
    overview = analysis.grid_overview(runs, budget=1.0)
    seconds["figures"] = time.perf_counter() - started
    started = time.perf_counter()
    for name, figure in overview.figures.items():
        analysis.figure_png(figure, png_dir / f"{name}.png")
    seconds["render"] = time.perf_counter() - started
    seconds["runs"] = len(runs)
    seconds["configs"] = len(overview.configs)
    return seconds


def run_notebook(uri: str) -> float:
    """Seconds to execute the grid-overview notebook on the store, parameters injected as papermill does."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "01_grid_overview.ipynb", as_version=4)
    index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(f"tracking_uri = {uri!r}\nsweep = {SWEEP!r}"))
    started = time.perf_counter()
    NotebookClient(notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(ROOT)}}).execute()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs in the store (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements; the median is reported")
    parser.add_argument("--store", type=Path, default=None, help="folder to keep (and reuse) the store in")
    parser.add_argument("--notebook", action="store_true",
                        help="also execute notebooks/01_grid_overview.ipynb headless (needs the dev extra)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="benchmark-analysis-") as scratch:
        root = args.store or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        uri, written = write_store(root, args.runs)
        print(f"store with {args.runs} runs {'written' if written else 'reused'} in "
              f"{time.perf_counter() - started:.1f}s: {uri}")
        results = [measure_once(uri, Path(scratch)) for _ in range(args.repeats)]
        notebook_seconds = run_notebook(uri) if args.notebook else None

    assert all(r["runs"] == args.runs for r in results), f"loaded {[r['runs'] for r in results]} runs"
    print(f"grid overview of {args.runs} runs ({results[0]['configs']} configurations x (model, hardware)), "
          f"median of {args.repeats} (seconds):")
    for phase in ("load", "figures", "render"):
        values = [r[phase] for r in results]
        print(f"  {phase:8s} {statistics.median(values):7.2f}   (min {min(values):.2f}, max {max(values):.2f})")
    totals = [r["load"] + r["figures"] + r["render"] for r in results]
    print(f"  {'total':8s} {statistics.median(totals):7.2f}   (min {min(totals):.2f}, max {max(totals):.2f})")
    if notebook_seconds is not None:
        print(f"notebooks/01_grid_overview.ipynb top to bottom (nbclient, kernel start included): {notebook_seconds:.2f}")


if __name__ == "__main__":
    main()

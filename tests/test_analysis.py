"""lightning_modules.analysis: loading runs back from a store, Pareto fronts, figures, statistics."""

from __future__ import annotations

import itertools
import logging
import math
import shutil
import sqlite3
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: no display in tests

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from scipy import stats
from torch import nn

from lightning_modules import analysis
from lightning_modules.contract import EXPERIMENT, resolve_store_uri
from lightning_modules.models import LeNet300
from lightning_modules.tracking import SweepInfo
from tests.conftest import FAST, ROOT, compose_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- a small synthetic store


class FakeStore:
    """A SQLite store whose runs are written directly with log_batch (no training)."""

    def __init__(self, root: Path, experiment: str = EXPERIMENT) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found is not None else \
            self.client.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())

    @classmethod
    def copy_of(cls, template: Path, root: Path) -> FakeStore:
        """A copy of an empty store (creating MLflow's schema takes a second), artifacts under `root`."""
        root.mkdir(parents=True)
        shutil.copy(template / "mlflow.db", root / "mlflow.db")
        with sqlite3.connect(root / "mlflow.db") as db:
            db.execute("UPDATE experiments SET artifact_location = ?", ((root / "artifacts").as_uri(),))
        return cls(root)

    def add_run(self, tags: dict[str, str], metrics: dict[str, float] | None = None,
                params: dict[str, str] | None = None, status: str = "FINISHED",
                artifacts: dict[str, str] | None = None) -> str:
        run_id = self.client.create_run(self.experiment_id, tags=tags).info.run_id
        self.client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in (metrics or {}).items()],
                              params=[Param(k, v) for k, v in (params or {}).items()],
                              tags=[RunTag("mlflow.runName", f"run-{run_id[:6]}")])
        for path, text in (artifacts or {}).items():
            self.client.log_text(run_id, text, path)
        self.client.set_terminated(run_id, status)
        return run_id

    def add_grid_run(self, model: str, method: str, seed: int, sweep: str = "s1", parent: str | None = None,
                     status: str = "FINISHED", **metrics: float) -> str:
        tags = {"data": "digits", "model": model, "method": method, "hardware": "cpu", "seed": str(seed),
                "sweep": sweep}
        if parent is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent
        values = {"test_acc": 90.0, "acc_drop": 0.0, "acc_drop_ci95_low": 0.0, "acc_drop_ci95_high": 0.0,
                  "compression_ratio": 1.0, "latency_ms_p50_bs1": 1.0, "speedup_bs1": 1.0, "sparsity": 0.0,
                  **metrics}
        return self.add_run(tags, values, {"method.sparsity": "0.8", "trainer.accelerator": "cpu"}, status)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("empty-store")
    FakeStore(root)
    return root


@pytest.fixture
def fake_store(empty_store: Path, tmp_path: Path) -> FakeStore:
    return FakeStore.copy_of(empty_store, tmp_path / "store")


@pytest.fixture
def grid_store(fake_store: FakeStore) -> FakeStore:
    """Sweep s1 (a parent run and 4 children, one FAILED) and an older sweep s0 with one run."""
    fake_store.add_run({"sweep": "s0", "role": "sweep"})
    fake_store.add_grid_run("lenet300", "baseline", 0, sweep="s0")
    parent = fake_store.add_run({"sweep": "s1", "role": "sweep"})
    fake_store.add_grid_run("lenet300", "baseline", 0, parent=parent, test_acc=95.0)
    fake_store.add_grid_run("lenet300", "magnitude", 0, parent=parent, test_acc=94.0, acc_drop=1.0,
                            compression_ratio=3.0, latency_ms_p50_bs1=0.8, sparsity=0.8)
    fake_store.add_grid_run("lenet5", "magnitude", 0, parent=parent, test_acc=97.0, acc_drop=0.5,
                            compression_ratio=2.0, latency_ms_p50_bs1=2.0, sparsity=0.7)
    fake_store.add_grid_run("lenet5", "magnitude", 1, parent=parent, status="FAILED")
    fake_store.parent = parent
    return fake_store


# ----------------------------------------------------------------------------- loading


def test_default_tracking_uri_prefers_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////somewhere/mlflow.db")
    assert resolve_store_uri() == "sqlite:////somewhere/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_store_uri() == f"sqlite:///{ROOT / 'mlruns' / 'mlflow.db'}"


def test_load_runs_of_one_sweep_is_tidy(grid_store: FakeStore) -> None:
    runs = analysis.load_runs(grid_store.uri, sweep="s1")

    assert len(runs) == 3  # parent and FAILED run left out
    assert set(runs["status"]) == {"FINISHED"} and set(runs["role"]) == {"run"}
    assert list(runs.columns[: len(analysis.RUN_COLUMNS)]) == list(analysis.RUN_COLUMNS)
    assert runs["seed"].dtype == "Int64"
    assert runs["params.method.sparsity"].dtype == float and runs["params.trainer.accelerator"].iloc[0] == "cpu"
    assert set(runs["parent_run_id"]) == {grid_store.parent}
    lenet5 = runs[runs["model"] == "lenet5"].iloc[0]
    assert lenet5["test_acc"] == 97.0 and lenet5["compression_ratio"] == 2.0
    assert pd.api.types.is_datetime64_any_dtype(runs["start_time"])


@pytest.mark.parametrize(("sweep", "statuses", "expected"), [
    (None, ("FINISHED",), 4),   # the whole experiment
    ("latest", ("FINISHED",), 3),
    ("s0", ("FINISHED",), 1),
    ("s1", None, 4),           # FAILED kept too
    ("nope", ("FINISHED",), 0),
])
def test_load_runs_selects_by_sweep_and_status(grid_store: FakeStore, sweep: str | None,
                                               statuses: tuple[str, ...] | None, expected: int) -> None:
    assert len(analysis.load_runs(grid_store.uri, sweep=sweep, statuses=statuses)) == expected


def test_load_runs_names_the_experiments_the_store_has(grid_store: FakeStore) -> None:
    with pytest.raises(ValueError, match=r"experiment='other' is not in the store; it has: .*workbench"):
        analysis.load_runs(grid_store.uri, experiment="other")


def test_load_runs_refuses_a_missing_store_instead_of_creating_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="No MLflow store at .*missing.db"):
        analysis.load_runs(f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()


def test_latest_sweep_needs_a_sweep(fake_store: FakeStore) -> None:
    fake_store.add_grid_run("lenet300", "baseline", 0)
    with pytest.raises(ValueError, match="no sweep"):
        analysis.load_runs(fake_store.uri, sweep="latest")


def test_describe_lists_the_axes(grid_store: FakeStore) -> None:
    line = analysis.describe(analysis.load_runs(grid_store.uri, sweep="s1"))
    assert line.startswith("3 runs;") and "model: lenet300, lenet5" in line and "seed: 0" in line


# ----------------------------------------------------------------------------- Pareto


@pytest.mark.parametrize(("x", "y", "x_larger_better", "expected"), [
    ([1, 2, 3], [3, 2, 1], True, [True, True, True]),           # a clean trade-off
    ([1, 2, 3], [1, 2, 3], True, [False, False, True]),          # one point beats all
    ([1, 2, 3], [1, 2, 3], False, [True, True, True]),           # smaller x better: a trade-off again
    ([2, 2, 1], [5, 4, 5], True, [True, False, False]),          # same x: the lower y is dominated
    ([2, 2], [5, 5], True, [True, True]),                        # duplicates both stay
    ([1, np.nan, 3], [5, 9, 1], True, [True, False, True]),     # NaN never on the front
    ([], [], True, []),
])
def test_pareto_mask_table(x: list[float], y: list[float], x_larger_better: bool, expected: list[bool]) -> None:
    assert analysis.pareto_mask(x, y, x_larger_better).tolist() == expected


def _dominated(i: int, xs: np.ndarray, ys: np.ndarray) -> bool:
    return any(xs[j] >= xs[i] and ys[j] >= ys[i] and (xs[j] > xs[i] or ys[j] > ys[i]) for j in range(len(xs)))


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs, ys = rng.integers(0, 8, 60).astype(float), rng.integers(0, 8, 60).astype(float)  # many ties
    expected = [not _dominated(i, xs, ys) for i in range(len(xs))]
    assert analysis.pareto_mask(xs, ys, x_larger_better=True).tolist() == expected
    # minimizing x is maximizing -x
    assert analysis.pareto_mask(-xs, ys, x_larger_better=False).tolist() == expected


def test_pareto_front_per_group() -> None:
    runs = pd.DataFrame({"hardware": ["a", "a", "a", "b", "b"], "latency": [1.0, 2.0, 3.0, 5.0, 1.0],
                         "acc": [90.0, 95.0, 94.0, 99.0, 98.0]})
    front = analysis.pareto_front(runs, "latency", "acc", x_larger_better=False, by=["hardware"])
    assert front[["hardware", "latency"]].values.tolist() == [["a", 1.0], ["a", 2.0], ["b", 1.0], ["b", 5.0]]


# ----------------------------------------------------------------------------- grid overview


def _grid_frame() -> pd.DataFrame:
    rows = []
    for model, method, seed, hardware in itertools.product(["lenet300", "lenet5"], ["baseline", "magnitude", "agp"],
                                                           [0, 1], ["cpu", "cpu_1t"]):
        compressed = method != "baseline"
        rows.append({"run_id": f"{model}-{method}-{seed}-{hardware}", "run_name": f"{model}-{method}", "data": "digits",
                     "model": model, "method": method, "hardware": hardware, "seed": seed,
                     "test_acc": 95.0 - (1.5 if method == "agp" else 0.5 if compressed else 0.0) - seed * 0.1,
                     "acc_drop": (1.5 if method == "agp" else 0.5 if compressed else 0.0) + seed * 0.1,
                     "acc_drop_ci95_high": 2.0 if compressed else 0.0,
                     "compression_ratio": {"baseline": 1.0, "magnitude": 3.0, "agp": 8.0}[method],
                     "latency_ms_p50_bs1": (2.0 if hardware == "cpu_1t" else 1.0) * (0.9 if compressed else 1.0),
                     "speedup_bs1": 1.1 if compressed else 1.0, "sparsity": 0.0 if not compressed else 0.8})
    return pd.DataFrame(rows)


@pytest.mark.parametrize(("budget", "conservative", "expected"), [
    (2.0, False, "agp"),          # 1.5-1.6 points: within budget, and the most compressed
    (1.0, False, "magnitude"),    # agp is over budget
    (1.0, True, "baseline"),      # judged by the upper end of the interval (2.0) nothing compressed fits
])
def test_best_under_budget(budget: float, conservative: bool, expected: str) -> None:
    best = analysis.best_under_budget(_grid_frame(), budget, conservative=conservative)
    assert len(best) == 4  # one per (data, model, hardware)
    assert set(best["method"]) == {expected}
    assert (best["seed"] == 0).all()  # among equal ratios, the smaller drop wins


def test_grid_overview_draws_and_renders_every_figure(tmp_path: Path) -> None:
    overview = analysis.grid_overview(_grid_frame(), budget=1.0)

    assert set(overview.figures) == {"accuracy_vs_compression", "accuracy_vs_latency", "heatmaps"}
    assert all(isinstance(figure, Figure) for figure in overview.figures.values())
    for name, figure in overview.figures.items():
        assert analysis.figure_png(figure, tmp_path / f"{name}.png").read_bytes().startswith(PNG_MAGIC)
    assert overview.figures["accuracy_vs_compression"].axes[0].get_xscale() == "log"
    assert len(overview.figures["accuracy_vs_latency"].axes) == 2  # one panel per hardware
    assert len(overview.figures["heatmaps"].axes) == 6  # 2 hardware x 3 metrics
    compression_front = overview.fronts["accuracy_vs_compression"]
    assert set(compression_front["method"]) == {"baseline", "magnitude", "agp"}
    assert (compression_front["seed"] == 0).all()
    latency_front = overview.fronts["accuracy_vs_latency"]
    assert set(latency_front["hardware"]) == {"cpu", "cpu_1t"}
    assert "latency_ms_p50_bs1" in latency_front
    assert set(overview.best["method"]) == {"magnitude"}


def test_heatmaps_average_over_seeds_and_tell_datasets_apart() -> None:
    runs = _grid_frame()
    runs = pd.concat([runs, runs.assign(data="mnist5k", acc_drop=runs["acc_drop"] + 2)])
    figure = analysis.metric_heatmaps(runs[runs["hardware"] == "cpu"], metrics=("acc_drop",))
    ax = figure.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["digits/lenet300", "digits/lenet5", "mnist5k/lenet300", "mnist5k/lenet5"]
    cells = [float(t.get_text()) for t in ax.texts]
    assert pytest.approx(0.55) in cells and pytest.approx(2.55) in cells  # magnitude: mean of 0.5 and 0.6
    # every cell of a row averages 2 seeds: the row says so once
    assert [t.get_text() for t in ax.get_yticklabels()] == ["agp  n=2", "baseline  n=2", "magnitude  n=2"]
    uneven = runs[(runs["hardware"] == "cpu") & ~((runs["model"] == "lenet5") & (runs["seed"] == 1))]
    texts = [t.get_text() for t in analysis.metric_heatmaps(uneven, metrics=("acc_drop",)).axes[0].texts]
    assert texts[:4] == ["1.55\nn=2", "1.5\nn=1", "3.55\nn=2", "3.5\nn=1"]  # n differs along the row: in each cell


def test_grid_overview_of_no_runs_still_draws(tmp_path: Path) -> None:
    overview = analysis.grid_overview(analysis.tidy_runs([]), budget=1.0)
    assert set(overview.figures) == {"accuracy_vs_compression", "accuracy_vs_latency", "heatmaps"}
    assert all(front.empty for front in overview.fronts.values()) and overview.best.empty
    assert analysis.figure_png(overview.figures["heatmaps"], tmp_path / "h.png").read_bytes().startswith(PNG_MAGIC)


def test_scatter_survives_runs_without_the_metric() -> None:
    figure = analysis.accuracy_vs_latency(_grid_frame().drop(columns=["latency_ms_p50_bs1"]))
    assert "no runs with these metrics" in [t.get_text() for t in figure.axes[0].texts]


# ----------------------------------------------------------------------------- the sweep's parent run


def test_log_sweep_figures_puts_the_overview_on_the_parent_run(grid_store: FakeStore) -> None:
    info = SweepInfo("s1", grid_store.uri, EXPERIMENT, grid_store.parent)
    logged = analysis.log_sweep_figures(info, budget=1.0)

    assert "figures/accuracy_vs_compression.png" in logged and "figures/best_within_1pt_drop.csv" in logged
    stored = {a.path for a in grid_store.client.list_artifacts(grid_store.parent, "figures")}
    assert stored == set(logged)
    best = pd.read_csv(grid_store.client.download_artifacts(grid_store.parent, "figures/best_within_1pt_drop.csv"))
    assert sorted(best["method"]) == ["magnitude", "magnitude"]


def test_log_sweep_figures_warns_and_never_raises(grid_store: FakeStore, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts today")

    monkeypatch.setattr(analysis, "grid_overview", broken)
    info = SweepInfo("s1", grid_store.uri, EXPERIMENT, grid_store.parent)
    with caplog.at_level(logging.WARNING, logger="lightning_modules.analysis"):
        assert analysis.log_sweep_figures(info) == []
    assert "could not log the figures of sweep s1 (RuntimeError: no fonts today)" in caplog.text
    assert grid_store.client.list_artifacts(grid_store.parent, "figures") == []


def test_log_sweep_figures_of_an_empty_sweep_logs_nothing(fake_store: FakeStore) -> None:
    parent = fake_store.add_run({"sweep": "empty", "role": "sweep"})
    assert analysis.log_sweep_figures(SweepInfo("empty", fake_store.uri, EXPERIMENT, parent)) == []


# ----------------------------------------------------------------------------- one run in depth


LAYERS_CSV = "layer,type,sparsity\nfc1,Linear,0.5\nfc2,Linear,0.0\n"
QUANT_CSV = "layer,bits,sparsity\nfc2,8,0.9\nfc1,4,0.9\n"
LOWRANK_CSV = "layer,rank\nfc1,16\nfc3.u,4\n"


def test_layer_facts_join_every_summary_in_layer_order(fake_store: FakeStore) -> None:
    run_id = fake_store.add_run({}, artifacts={"layers.csv": LAYERS_CSV, "quant_summary.csv": QUANT_CSV,
                                               "svd_summary.csv": LOWRANK_CSV, "encoding.csv": "tensor\nx\n"})
    facts = analysis.layer_facts(run_id, fake_store.uri)

    assert facts["layer"].tolist() == ["fc1", "fc2", "fc3.u"]
    assert facts["sparsity"].tolist()[:2] == [0.5, 0.0]  # layers.csv wins over a summary's copy
    assert facts["bits"].tolist()[:2] == [4, 8] and facts["rank"].tolist()[0] == 16
    figure = analysis.plot_layer_facts(facts)
    assert [ax.get_title() for ax in figure.axes] == ["sparsity per layer", "bits per layer", "rank per layer"]


def test_layer_facts_without_tables_is_an_error(fake_store: FakeStore) -> None:
    run_id = fake_store.add_run({})
    with pytest.raises(ValueError, match=f"run {run_id} has no layers.csv"):
        analysis.layer_facts(run_id, fake_store.uri)


def test_pick_run_prefers_the_most_compressed_non_baseline() -> None:
    runs = _grid_frame()
    assert analysis.pick_run(runs).startswith("lenet300-agp-0")
    assert analysis.pick_run(runs[runs["method"] == "baseline"]).startswith("lenet300-baseline")
    with pytest.raises(ValueError, match="no runs"):
        analysis.pick_run(runs.iloc[0:0])


def test_weight_histograms_one_panel_per_shared_layer() -> None:
    baseline = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model[0].weight.data[:4] = 0.0
    figure = analysis.weight_histograms(model, baseline)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles == ["0: 50% zero", "2: 0% zero"]


def test_confusion_matrices_score_the_run_test_split() -> None:
    cfg = compose_config([*FAST, "model=lenet300"])
    data_shape = (1, 8, 10)
    model, baseline = LeNet300(*data_shape), LeNet300(*data_shape)
    confusion = analysis.confusion_matrices(analysis.RunModels("r", model, baseline, cfg))

    assert confusion.model.shape == (10, 10) and confusion.labels == list(range(10))
    assert confusion.model.sum() == confusion.baseline.sum() == 539  # digits: 30% of 1,797 images
    assert confusion.model.sum(axis=1).tolist() == confusion.baseline.sum(axis=1).tolist()  # same true labels
    figure = analysis.plot_confusion(confusion)
    assert figure.axes[2].get_title() == "finalized - baseline"


# ----------------------------------------------------------------------------- statistics


def test_mean_interval_is_the_student_t_interval() -> None:
    values = [1.0, 2.0, 4.0]
    mean, low, high = analysis.mean_interval(values)
    expected = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(7 / 3) and (low, high) == pytest.approx(expected)
    assert math.isnan(analysis.mean_interval([3.0])[1]) and analysis.mean_interval([3.0])[0] == 3.0
    assert all(math.isnan(v) for v in analysis.mean_interval([]))


def test_paired_difference_matches_scipy() -> None:
    values = pd.Series([90.0, 91.5, 89.0, 92.0], index=[0, 1, 2, 3])
    reference = pd.Series([91.0, 92.0, 90.5, 92.2], index=[3, 2, 1, 0]).sort_index()
    result = analysis.difference_test(values, reference)
    assert result["test"] == "paired t"
    assert result["diff"] == pytest.approx((values - reference).mean())
    assert result["p_value"] == pytest.approx(stats.ttest_rel(values, reference).pvalue)


def test_unpaired_difference_is_welch() -> None:
    values, reference = pd.Series([90.0, 91.0, 93.0], index=[0, 1, 2]), pd.Series([85.0, 88.0], index=[5, 6])
    result = analysis.difference_test(values, reference)
    assert result["test"] == "Welch t"
    assert result["p_value"] == pytest.approx(stats.ttest_ind(values, reference, equal_var=False).pvalue)
    assert result["ci_low"] < result["diff"] < result["ci_high"]


def test_one_seed_is_too_few() -> None:
    result = analysis.difference_test(pd.Series([90.0], index=[0]), pd.Series([91.0], index=[0]))
    assert result["test"] == "too few seeds" and result["diff"] == -1.0 and math.isnan(result["p_value"])


def _seeded(method: str, accuracies: list[float], model: str = "lenet300") -> list[dict]:
    return [{"data": "digits", "model": model, "hardware": "cpu", "method": method, "seed": seed, "test_acc": acc}
            for seed, acc in enumerate(accuracies)]


def test_compare_methods_tells_signal_from_noise() -> None:
    runs = pd.DataFrame(_seeded("baseline", [95.0, 96.0, 94.0, 95.5])
                        + _seeded("agp", [90.1, 91.0, 89.2, 90.4])        # ~5 points lower, every seed
                        + _seeded("magnitude", [95.5, 95.0, 94.6, 95.4])  # +-0.5: noise
                        + _seeded("agp", [90.0, 91.0], model="lenet5"))   # no reference for lenet5
    table = analysis.compare_methods(runs, "test_acc", reference="baseline").set_index("method")

    assert len(table) == 2 and set(table["model"]) == {"lenet300"}
    assert table.loc["agp", "verdict"] == "larger than the noise" and table.loc["agp", "ci_high"] < 0
    assert table.loc["magnitude", "verdict"] == "within the noise"
    assert table.loc["agp", "test"] == "paired t" and table.loc["agp", "n"] == 4


def test_seed_summary_and_spread() -> None:
    runs = pd.DataFrame(_seeded("agp", [90.0, 92.0])).assign(sparsity=[0.80001, 0.79999])
    summary = analysis.seed_summary(runs)
    assert summary.loc[0, ["n", "seeds", "mean"]].tolist() == [2, "0,1", 91.0]
    spread = analysis.seed_spread(runs)  # both seeds land on sparsity 0.8
    assert spread[["sparsity", "test_acc", "n"]].values.tolist() == [[0.8, 91.0, 2]]
    figure = analysis.plot_pruning_curves(runs)
    assert figure.axes[0].get_title() == "digits / lenet300"
    assert analysis.plot_seed_intervals(summary).axes[0].get_title() == "digits / lenet300 / cpu"


# ----------------------------------------------------------------------------- sensitivity


def test_no_sensitivity_runs_gives_an_empty_frame(grid_store: FakeStore) -> None:
    sensitivity = analysis.load_sensitivity(grid_store.uri)
    assert sensitivity.empty and list(sensitivity.columns) == analysis.SENSITIVITY_COLUMNS


def test_sensitivity_tables_from_tagged_runs(fake_store: FakeStore, caplog: pytest.LogCaptureFixture) -> None:
    csv = "layer,sparsity,test_acc\nfc1,0.5,95.0\nfc1,0.9,80.0\nfc2,0.5,96.0\nfc2,0.9,94.0\n"
    tags = {"role": "sensitivity", "data": "digits", "model": "lenet300", "method": "magnitude"}
    fake_store.add_run({**tags, "seed": "0"}, artifacts={"sensitivity.csv": csv})
    fake_store.add_run({**tags, "seed": "1"}, artifacts={"sensitivity.csv": csv.replace("80.0", "82.0")})
    missing = fake_store.add_run({**tags, "seed": "2"})
    fake_store.add_grid_run("lenet300", "magnitude", 0)  # not a sensitivity run

    with caplog.at_level(logging.WARNING, logger="lightning_modules.analysis"):
        sensitivity = analysis.load_sensitivity(fake_store.uri)
    assert f"sensitivity run {missing} has no sensitivity.csv" in caplog.text
    assert len(sensitivity) == 8 and set(sensitivity["seed"]) == {"0", "1"}
    table = analysis.sensitivity_table(sensitivity)
    assert table.loc[("digits", "lenet300", "fc1"), 0.9] == 81.0
    assert list(table.columns) == [0.5, 0.9]
    assert len(analysis.plot_sensitivity(sensitivity).axes) == 1
    # sensitivity runs are not grid runs
    assert len(analysis.load_runs(fake_store.uri)) == 1


# ----------------------------------------------------------------------------- configurations, trust


AGP_ACCURACY = {0.8: 97.0, 0.9: 96.0, 0.95: 93.0}  # per sparsity; each seed adds seed * 0.3 points


def _agp_params(sparsity: float, seed: int) -> dict[str, str]:
    """What config_params logs for an agp run: the knob, its interpolated copy, a seed copy, where files went."""
    return {"method.name": "agp", "method.sparsity": str(sparsity),
            "method.callbacks.prune.final_sparsity": str(sparsity),
            "method.fine_tune.epochs": "4", "seed": str(seed), "data.split_seed": str(seed),
            "paths.root": f"/somewhere/{seed}", "trainer.accelerator": "cpu"}


@pytest.fixture
def agp_store(fake_store: FakeStore) -> FakeStore:
    """agp at sparsity 0.8, 0.9, 0.95 x seeds 0, 1, 2 (one timed under contention), the baselines, and an agp
    run at 0.9 that FAILED with a wild accuracy that must never reach a mean."""
    tags = {"data": "digits", "model": "lenet5", "hardware": "cpu", "sweep": "s1"}
    for seed in range(3):
        fake_store.add_run({**tags, "method": "baseline", "seed": str(seed)},
                           {"test_acc": 98.0, "acc_drop": 0.0, "compression_ratio": 1.0, "speedup_bs1": 1.0},
                           {"method.name": "baseline", "seed": str(seed), "data.split_seed": str(seed)})
        for sparsity, accuracy in AGP_ACCURACY.items():
            noisy = {"latency_noisy": "true"} if (sparsity, seed) == (0.95, 2) else {}
            fake_store.add_run({**tags, "method": "agp", "seed": str(seed), **noisy},
                               {"test_acc": accuracy + 0.3 * seed, "acc_drop": 98.0 - accuracy - 0.3 * seed,
                                "compression_ratio": 1 / (1 - sparsity), "sparsity": sparsity,
                                "latency_ms_p50_bs1": 1.0, "speedup_bs1": 1.5 if noisy else 1.0},
                               _agp_params(sparsity, seed))
    failed = fake_store.add_run({**tags, "method": "agp", "seed": "3"}, {"test_acc": 10.0, "compression_ratio": 10.0},
                                _agp_params(0.9, 3), status="FAILED")
    fake_store.client.set_tag(failed, "error", "RuntimeError: collapsed to chance")
    fake_store.failed = failed
    return fake_store


def test_cells_are_configurations_averaged_over_seeds_only(agp_store: FakeStore) -> None:
    runs = analysis.load_runs(agp_store.uri, statuses=None)  # the FAILED run is in the frame, and still not counted
    summary = analysis.config_summary(runs, mark_noisy=False)

    agp = summary[summary["method"] == "agp"]
    assert agp["knobs"].tolist() == ["sparsity=0.8", "sparsity=0.9", "sparsity=0.95"]
    assert agp["n"].tolist() == [3, 3, 3] and set(agp["seeds"]) == {"0,1,2"}
    assert agp["test_acc"].tolist() == pytest.approx([a + 0.3 for a in AGP_ACCURACY.values()])  # seeds 0..2
    assert agp["compression_ratio"].tolist() == pytest.approx([5.0, 10.0, 20.0])
    assert summary[summary["method"] == "baseline"]["knobs"].tolist() == [""]  # nothing varies: no label
    configs = set(analysis.load_runs(agp_store.uri)["config"])
    assert configs == {"baseline", "agp sparsity=0.8", "agp sparsity=0.9", "agp sparsity=0.95"}


def test_heatmap_rows_are_configurations_with_their_seed_count(agp_store: FakeStore) -> None:
    runs = analysis.load_runs(agp_store.uri, statuses=None)
    figure = analysis.metric_heatmaps(runs, metrics=("test_acc", "speedup_bs1"))
    accuracy, speedup = figure.axes
    assert [t.get_text() for t in accuracy.get_yticklabels()] == \
        ["agp sparsity=0.8  n=3", "agp sparsity=0.9  n=3", "agp sparsity=0.95  n=3", "baseline  n=3"]
    assert [t.get_text() for t in accuracy.texts] == ["97.3", "96.3", "93.3", "98"]
    assert [t.get_text() for t in speedup.texts] == ["1", "1", "1.17*", "1"]
    assert "latency_noisy" in figure.get_suptitle()


def test_failed_runs_are_listed_apart_with_their_error(agp_store: FakeStore) -> None:
    killed = agp_store.add_run({"data": "digits", "model": "lenet5", "hardware": "cpu", "method": "agp", "seed": "4"},
                               status="KILLED")  # params are logged at the end: a run cut short has none
    left_out = analysis.unfinished_runs(agp_store.uri)
    assert left_out[["run_id", "status", "knobs", "error"]].values.tolist() == \
        [[killed, "KILLED", "", ""], [agp_store.failed, "FAILED", "sparsity=0.9", "RuntimeError: collapsed to chance"]]
    everything = analysis.load_runs(agp_store.uri, statuses=None)
    # neither a Pareto front, nor the best-run table, nor a seed summary takes the FAILED run's figures
    front = analysis.pareto_front(everything, "compression_ratio", "test_acc", x_larger_better=True)
    assert agp_store.failed not in set(front["run_id"])
    assert agp_store.failed not in set(analysis.best_under_budget(everything, budget=100.0)["run_id"])
    assert analysis.seed_summary(everything)["n"].max() == 3
    assert analysis.grid_overview(everything).configs["n"].tolist() == [3, 3, 3, 3]


def test_latency_noisy_runs_are_marked(agp_store: FakeStore) -> None:
    runs = analysis.load_runs(agp_store.uri)
    assert runs["latency_noisy"].sum() == 1

    marked = analysis.config_summary(runs).set_index("knobs")
    assert marked.loc["sparsity=0.95", "speedup_bs1"] == "1.17*" and marked.loc["sparsity=0.9", "speedup_bs1"] == "1"
    assert marked.loc["sparsity=0.95", "latency_noisy"] == 1
    table = analysis.grid_table(runs)
    assert table["speedup_bs1"].str.endswith("*").sum() == 1 and table["knobs"].str.len().gt(0).sum() == 9
    figure = analysis.accuracy_vs_latency(runs)
    rings = [c for c in figure.axes[0].collections if c.get_hatch() == "////"]
    assert len(rings) == 1 and len(rings[0].get_offsets()) == 1
    assert "latency_noisy" in figure.get_suptitle()
    assert "latency_noisy" not in analysis.accuracy_vs_latency(runs.assign(latency_noisy=False)).get_suptitle()
    best = analysis.grid_overview(runs, budget=100.0).best  # the most compressed run is the one timed under contention
    assert best[["knobs", "seed", "speedup_bs1", "latency_noisy"]].values.tolist() == \
        [["sparsity=0.95", 2, "1.5*", True]]


@pytest.mark.parametrize(("tag", "noisy"), [("true", True), ("timed while 3 other jobs ran", True),
                                            ("false", False), ("", False), (None, False)])
def test_latency_noisy_tag_values(fake_store: FakeStore, tag: str | None, noisy: bool) -> None:
    fake_store.add_run({"method": "agp", **({"latency_noisy": tag} if tag is not None else {})})
    assert analysis.load_runs(fake_store.uri)["latency_noisy"].tolist() == [noisy]


def _knob_frame(rows: list[dict]) -> pd.DataFrame:
    base = {"data": "digits", "hardware": "cpu", "status": "FINISHED", "test_acc": 90.0}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_knobs_are_what_varies_within_a_method() -> None:
    runs = _knob_frame(
        [{"model": model, "method": "svd", "seed": seed, "params.method.rank": rank, "params.model.net.width": width,
          "params.trainer.limit_train_batches": batches, "params.trainer.enable_progress_bar": str(seed == 0)}
         for model, width in (("lenet300", 300), ("lenet5", 6)) for seed in (0, 1)
         for rank, batches in ((4, 10), (16, 10), (16, 5))]
        + [{"model": "lenet5", "method": "kd", "seed": 0, "params.method.rank": np.nan}])
    assert analysis.config_knobs(runs) == {"svd": ["params.method.rank", "params.trainer.limit_train_batches"]}
    labelled = analysis.with_configs(runs)
    assert analysis.config_order(labelled["config"]) == [
        "kd", "svd rank=4 trainer.limit_train_batches=10", "svd rank=16 trainer.limit_train_batches=5",
        "svd rank=16 trainer.limit_train_batches=10"]
    assert analysis.with_configs(runs, leave_out=["rank"])["knobs"].unique().tolist() == \
        ["trainer.limit_train_batches=10", "trainer.limit_train_batches=5", ""]


def test_knob_names_are_the_shortest_unambiguous_suffix() -> None:
    names = analysis._knob_names(["params.method.callbacks.prune.frequency", "params.method.callbacks.quant.bits",
                                  "params.method.fine_tune.epochs", "params.method.teacher.fine_tune.epochs",
                                  "params.data.augment"])
    assert list(names.values()) == ["frequency", "bits", "fine_tune.epochs", "teacher.fine_tune.epochs", "data.augment"]


def test_a_knob_only_missing_from_some_runs_reads_unset() -> None:
    runs = _knob_frame([{"model": "lenet5", "method": "agp", "seed": 0, "params.method.sparsity": 0.9,
                         "params.method.name": "agp"},
                        {"model": "lenet5", "method": "agp", "seed": 1, "params.method.sparsity": np.nan,
                         "params.method.name": "agp"}])
    assert analysis.with_configs(runs)["config"].tolist() == ["agp sparsity=0.9", "agp sparsity=unset"]


def test_distillation_rows_show_the_teacher_when_logged() -> None:
    runs = _knob_frame(
        [{"model": "lenet5", "method": "kd", "seed": seed, "test_acc": 96.0 + seed, "teacher_test_acc": 98.0,
          "acc_drop_vs_teacher": 2.0 - seed, "compression_ratio_vs_teacher": 4.0, "speedup_bs32_vs_teacher": 2.5}
         for seed in (0, 1)]
        + [{"model": "lenet5", "method": "agp", "seed": 0, "test_acc": 97.0}])
    summary = analysis.config_summary(runs, mark_noisy=False).set_index("method")
    assert summary.loc["kd", ["teacher_test_acc", "acc_drop_vs_teacher", "compression_ratio_vs_teacher",
                              "speedup_bs32_vs_teacher"]].tolist() == [98.0, 1.5, 4.0, 2.5]
    assert math.isnan(summary.loc["agp", "teacher_test_acc"])
    assert analysis.teacher_table(runs)["method"].tolist() == ["kd"]
    assert "acc_drop_vs_teacher" in analysis.grid_table(runs)
    # runs from before those metrics existed: no teacher columns, no error
    older = runs.drop(columns=list(analysis.TEACHER_METRICS))
    assert analysis.teacher_table(older).empty
    assert not set(analysis.TEACHER_METRICS) & set(analysis.config_summary(older).columns)
    assert not set(analysis.TEACHER_METRICS) & set(analysis.grid_table(older).columns)


def test_compare_configurations_with_the_reference(agp_store: FakeStore) -> None:
    runs = analysis.load_runs(agp_store.uri)
    table = analysis.compare_methods(runs, "test_acc", reference="baseline")
    assert table["knobs"].tolist() == ["sparsity=0.8", "sparsity=0.9", "sparsity=0.95"]
    assert table["diff"].tolist() == pytest.approx([-0.7, -1.7, -4.7])  # agp's seeds gain 0.3 a seed, baselines not
    assert (table["test"] == "paired t").all() and (table["n"] == 3).all()
    against_agp = analysis.compare_methods(runs, "test_acc", reference="agp sparsity=0.9")
    assert set(against_agp["reference"]) == {"agp sparsity=0.9"} and len(against_agp) == 3
    with pytest.raises(ValueError, match=r"reference='agp' has 3 configurations in .*: agp sparsity=0.8, "
                                         r"agp sparsity=0.9, agp sparsity=0.95; name one of them"):
        analysis.compare_methods(runs, "test_acc", reference="agp")


def test_pruning_curves_keep_other_knobs_apart() -> None:
    runs = _knob_frame([{"model": "lenet5", "method": "agp", "seed": seed, "sparsity": sparsity,
                         "params.method.sparsity": sparsity, "params.method.fine_tune.epochs": epochs,
                         "test_acc": 90.0 + epochs + seed}
                        for sparsity in (0.8, 0.9) for epochs in (1, 4) for seed in (0, 1)])
    spread = analysis.seed_spread(runs)
    assert spread[["knobs", "sparsity", "test_acc", "n"]].values.tolist() == [
        ["epochs=1", 0.8, 91.5, 2], ["epochs=1", 0.9, 91.5, 2], ["epochs=4", 0.8, 94.5, 2], ["epochs=4", 0.9, 94.5, 2]]
    legend = [t.get_text() for t in analysis.plot_pruning_curves(runs).axes[0].get_legend().get_texts()]
    assert legend == ["agp epochs=1", "agp epochs=4"]


def test_the_sweep_logs_its_configurations(agp_store: FakeStore) -> None:
    parent = agp_store.add_run({"sweep": "s1", "role": "sweep"})
    logged = analysis.log_sweep_figures(SweepInfo("s1", agp_store.uri, EXPERIMENT, parent))
    assert "figures/configurations.csv" in logged
    table = pd.read_csv(agp_store.client.download_artifacts(parent, "figures/configurations.csv"))
    assert table["n"].tolist() == [3, 3, 3, 3] and table["latency_noisy"].sum() == 1


# ----------------------------------------------------------------------------- Deep Compression beside the paper


def _dc_frame(rows: list[dict]) -> pd.DataFrame:
    base = {"data": "mnist5k", "hardware": "cpu_1t", "status": "FINISHED", "method": "deep_compression"}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_deep_compression_stages_sit_beside_the_papers_rows() -> None:
    runs = _dc_frame(
        [{"model": "lenet300", "seed": seed, "compression_ratio_pruned": 12.0 + seed, "compression_ratio_quantized": 36.0,
          "compression_ratio_huffman": 48.0 + 2 * seed, "test_acc": 96.0 + seed, "baseline_test_acc": 95.0,
          "acc_drop": -1.0 - seed, "bits_per_weight": 8.0} for seed in (0, 1)]
        + [{"model": "lenet300", "seed": 2, "status": "FAILED", "compression_ratio_huffman": 1000.0},  # never counted
           {"model": "lenet300", "seed": 0, "method": "agp", "compression_ratio_huffman": 1000.0},   # another method
           {"model": "resnet8", "seed": 0, "compression_ratio_huffman": 20.0, "test_acc": 90.0}])    # no paper row
    stages = analysis.deep_compression_stages(runs)

    assert stages["source"].tolist() == ["paper", "mnist5k cpu_1t", "mnist5k cpu_1t"]
    paper, ours = stages.iloc[0], stages.iloc[1]
    assert paper[["pruned", "quantized", "huffman", "error_before", "error_after"]].tolist() == [12, 32, 40, 1.64, 1.58]
    assert paper["acc_drop"] == pytest.approx(-0.06)
    assert ours[["n", "seeds", "pruned", "quantized", "huffman"]].tolist() == [2, "0,1", 12.5, 36.0, 49.0]
    assert ours[["error_before", "error_after", "acc_drop"]].tolist() == [5.0, 3.5, -1.5]
    assert stages.iloc[2]["model"] == "resnet8" and math.isnan(stages.iloc[2]["pruned"])
    figure = analysis.plot_deep_compression_stages(stages)
    assert [ax.get_title() for ax in figure.axes] == ["lenet300: compression ratio after each stage",
                                                      "resnet8: compression ratio after each stage"]


def test_deep_compression_stages_of_no_run_is_an_empty_frame() -> None:
    stages = analysis.deep_compression_stages(_dc_frame([{"model": "lenet5", "seed": 0, "method": "agp"}]))
    assert stages.empty and stages.columns.tolist() == analysis.STAGE_COLUMNS
    assert analysis.deep_compression_stages(pd.DataFrame()).empty
    analysis.plot_deep_compression_stages(stages)  # draws an empty panel, no error


CLUSTER_CSV = ("layer,weights,kept_percent,distinct_values,index_bits,bytes_dense,bytes_pruned,bytes_quantized,"
               "bytes_huffman,huffman_bits_per_index,huffman_bits_per_value,skipped\n"
               "features.0,100,50.0,20,8,400,300,100,80,2.0,6.0,\n"
               "classifier.3,1000,10.0,30,5,4000,1000,200,100,4.0,4.0,\n")


def test_deep_compression_layers_total_and_the_papers_kept_fractions(fake_store: FakeStore) -> None:
    run_id = fake_store.add_run({"model": "lenet5", "method": "deep_compression"},
                                artifacts={"cluster_summary.csv": CLUSTER_CSV})
    layers = analysis.deep_compression_layers(run_id, fake_store.uri)

    assert layers.columns.tolist() == analysis.LAYER_STAGE_COLUMNS
    assert layers["layer"].tolist() == ["features.0", "classifier.3", "total"]
    assert layers["paper_kept_percent"].tolist()[0] == 66.0  # the paper's conv1
    assert layers["paper_kept_percent"].isna().tolist()[1:] == [True, True]  # the paper's LeNet-5 has no such layer
    total = layers.iloc[-1]
    # 50 + 100 weights kept of 1100; bits weighted by them
    assert total[["weights", "bytes_dense", "bytes_huffman"]].tolist() == [1100, 4400, 180]
    assert total["kept_percent"] == pytest.approx(100 * 150 / 1100)
    assert total["huffman_bits_per_index"] == pytest.approx((50 * 2.0 + 100 * 4.0) / 150)
    assert layers["ratio"].tolist() == pytest.approx([5.0, 40.0, 4400 / 180])


def test_deep_compression_layers_of_an_unclustered_run_is_an_error(fake_store: FakeStore) -> None:
    run_id = fake_store.add_run({"model": "lenet5", "method": "agp"}, artifacts={"layers.csv": LAYERS_CSV})
    with pytest.raises(ValueError, match=f"run {run_id} has no cluster_summary.csv: not a clustered"):
        analysis.deep_compression_layers(run_id, fake_store.uri)

"""The best run of a sweep within an accuracy budget, registered in the MLflow Model Registry.

    best = pick_best(runs, max_drop=1.0, objective="compression")            # or "speed", hardware="cpu"
    version = register(best, name="lenet-best", tracking_uri=..., ...)

A candidate is a FINISHED run of the sweep whose drop against its dense baseline is within the
budget (`acc_drop <= max_drop`, or the upper end of its paired 95% interval with `conservative`),
that logged its MLflow model (mlflow_model.py) and that is not at chance. Among them the most
compressed (compression_ratio) or the fastest (latency p50 at one batch size on one hardware) wins,
the smaller drop breaking ties (analysis.best_under_budget). The version registered is the run's
logged pyfunc model (`models:/<model_id>`: raw pixels in, probabilities out), its figures as tags,
and a description that says how each figure was measured.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from lightning_modules.analysis import LATENCY_NOISY_TAG, quiet_downloads, best_under_budget, counted, open_client
from lightning_modules.contract import (
    ACC_DROP, ACC_DROP_CI95_HIGH, ACC_DROP_CI95_LOW, BASELINE_TEST_ACC, CHANCE_MARGIN_POINTS, COMPRESSION_RATIO, DATA_TAG,
    GIT_COMMIT_TAG,
    HARDWARE_TAG, METHOD_TAG, MLFLOW_MODEL_NAME, MODEL_TAG, NOISY_REASON_COLUMN, SEED_TAG, SIZE_BYTES, SWEEP_TAG,
    TEST_ACC, TEST_ACC_ONNX, TEST_IMAGES, latency_ms_p50, latency_ms_p95, resolve_store_uri, speedup,
)
from lightning_modules.mlflow_model import using_store



@dataclass(frozen=True)
class Objective:
    """What "best" means: a metric and its direction."""

    name: str
    metric: str
    larger_better: bool
    words: str  # for the description


def objective(name: str, batch: int = 1) -> Objective:
    """`compression` (the largest compression_ratio) or `speed` (the lowest p50 latency at `batch`)."""
    objectives = {
        "compression": Objective("compression", COMPRESSION_RATIO, True, "the most compressed (compression_ratio)"),
        "speed": Objective("speed", latency_ms_p50(batch), False,
                           f"the fastest (lowest {latency_ms_p50(batch)}: median latency at batch {batch})"),
    }
    if name not in objectives:
        raise ValueError(f"objective={name!r} is not valid; allowed: {', '.join(objectives)}")
    return objectives[name]


@dataclass(frozen=True)
class Choice:
    """The chosen run and how it was chosen."""

    run: pd.Series  # its row of analysis.load_runs
    model_id: str  # its logged pyfunc model
    objective: Objective
    max_drop: float
    conservative: bool
    hardware: str | None
    candidates: int  # runs within the budget that could be registered
    passed_over: list[str]  # why better-ranked runs were not taken

    @property
    def run_id(self) -> str:
        return str(self.run["run_id"])

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_id}"


def pick_best(runs: pd.DataFrame, max_drop: float, objective_name: str = "compression", hardware: str | None = None,
              batch: int = 1, conservative: bool = False, tracking_uri: str | None = None) -> Choice:
    """The best run of `runs` (one sweep's, from analysis.load_runs) within `max_drop` points; the
    store at `tracking_uri` (as analysis.open_client resolves it) holds their logged models.

    Raises:
        ValueError: a bad objective or hardware, or no run within the budget that can be registered.
    """
    goal = objective(objective_name, batch)
    runs = counted(runs)
    hardware = _hardware(runs, hardware, required=goal.name == "speed")
    if hardware is not None:
        runs = runs[runs[HARDWARE_TAG] == hardware]
    drop = ACC_DROP_CI95_HIGH if conservative else ACC_DROP
    within = int((runs[drop] <= max_drop).sum()) if drop in runs else 0
    client = open_client(tracking_uri)
    passed_over: list[str] = []
    while True:
        # the best of each sweep, then the best of those (runs of several sweeps: the best overall)
        best = best_under_budget(runs, max_drop, goal.metric, goal.larger_better, by=(SWEEP_TAG,),
                                 conservative=conservative)
        best = best.sort_values([goal.metric, ACC_DROP], ascending=[not goal.larger_better, True])
        if best.empty:
            raise ValueError(f"no FINISHED run{f' on hardware={hardware}' if hardware else ''} is within the budget "
                             f"({drop} <= {max_drop:g} points) and can be registered"
                             f"{': ' + '; '.join(passed_over) if passed_over else ''}")
        row = runs[runs["run_id"] == best.iloc[0]["run_id"]].iloc[0]
        reason, model_id = why_unusable(row, client, resolve_store_uri(tracking_uri))
        if reason is None:
            return Choice(row, model_id, goal, max_drop, conservative, hardware, within, passed_over)
        passed_over.append(f"{row['run_name']} ({row['run_id']}): {reason}")
        runs = runs[runs["run_id"] != row["run_id"]]


def _hardware(runs: pd.DataFrame, hardware: str | None, required: bool) -> str | None:
    measured = sorted(runs[HARDWARE_TAG].dropna().unique()) if HARDWARE_TAG in runs else []
    if hardware is not None and hardware not in measured:
        raise ValueError(f"hardware={hardware!r} is not valid for these runs; allowed: {', '.join(measured) or 'none'}")
    if hardware is None and required:
        if len(measured) != 1:
            raise ValueError(f"objective=speed compares latencies on one hardware: name it (--hardware); "
                             f"these runs were measured on: {', '.join(measured) or 'none'}")
        return measured[0]
    return hardware


def why_unusable(row: pd.Series, client: MlflowClient, uri: str) -> tuple[str | None, str | None]:
    """(why the run cannot be registered, or None; its logged pyfunc model's id)."""
    run = client.get_run(str(row["run_id"]))
    models = [client.get_logged_model(output.model_id) for output in (run.outputs.model_outputs if run.outputs else [])]
    model = next((m for m in models if m.name == MLFLOW_MODEL_NAME), None)
    if model is None:
        return f"it logged no MLflow model named {MLFLOW_MODEL_NAME!r} (a run from before the models were logged)", None
    classes = _output_classes(model.artifact_location, uri)
    chance = 100.0 / classes
    if row[TEST_ACC] <= chance + CHANCE_MARGIN_POINTS:
        return (f"test_acc {row[TEST_ACC]:.1f}% is within {CHANCE_MARGIN_POINTS:g} points of chance "
                f"({chance:.1f}%, {classes} classes)"), None
    return None, model.model_id


def _output_classes(artifact_location: str, uri: str) -> int:
    """The number of classes the logged model's signature outputs (its MLmodel file, read alone)."""
    import mlflow.artifacts
    from mlflow.models import Model

    with tempfile.TemporaryDirectory() as folder, quiet_downloads():
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{artifact_location}/MLmodel", dst_path=folder,
                                                   tracking_uri=uri)
        (output,) = Model.load(path).signature.outputs.inputs
    return int(output.shape[-1])


# ----------------------------------------------------------------------------- what the version says


def version_tags(choice: Choice) -> dict[str, str]:
    """The run's figures and identity, each as a tag of the model version."""
    row = choice.run
    figures = [TEST_ACC, BASELINE_TEST_ACC, ACC_DROP, ACC_DROP_CI95_LOW, ACC_DROP_CI95_HIGH, TEST_ACC_ONNX,
               TEST_IMAGES, COMPRESSION_RATIO, SIZE_BYTES, latency_ms_p50(1), latency_ms_p50(32), speedup(1),
               speedup(32), choice.objective.metric]
    tags = {name: f"{row[name]:.6g}" for name in dict.fromkeys(figures) if name in row and pd.notna(row[name])}
    for name in (DATA_TAG, MODEL_TAG, METHOD_TAG, HARDWARE_TAG, SEED_TAG, SWEEP_TAG, GIT_COMMIT_TAG, "knobs"):
        if name in row and pd.notna(row[name]) and str(row[name]) != "":
            tags[name] = str(row[name])
    tags.update({"run_id": choice.run_id, "objective": choice.objective.name, "max_drop": f"{choice.max_drop:g}",
                 "chosen_from": str(choice.candidates)})
    if _noisy(row):
        tags[LATENCY_NOISY_TAG] = str(row.get(NOISY_REASON_COLUMN) or "true")
    return tags


def _noisy(row: pd.Series) -> bool:
    value = row.get(LATENCY_NOISY_TAG)
    return bool(value) and pd.notna(value)


def _figure(row: pd.Series, name: str, form: str = ".2f") -> str:
    return format(row[name], form) if name in row and pd.notna(row[name]) else "not logged"


def description(choice: Choice) -> str:
    """What the version is, why it was chosen, and how every figure was measured."""
    row = choice.run
    drop = ACC_DROP_CI95_HIGH if choice.conservative else ACC_DROP
    images = f"{row[TEST_IMAGES]:.0f}" if TEST_IMAGES in row and pd.notna(row[TEST_IMAGES]) else "the"
    lines = [
        f"{row[MODEL_TAG]} compressed with {row[METHOD_TAG]}{f' ({row.knobs})' if row.get('knobs') else ''} on "
        f"{row[DATA_TAG]}, seed {row[SEED_TAG]}: run {choice.run_id} of sweep {row[SWEEP_TAG] or '(none)'}, "
        f"commit {row.get(GIT_COMMIT_TAG, 'unknown')}.",
        f"Chosen as {choice.objective.words} among {choice.candidates} FINISHED run(s)"
        f"{f' measured on hardware={choice.hardware}' if choice.hardware else ''} whose {drop} is at most "
        f"{choice.max_drop:g} point(s); runs within {CHANCE_MARGIN_POINTS:g} points of chance are never chosen.",
        f"Accuracy: test_acc {_figure(row, TEST_ACC)}% on {images} held-out test images (a stratified split "
        f"fixed by data.split_seed, the same images for every seed and method), the model as it ships: its "
        f"file read back and run on hardware={row[HARDWARE_TAG]}. Its dense baseline (same data, model and "
        f"seed) scores {_figure(row, BASELINE_TEST_ACC)}%: a drop of {_figure(row, ACC_DROP)} points, paired 95% "
        f"bootstrap interval {_figure(row, ACC_DROP_CI95_LOW)} .. {_figure(row, ACC_DROP_CI95_HIGH)} (both "
        f"models on the same images, images resampled in pairs). ONNX Runtime on model/model.onnx: "
        f"{_figure(row, TEST_ACC_ONNX)}%.",
        f"Size: {_figure(row, SIZE_BYTES, ',.0f')} bytes, the deployable file as stored (sparse and low-bit "
        f"encodings included), {_figure(row, COMPRESSION_RATIO)}x smaller than the fp32 baseline's file.",
        f"Latency on hardware={row[HARDWARE_TAG]}: p50 {_figure(row, latency_ms_p50(1), '.3f')} ms at batch 1 "
        f"(p95 {_figure(row, latency_ms_p95(1), '.3f')}), {_figure(row, latency_ms_p50(32), '.3f')} ms at batch "
        f"32; speedup {_figure(row, speedup(1))}x (batch 1) and {_figure(row, speedup(32))}x (batch 32) over the "
        f"baseline timed interleaved in the same process.",
    ]
    if _noisy(row):
        lines.append(f"The timing is marked noisy (latency_noisy): {row.get(NOISY_REASON_COLUMN) or 'see the run'}; "
                     f"re-measure before trusting the latency and speedups.")
    if choice.passed_over:
        lines.append("Ranked higher but not registered: " + "; ".join(choice.passed_over) + ".")
    lines.append("Use: mlflow.pyfunc.load_model(<this version>).predict(raw images float32 (N, C, H, W), pixels as "
                 "the dataset gives them) returns class probabilities (N, classes).")
    return "\n\n".join(lines)


def register(choice: Choice, name: str, tracking_uri: str | None = None) -> ModelVersion:
    """A new version of registered model `name` (created if missing) from the chosen run's logged model."""
    client = open_client(tracking_uri)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="The best run of a workbench sweep within an accuracy "
                                                         "budget (scripts/register_best.py); each version says how "
                                                         "it was chosen and measured.")
    with using_store(resolve_store_uri(tracking_uri)):  # the registry reads models:/ sources through it
        return client.create_model_version(name, choice.model_uri, run_id=choice.run_id, tags=version_tags(choice),
                                           description=description(choice), model_id=choice.model_id)

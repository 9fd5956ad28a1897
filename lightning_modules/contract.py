"""The names that code, scripts, notebooks and tests agree on, in one place.

A run is read back by name: notebooks and scripts look up its metrics, tags and artifacts, tests
assert them. Anything that writes or reads one of these names imports it from here, so a rename
is one edit. This module imports nothing of the package (every module may import it).

    the store       EXPERIMENT, the SQLite file's name, `resolve_store_uri`
    tags            identity tags every run carries, roles, the tags that explain a run
    metrics         the contract's metrics and the key builders of the per-batch ones
    artifacts       what a run's folder holds (model/model.pt, layers.csv, <name>_summary.csv, ...)
    figures         what a sweep's parent run holds under figures/
"""

from __future__ import annotations

import os
from pathlib import Path

# ----------------------------------------------------------------------------- the store

EXPERIMENT = "workbench"  # the MLflow experiment every run goes to
# MLflow 3's record of what an experiment is for; without it the UI may treat the experiment as
# a GenAI one (its overview of traces) instead of model training (the runs table)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
STORE_DB = "mlflow.db"  # a local store: this SQLite file, with artifacts/ beside it
STORE_ARTIFACTS = "artifacts"
URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variable: set, it names the store
SQLITE = "sqlite:///"
DEFAULT_STORE_DIR = Path(__file__).resolve().parents[1] / "mlruns"  # the checkout's store
SWEEP_FILE = "mlflow_sweep.json"  # in a sweep's folder: where its jobs log (tracking.SweepInfo)


def sqlite_uri(store_dir: str | Path) -> str:
    """The URI of the local store kept in `store_dir` (its mlflow.db)."""
    return f"{SQLITE}{Path(store_dir).resolve() / STORE_DB}"


def resolve_store_uri(explicit: str | None = None, configured: str | None = None,
                      store_dir: str | Path | None = None) -> str:
    """The store to use: an explicit URI (a notebook's or a script's tracking_uri, tracking.uri given on
    the command line) wins; then MLFLOW_TRACKING_URI; then the configured one (tracking.uri in the config
    files); else the SQLite file in `store_dir` (default: the checkout's mlruns/)."""
    return explicit or os.environ.get(URI_ENV) or configured or sqlite_uri(store_dir or DEFAULT_STORE_DIR)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI, None for any other store (a server)."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


# ----------------------------------------------------------------------------- tags

# what a run is: on every run (tracking.run_tags); notebooks group and filter by them
DATA_TAG, MODEL_TAG, METHOD_TAG, HARDWARE_TAG, SEED_TAG = "data", "model", "method", "hardware", "seed"
SWEEP_TAG = "sweep"  # the sweep's name ("" for a single run)
GIT_COMMIT_TAG, GIT_DIRTY_TAG = "git_commit", "git_dirty"
RUN_TAGS = (DATA_TAG, MODEL_TAG, METHOD_TAG, HARDWARE_TAG, SEED_TAG, SWEEP_TAG, GIT_COMMIT_TAG)

# which kind of run it is (absent on a grid's runs)
ROLE_TAG = "role"
ROLE_RUN = "run"  # what the notebooks call an untagged run: one (data, model, method, hardware, seed)
ROLE_SWEEP = "sweep"  # a sweep's parent run
ROLE_SENSITIVITY = "sensitivity"  # scripts/sensitivity.py's per-layer analysis
BASELINE_METHOD = "baseline"  # the method name of a dense baseline run

# links and explanations
JOB_TAG = "sweep_job"  # a sweep job's key (its overrides): a resumed sweep skips FINISHED jobs
BASELINE_RUN_TAG = "baseline_run_id"  # the run that trained the baseline this run started from
TEACHER_TAG = "teacher"  # where a distilled run's teacher came from (runs:/..., models:/..., file:...)
FINGERPRINT_TAG = "baseline_fingerprint"  # only on runs that trained a baseline
# which process runs it (every run; a baseline's claim is its run): a RUNNING run whose process is gone,
# or whose heartbeat (unix seconds, refreshed while it runs) is stale, is marked KILLED (liveness.py)
HOST_TAG, PID_TAG, PROCESS_START_TAG, HEARTBEAT_TAG = "host", "pid", "process_start", "heartbeat"
ERROR_TAG = "error"  # why a run FAILED (or was KILLED)
# "true" on a FAILED run whose result is not a result (collapsed, NaN loss: tracking.RunRejected); its training is
# never resumed, so a relaunch trains anew where a crashed or killed attempt's relaunch goes on from its checkpoint
REJECTED_TAG = "rejected"
CHECKPOINT_FOLDER = "checkpoints"  # in a sweep folder: each job's training checkpoints (checkpoints.py)
RESUMED_FROM_TAG = "resumed_from"  # a job's run that went on from a killed attempt's checkpoint: that attempt's run id
NOISY_TAG = "latency_noisy"  # why its timing cannot be trusted (contention), when it cannot
TIMED_ON_TAG = "timed_on"  # the processor its latencies were measured on (speedups differ between machines)
SLOWER_TAG = "slower_reason"  # why it is slower than its baseline, when it is
ONNX_ERROR_TAG = "onnx_export_error"  # why the finalized model has no model/model.onnx (the run still finishes)
JOBS_TAG, FAILED_RUNS_TAG = "jobs", "failed_runs"  # on a sweep's parent run
NOTE_TAGS = (NOISY_TAG, SLOWER_TAG, ERROR_TAG)  # the tags shown as notes under a grid
# analysis.load_runs' frame: column NOISY_TAG is a flag (the tag or a metric says so), this one the tag's text
NOISY_REASON_COLUMN = f"{NOISY_TAG}_reason"

# ----------------------------------------------------------------------------- metrics

TEST_ACC, TEST_LOSS = "test_acc", "test_loss"
BASELINE_TEST_ACC, ACC_DROP = "baseline_test_acc", "acc_drop"
ACC_DROP_CI95_LOW, ACC_DROP_CI95_HIGH = "acc_drop_ci95_low", "acc_drop_ci95_high"
PARAMS_TOTAL, PARAMS_NONZERO, SPARSITY = "params_total", "params_nonzero", "sparsity"
SIZE_BYTES, BASELINE_SIZE_BYTES, COMPRESSION_RATIO = "size_bytes", "baseline_size_bytes", "compression_ratio"
# multiply-accumulates at batch 1: of every weight; what the runtime really executes (PyTorch's dense
# kernels multiply zeros too); of the nonzero weights only (theoretical)
MACS_DENSE, MACS_EFFECTIVE, MACS_EFFECTIVE_THEORETICAL = "macs_dense", "macs_effective", "macs_effective_theoretical"
BASELINE_MACS_DENSE = "baseline_macs_dense"
LATENCY_LOAD_AVG = "latency_load_avg"  # the machine's load per core while timing
LATENCY_OTHERS_CORES = "latency_others_cores"  # cores' worth of CPU other processes used while timing
LATENCY_ATTEMPTS = "latency_attempts"  # timings taken (a noisy one is taken again: hardware.latency.retries)
INT8_KERNEL_OPS = "int8_kernel_ops"
TRAIN_TIME_S = "train_time_s"
CHANCE_MARGIN_POINTS = 2.0  # a model within this many points of chance is a collapse: FAILED, never shipped
TEST_IMAGES = "test_images"  # images in the held-out test split the accuracies are measured on
TEST_ACC_ONNX = "test_acc_onnx"  # model/model.onnx scored in ONNX Runtime on the same test split
# where a run's wall time went
TIME_DATA_S, TIME_BASELINE_S, TIME_EVALUATE_S, TIME_TRACK_S, RUN_TIME_S = (
    "time_data_s", "time_baseline_s", "time_evaluate_s", "time_track_s", "run_time_s")
TIME_ONNX_S = "time_onnx_s"  # exporting model/model.onnx and scoring it (within time_evaluate_s)
TIME_LOG_MODEL_S = "time_log_model_s"  # logging the run's MLflow models (after time_track_s)
# distillation: the student against its teacher
TEACHER_TEST_ACC, ACC_DROP_VS_TEACHER = "teacher_test_acc", "acc_drop_vs_teacher"
TEACHER_SIZE_BYTES, COMPRESSION_RATIO_VS_TEACHER = "teacher_size_bytes", "compression_ratio_vs_teacher"
# Deep Compression's stages (clustering.stage_metrics): fp32 bytes over the pruned (sparse, fp32 values), the
# pruned+clustered (indices at their bits), the Huffman-coded payload, and the real file (baseline file / file)
COMPRESSION_RATIO_PRUNED, COMPRESSION_RATIO_QUANTIZED = "compression_ratio_pruned", "compression_ratio_quantized"
COMPRESSION_RATIO_HUFFMAN = "compression_ratio_huffman"
COMPRESSION_RATIO_HUFFMAN_PAYLOAD = "compression_ratio_huffman_payload"
# Huffman-coded bits per nonzero weight: its relative position, its shared value, both
BITS_PER_INDEX, BITS_PER_VALUE, BITS_PER_WEIGHT = "bits_per_index", "bits_per_value", "bits_per_weight"

CONTRACT_BATCHES = (1, 32)  # the batch sizes the default hardware times (hardware.latency.batch_sizes)
# what the latency is of when it is not the deployed weights on kernels of their own width
DEQUANTIZED, SIMULATED = "dequantized", "simulated"


def latency_ms_p50(batch: int) -> str:
    return f"latency_ms_p50_bs{batch}"


def latency_ms_p95(batch: int) -> str:
    return f"latency_ms_p95_bs{batch}"


def latency_spread(batch: int) -> str:
    """p95 / p50 of one model's timing at that batch: 1.0 for a steady timing."""
    return f"latency_spread_bs{batch}"


def throughput(batch: int) -> str:
    return f"throughput_bs{batch}"


def speedup(batch: int) -> str:
    """baseline latency / this latency at that batch, both timed in the same process."""
    return f"speedup_bs{batch}"


def speedup_ci95(batch: int) -> tuple[str, str]:
    """The 95% interval of speedup_bs<B>: how far the timing noise leaves the speedup uncertain."""
    return f"{speedup(batch)}_ci95_low", f"{speedup(batch)}_ci95_high"


def baseline_metric(metric: str) -> str:
    """The baseline's figure beside the run's own (baseline_latency_ms_p50_bs1)."""
    return f"baseline_{metric}"


def teacher_metric(metric: str) -> str:
    """The teacher's figure beside the student's (teacher_latency_ms_p50_bs1)."""
    return f"teacher_{metric}"


def vs_teacher(metric: str) -> str:
    """A ratio or drop against the teacher instead of the baseline (speedup_bs32_vs_teacher)."""
    return f"{metric}_vs_teacher"


def labelled(label: str, metric: str) -> str:
    """A latency figure repeated under what it is of (dequantized_latency_ms_p50_bs1)."""
    return f"{label}_{metric}"


def reference_test_acc(name: str) -> str:
    """The accuracy of a model a method keeps for comparison (test_acc_fakequant)."""
    return f"{TEST_ACC}_{name}"


def layers_skipped(callback: str) -> str:
    """How many layers a method left alone (each is in its summary with the reason)."""
    return f"layers_skipped_{callback}"


def size_bytes_of(suffix: str) -> str:
    """The size of the deployable in one file format (size_bytes_pt, size_bytes_onnx)."""
    return f"{SIZE_BYTES}_{suffix.lstrip('.')}"


def latency_metrics(batch: int) -> list[str]:
    """What measure_latency gives per timed model at one batch size."""
    return [latency_ms_p50(batch), latency_ms_p95(batch), latency_spread(batch), throughput(batch)]


def contract_metrics(batches: tuple[int, ...] = CONTRACT_BATCHES) -> list[str]:
    """The metrics every finished run logs (README's metric table): notebooks and tests rely on them."""
    return [
        TEST_ACC, TEST_LOSS, BASELINE_TEST_ACC, ACC_DROP, ACC_DROP_CI95_LOW, ACC_DROP_CI95_HIGH,
        PARAMS_TOTAL, PARAMS_NONZERO, SPARSITY, SIZE_BYTES, COMPRESSION_RATIO,
        MACS_DENSE, MACS_EFFECTIVE, MACS_EFFECTIVE_THEORETICAL, TRAIN_TIME_S,
        *[name for batch in batches for name in (*latency_metrics(batch), speedup(batch), *speedup_ci95(batch))],
        LATENCY_LOAD_AVG,
    ]


TEACHER_METRICS = (TEACHER_TEST_ACC, ACC_DROP_VS_TEACHER, COMPRESSION_RATIO_VS_TEACHER, vs_teacher(speedup(32)))

# ----------------------------------------------------------------------------- artifacts

MODEL_FOLDER = "model"
MODEL_FILE = "model.pt"  # the workbench's deployable file
MODEL_ARTIFACT = f"{MODEL_FOLDER}/{MODEL_FILE}"
ONNX_FILE = "model.onnx"  # the finalized model in ONNX (normalised input, logits), where it exports
ONNX_ARTIFACT = f"{MODEL_FOLDER}/{ONNX_FILE}"
# the run's MLflow models (MLflow 3 logged models: `models:/<model_id>`, or `runs:/<run_id>/<name>`):
# both take raw pixels and return class probabilities; the first is a pyfunc over model.pt, the second
# the ONNX flavour. Not named "model": runs:/<run_id>/model would mix the run's model/ folder into it.
MLFLOW_MODEL_NAME, ONNX_MODEL_NAME = "classifier", "classifier_onnx"
LAYERS_TABLE = "layers.csv"  # per layer: shapes, parameters, MACs of the finalized model
ENCODING_TABLE = "encoding.csv"  # per tensor: how the deployable file stores it
CONFIG_ARTIFACT = "config.yaml"  # the resolved config of the run
ERROR_ARTIFACT = "error.txt"  # a FAILED run's traceback
SUMMARY_SUFFIX = "_summary.csv"
GRID_ARTIFACT = "grid.csv"  # on a sweep's parent run: one row per job
JOBS_ARTIFACT = "jobs.txt"  # on a sweep's parent run: every job's overrides
SENSITIVITY_ARTIFACT = "sensitivity.csv"  # on a role=sensitivity run


def summary_table(callback: str) -> str:
    """A method's per-layer facts (sparsity, bits, rank, skipped with the reason): `<name>_summary.csv`."""
    return f"{callback}{SUMMARY_SUFFIX}"


CLUSTER_CALLBACK = "cluster"  # clustering.WeightClustering's name: Deep Compression's per-layer stage table
CLUSTER_SUMMARY = summary_table(CLUSTER_CALLBACK)


def run_model_uri(run_id: str) -> str:
    """The MLflow URI of a run's deployable file (a teacher's source, method.teacher.uri)."""
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


# ----------------------------------------------------------------------------- figures

FIGURES_FOLDER = "figures"  # on a sweep's parent run (analysis.log_sweep_figures)
ACCURACY_VS_COMPRESSION = "accuracy_vs_compression"
ACCURACY_VS_LATENCY = "accuracy_vs_latency"
HEATMAPS = "heatmaps"
FIGURE_KEYS = (ACCURACY_VS_COMPRESSION, ACCURACY_VS_LATENCY, HEATMAPS)
CONFIGURATIONS_ARTIFACT = f"{FIGURES_FOLDER}/configurations.csv"


def figure_artifact(key: str) -> str:
    return f"{FIGURES_FOLDER}/{key}.png"


def pareto_artifact(key: str) -> str:
    return f"{FIGURES_FOLDER}/pareto_{key}.csv"


def best_artifact(budget: float) -> str:
    return f"{FIGURES_FOLDER}/best_within_{budget:g}pt_drop.csv"


# ----------------------------------------------------------------------------- searches (lightning_modules/search.py)

# on every run a search launched (its trials) and on the search's parent run: the study's name, the trial's number
STUDY_TAG, TRIAL_TAG = "study", "trial"
SEARCH_FILE = "optuna_study.json"  # in a search's sweep folder: the study its jobs are trials of
STUDY_DB = "optuna.db"  # a local store's studies: this SQLite file beside mlflow.db
# on a search's parent run
SEARCH_TRIALS_ARTIFACT = "search_trials.csv"  # one row per trial: method, knobs, objectives, feasible, on the front
SEARCH_FRONT = "search_front"  # figure_artifact(SEARCH_FRONT): the trials, the front, the budget
WINNER_RUN_TAG = "search_winner_run_id"  # the best trial within the budget (smallest / fastest)
WINNER_TRIAL_TAG = "search_winner_trial"
SEARCH_BUDGET_TAG = "search_budget"  # the accuracy budget (points of the constraint's metric)
HYPERVOLUME = "search_hypervolume"  # of the feasible front, normalised (search.hypervolume_2d)

# ----------------------------------------------------------------------------- energy (evaluation/energy.py)

# estimates: measured time x cores used x the hardware config's power model (hardware.power); named as estimates
ENERGY_J_PER_IMAGE_ESTIMATE = "energy_j_per_image_estimate"  # inference, joules per image at the largest batch timed
ENERGY_TRAIN_KJ_ESTIMATE = "energy_train_kj_estimate"  # the compression phase's training, kilojoules
# read from energy counters (RAPL under /sys/class/powercap, NVML on GPUs), where they can be read
ENERGY_J_PER_IMAGE_MEASURED = "energy_j_per_image_measured"
ENERGY_TRAIN_KJ_MEASURED = "energy_train_kj_measured"
ENERGY_SOURCE_TAG = "energy_source"  # which counter measured (rapl:..., nvml:...), or why the figures are estimates
ENERGY_METRICS = (ENERGY_J_PER_IMAGE_ESTIMATE, ENERGY_TRAIN_KJ_ESTIMATE)  # every finished run logs these

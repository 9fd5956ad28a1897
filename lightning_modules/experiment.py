"""run_experiment(cfg): one run of the workbench, in the five steps of ARCHITECTURE.md.

    1. baseline  - the trained dense model of (data, model, seed, baseline recipe), found in the
                   store or trained now and logged as its own run (and the teacher, for methods
                   that distil: another model's baseline, an MLflow URI or a file)
    2. compress  - Trainer.fit from the baseline weights with the method's callbacks
    3. finalize  - each callback turns its training-time form into the deployable form
    4. evaluate  - the contract's figures on the finalized artifact and the baseline, same process
    5. track     - metrics, tables, config and the artifact into the run
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import hydra.utils
from hydra.core.hydra_config import HydraConfig
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.checkpoints import (
    RESUMED_AT_EPOCH, ResumeNote, TrainingCheckpoints, removed_unless_resumable, safe_loading,
)
from lightning_modules.compression.base import CompressionCallback
from lightning_modules.config import build_callbacks, model_config, read_teacher_file, validate
from lightning_modules.contract import (
    ACC_DROP, ACC_DROP_CI95_HIGH, ACC_DROP_CI95_LOW, BASELINE_METHOD, BASELINE_RUN_TAG, CHANCE_MARGIN_POINTS, COMPRESSION_RATIO,
    CHECKPOINT_FOLDER, CONFIG_ARTIFACT, DEQUANTIZED, FINGERPRINT_TAG, INT8_KERNEL_OPS, JOB_TAG, MODEL_FOLDER, NOISY_TAG,
    RESUMED_FROM_TAG, RUN_TIME_S, SIMULATED, SLOWER_TAG, TEACHER_TAG, TEST_ACC, TIMED_ON_TAG,
    TIME_BASELINE_S, TIME_DATA_S, TIME_EVALUATE_S, TIME_LOG_MODEL_S, TIME_TRACK_S,
    TRAIN_TIME_S, layers_skipped, run_model_uri, speedup, speedup_ci95, summary_table,
)
from lightning_modules.contract import ENERGY_SOURCE_TAG
from lightning_modules.data import InMemoryDataModule
from lightning_modules.evaluation.artifact import FORMAT as ARTIFACT_FORMAT
from lightning_modules.evaluation.artifact import load_deployable
from lightning_modules.evaluation.complexity import count_macs
from lightning_modules.evaluation.energy import energy_report, energy_source, metered_training, open_counter, run_cores
from lightning_modules.evaluation.latency import LatencyTimer, measuring_threads, torch_threads, training_threads
from lightning_modules.evaluation.report import Report, measure
from lightning_modules.evaluation.timing_lock import StepAsideForTiming, busy, set_exclusive
from lightning_modules.liveness import end_dead_runs
from lightning_modules.mlflow_model import log_run_models
from lightning_modules.models import build_model, model_recipe
from lightning_modules.sweep import finished_job_run, trial_tags, where_to_log
from lightning_modules.task import ClassificationTask
from lightning_modules.tracking import (
    EpochMetricsLogger, RunRejected, Store, SweepInfo, TrackedRun, closing_run, config_params, csv_text,
    download_model_file, download_uri, find_baseline_run, live_claims, open_run, run_name, run_tags, scratch_dir,
    unfinished_attempts, wait_for_baseline, won_claim,
)

log = logging.getLogger(__name__)

# A finalized model within this many points of chance (100 / classes) is collapsed: its run ends
# FAILED. `run_checks.chance_margin` overrides it (null: off, for tests of the plumbing that train
# a few batches only).
INPUT_EXAMPLE_IMAGES = 2  # raw test images stored as each MLflow model's input example
SLOWER_SPEEDUP = 0.95  # below this at the largest batch (32 where timed) a run says why, tag slower_reason
# Training throughput used only to announce a teacher's rough cost: on this project's 2-core
# machines a resnet20 baseline (31M MACs per 28x28 image) trains at ~10 GMAC/s (forward + backward
# = 3x the forward MACs): a 30-epoch resnet20 teacher took about 18 minutes on 2 busy cores.
TRAINING_MACS_PER_CORE_S = 5e9


@dataclass
class RunContext:
    """What every step of one run needs: its config, where it logs, its data and device, the sweep
    (and job) it belongs to, and where its wall time went so far."""

    cfg: DictConfig
    store: Store
    data: InMemoryDataModule
    device: torch.device
    sweep: SweepInfo | None = None
    job_tags: dict[str, str] = field(default_factory=dict)  # {sweep_job: key} in a multirun
    timings: dict[str, float] = field(default_factory=dict)  # time_data_s, time_baseline_s, train_time_s
    checkpoint_root: Path | None = None  # <sweep folder>/checkpoints for a sweep's job (checkpoints.py), else None

    @property
    def sweep_name(self) -> str | None:
        return self.sweep.name if self.sweep else None

    @property
    def parent_run_id(self) -> str | None:
        return self.sweep.parent_run_id if self.sweep else None

    def run_tags(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The tags of a run of this context's config: what it is, its sweep and job, and `extra`."""
        return {**run_tags(self.cfg, self.sweep_name), **self.job_tags, **(extra or {})}

    def open_run(self, tags: dict[str, str] | None = None) -> TrackedRun:
        return open_run(self.store, run_name(self.cfg), self.run_tags(tags), self.parent_run_id)

    def checkpoints(self, name: str, attempts_filter: str) -> TrainingCheckpoints | None:
        """Where a training phase of this job checkpoints each epoch (None: a single run does not), and,
        when the store keeps them too, the earlier attempts (runs matching `attempts_filter`) to fetch from."""
        if self.checkpoint_root is None:
            return None
        in_store = self.cfg.tracking.get("checkpoints_in_store")
        if in_store is None:  # a server: a job may resume on a machine that has no copy of the sweep folder
            in_store = self.store.uri.startswith(("http://", "https://"))
        if not in_store:
            return TrainingCheckpoints(self.checkpoint_root / name)
        return TrainingCheckpoints(self.checkpoint_root / name, self.store,
                                   lambda: unfinished_attempts(self.store, attempts_filter))

    def with_cfg(self, cfg: DictConfig, job_tags: dict[str, str] | None = None) -> RunContext:
        """The same context for another config (a baseline's, a teacher's), with its own timings."""
        return replace(self, cfg=cfg, job_tags=job_tags or {}, timings=dict(self.timings))


@dataclass
class Baseline:
    model: nn.Module
    run_id: str
    metrics: dict[str, float] | None = None  # set when it was trained (and logged) in this call


def run_experiment(cfg: DictConfig) -> dict[str, float]:
    """Run one (data, model, method, hardware, seed) and return its logged metrics.

    The run computes as `busy` (evaluation/timing_lock.py): it pauses at its next batch while another
    job of this machine times a model, and they pause while it times its own.
    """
    set_exclusive(OmegaConf.select(cfg, "hardware.latency.exclusive", default=True) is not False)  # validate judges it
    with busy():
        return _run_experiment(cfg)


def _run_experiment(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    store, sweep, job = where_to_log(cfg.tracking)
    end_dead_runs(store)  # RUNNING runs of the experiment whose process is gone (kill -9, a lost node) end KILLED
    if (done := finished_job_run(store, sweep, job)) is not None:
        log.info("%s: already FINISHED in this sweep (run %s), skipped", run_name(cfg), done.info.run_id)
        return dict(done.data.metrics)
    ctx = open_context(cfg, store, sweep, job)

    baseline = None
    if cfg.method.name == BASELINE_METHOD:
        baseline = obtain_baseline(ctx, ctx.job_tags)                                              # 1. baseline
        if baseline.metrics is not None:
            return baseline.metrics  # this run trained the baseline: it is the method=baseline run
    # the run is open from here: a baseline or teacher that cannot be loaded ends it FAILED, with the reason
    checkpoints = ctx.checkpoints(ctx.job_tags.get(JOB_TAG, ""), f"tags.{JOB_TAG} = '{ctx.job_tags.get(JOB_TAG)}' "
                                  f"and tags.`{MLFLOW_PARENT_RUN_ID}` = '{ctx.parent_run_id}'")
    with closing_run(ctx.open_run()) as run, removed_unless_resumable(checkpoints):
        started = time.perf_counter()
        baseline = baseline or obtain_baseline(ctx)                                                # 1. baseline
        callbacks = build_callbacks(cfg.method, timer=LatencyTimer(measuring_threads(cfg.hardware)))
        teacher = obtain_teacher(ctx) if needs_teacher(callbacks) else None
        ctx.timings[TIME_BASELINE_S] = time.perf_counter() - started
        run.set_tags({BASELINE_RUN_TAG: baseline.run_id, **({TEACHER_TAG: teacher.source} if teacher else {}),
                      ENERGY_SOURCE_TAG: energy_source(ctx.device)})
        model = compress(ctx, run, starting_model(cfg, baseline, ctx.data), callbacks, teacher,   # 2. compress
                         checkpoints)
        model = finalize(model, callbacks)                                                         # 3. finalize
        report = evaluate(ctx, model, baseline.model, callbacks, teacher and teacher.model)        # 4. evaluate
        metrics = track(ctx, run, report)                                                          # 5. track
    return metrics


def open_context(cfg: DictConfig, store: Store, sweep: SweepInfo | None, job: str | None) -> RunContext:
    """The run's context: the hardware set up, the data read (once per process, cached)."""
    device = configure_hardware(cfg.hardware)
    started = time.perf_counter()
    data: InMemoryDataModule = hydra.utils.instantiate(cfg.data)
    data.setup()  # before any run opens
    checkpoint_root = None
    if job is not None and cfg.tracking.get("checkpoints", True):
        checkpoint_root = Path(HydraConfig.get().sweep.dir) / CHECKPOINT_FOLDER
    return RunContext(cfg, store, data, device, sweep, {JOB_TAG: job, **trial_tags(sweep)} if job else {},
                      {TIME_DATA_S: time.perf_counter() - started}, checkpoint_root)


# ----------------------------------------------------------------------------- step 1: baseline


def obtain_baseline(ctx: RunContext, tags: dict[str, str] | None = None) -> Baseline:
    """The baseline of ctx.cfg from the store, waiting while a parallel job trains it; else trained here.

    `tags` go on the run if this call trains the baseline (the sweep job's tag for method=baseline).
    """
    fingerprint = baseline_fingerprint(ctx.cfg)
    while True:
        run_id = wait_for_baseline(ctx.store, fingerprint, ctx.cfg.tracking.get("baseline_wait_s", 7200))
        if run_id is not None:
            log.info("baseline %s found in the store: run %s", fingerprint, run_id)
            with scratch_dir() as folder:
                return Baseline(load_deployable(download_model_file(ctx.store, run_id, Path(folder))), run_id)
        trained = train_baseline(ctx, fingerprint, tags or {})
        if trained is not None:
            return trained
        # another job claimed it first: wait for that one


def train_baseline(ctx: RunContext, fingerprint: str, tags: dict[str, str]) -> Baseline | None:
    """Train and log the baseline, or None when a parallel job claimed the same baseline first."""
    baseline_cfg = copy.deepcopy(ctx.cfg)
    OmegaConf.update(baseline_cfg, "method", {"name": BASELINE_METHOD, "callbacks": {}, "fine_tune": None}, merge=False)
    baseline_ctx = ctx.with_cfg(baseline_cfg, tags)
    baseline_ctx.timings[TIME_BASELINE_S] = 0.0
    claim = baseline_ctx.open_run({FINGERPRINT_TAG: fingerprint})
    if not won_claim(ctx.store, fingerprint, claim.run_id):
        ctx.store.client.delete_run(claim.run_id)
        return None
    log.info("baseline %s not in the store: training it (run %s)", fingerprint, claim.run_id)
    # shared by the jobs that need this baseline
    checkpoints = ctx.checkpoints(f"baseline-{fingerprint}", f"tags.{FINGERPRINT_TAG} = '{fingerprint}'")
    with closing_run(claim) as run, removed_unless_resumable(checkpoints):
        run.set_tags({BASELINE_RUN_TAG: run.run_id, ENERGY_SOURCE_TAG: energy_source(ctx.device)})
        pl.seed_everything(ctx.cfg.seed, workers=True, verbose=False)
        model = build_model(ctx.cfg.model.net, ctx.data.shape)
        model, baseline_ctx.timings[TRAIN_TIME_S] = fit(baseline_cfg, ctx.cfg.baseline, model, ctx.data, [], run,
                                                        checkpoints)
        metrics = track(baseline_ctx, run, evaluate(baseline_ctx, model, model, []))
    return Baseline(model, run.run_id, metrics)


def baseline_fingerprint(cfg: DictConfig) -> str:
    """What makes two baselines the same: data, model, seed, recipe, and the device it trained on."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    for where_or_how_fast in ("root", "eval_batch_size"):
        data.pop(where_or_how_fast, None)
    identity = {
        "data": data,
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "seed": cfg.seed,
        "recipe": OmegaConf.to_container(cfg.baseline, resolve=True),
        "device": cfg.hardware.device,
        "artifact": ARTIFACT_FORMAT,  # a baseline stored in an older file format is trained again, not unpickled
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def starting_model(cfg: DictConfig, baseline: Baseline, data: InMemoryDataModule) -> nn.Module:
    """What step 2 trains: a copy of the baseline, or a fresh model (`method.student_init=scratch`).

    method=baseline re-measures the stored baseline itself.
    """
    if cfg.method.name == "baseline":
        return baseline.model
    if cfg.method.get("student_init", "baseline") == "scratch":
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        return build_model(cfg.model.net, data.shape)
    return copy.deepcopy(baseline.model)


@dataclass
class Teacher:
    model: nn.Module
    source: str  # where it came from: runs:/..., models:/..., file:... (a tag on the run)


def needs_teacher(callbacks: list[CompressionCallback]) -> bool:
    return any(callback.requires_teacher for callback in callbacks)


def obtain_teacher(ctx: RunContext) -> Teacher:
    """The teacher named by method.teacher: a file, an MLflow URI, or else the baseline of the
    model config `method.teacher.model` on the same data and seed, or `method.teacher.seed` when set
    (found in the store or trained once)."""
    cfg, data = ctx.cfg, ctx.data
    spec = cfg.method.teacher
    teacher_model = model_config(spec.model, cfg.paths.root)
    if spec.get("checkpoint") is not None:
        teacher = Teacher(load_teacher_file(Path(spec.checkpoint), teacher_model.net, data), f"file:{spec.checkpoint}")
        warn_if_teacher_not_larger(teacher.model, teacher.source, cfg, data)
        return teacher
    if spec.get("uri") is not None:
        with scratch_dir() as folder:
            teacher = Teacher(load_teacher_file(download_uri(ctx.store, spec.uri, Path(folder)), teacher_model.net, data),
                              spec.uri)
        warn_if_teacher_not_larger(teacher.model, teacher.source, cfg, data)
        return teacher
    warn_if_teacher_not_larger(build_model(teacher_model.net, data.shape), f"{teacher_model.name} baseline", cfg, data)
    teacher_cfg = copy.deepcopy(cfg)
    teacher_cfg.model = teacher_model
    if spec.get("seed") is not None:  # one teacher for the students of every seed
        teacher_cfg.seed = spec.seed
    fingerprint = baseline_fingerprint(teacher_cfg)
    if find_baseline_run(ctx.store, fingerprint) is None and not live_claims(ctx.store, fingerprint):
        log.info(teacher_training_notice(teacher_cfg, data))
    teacher = obtain_baseline(ctx.with_cfg(teacher_cfg))
    return Teacher(teacher.model, run_model_uri(teacher.run_id))


def warn_if_teacher_not_larger(teacher: nn.Module, source: str, cfg: DictConfig, data: InMemoryDataModule) -> None:
    """Say at the start when a distillation's teacher has no more parameters than its student: the run then
    measures what a smaller (or equal) model's soft labels add, not a compression of a larger model
    (lenet300 under the default grid's lenet5 teacher; mobilenetv2, whose shipped teacher is its own baseline)."""
    teacher_size = sum(p.numel() for p in teacher.parameters())
    student_size = sum(p.numel() for p in build_model(cfg.model.net, data.shape).parameters())
    if teacher_size <= student_size:
        log.warning("method=%s: the teacher (%s, %.3gM parameters) is not larger than the student (%s, %.3gM): "
                    "this run measures what distilling from it adds, not a compression of a larger model; for that, "
                    "give a larger teacher (method.teacher.model or method.teacher.uri)", cfg.method.name, source,
                    teacher_size / 1e6, cfg.model.name, student_size / 1e6)


def teacher_training_notice(teacher_cfg: DictConfig, data: InMemoryDataModule) -> str:
    """What a user waits for when a distillation run has to train its teacher first."""
    images = len(data.split("train"))
    macs = count_macs(build_model(teacher_cfg.model.net, data.shape), tuple(data.split("train").tensors[0].shape[1:]))
    cores = run_cores(teacher_cfg.hardware, training=True)
    epochs = teacher_cfg.baseline.epochs
    seconds = epochs * images * 3 * macs["macs_dense"] / (TRAINING_MACS_PER_CORE_S * cores)
    cost = f"{seconds / 60:.0f} minutes" if seconds >= 90 else f"{seconds:.0f} seconds"
    return (f"method={teacher_cfg.method.name}: the teacher ({teacher_cfg.model.name} baseline, data "
            f"{teacher_cfg.data.name}, seed {teacher_cfg.seed}) is not in the store: training it first, "
            f"{epochs} epoch(s) over {images} images. Rough cost: about {cost} on {cores} core(s) "
            f"({macs['macs_dense'] / 1e6:.1f}M MACs per image; a 30-epoch resnet20 teacher takes about "
            f"18 minutes on 2 busy cores). Later runs find it in the store.")


def load_teacher_file(path: Path, net_cfg: DictConfig, data: InMemoryDataModule) -> nn.Module:
    """A workbench artifact (model.pt), or else a Lightning checkpoint / state dict of `net_cfg`'s model."""
    return read_teacher_file(path, net_cfg, data.shape)


# ----------------------------------------------------------------------------- steps 2 and 3


def compress(ctx: RunContext, run: TrackedRun, model: nn.Module, callbacks: list[CompressionCallback],
             teacher: Teacher | None = None, checkpoints: TrainingCheckpoints | None = None) -> nn.Module:
    """Step 2: fine-tune `model` with the method's recipe and callbacks, those that distil learning from
    `teacher` (train_time_s into the timings)."""
    for callback in callbacks:
        if callback.requires_teacher:
            callback.attach_teacher(teacher.model)
    with metered_training(ctx.device, ctx.timings):  # energy_train_kj_measured, where a counter reads
        model, ctx.timings[TRAIN_TIME_S] = fit(ctx.cfg, ctx.cfg.method.fine_tune, model, ctx.data, callbacks, run,
                                               checkpoints)
    return model


def fit(cfg: DictConfig, recipe: DictConfig | None, model: nn.Module, data: InMemoryDataModule,
        callbacks: list[CompressionCallback], run: TrackedRun,
        checkpoints: TrainingCheckpoints | None = None) -> tuple[nn.Module, float]:
    """Train `model` with `recipe` (epochs, optimizer, scheduler) and the callbacks; return it and the seconds.

    With no recipe (method=baseline) nothing is trained; with `epochs: 0` the callbacks still act
    once (a one-shot cut without fine-tuning). With `checkpoints`, every epoch is checkpointed there
    and a checkpoint an earlier attempt left is resumed from (checkpoints.py).
    """
    if recipe is None and not callbacks:
        return model, 0.0
    epochs = 0 if recipe is None else recipe.epochs
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    task = ClassificationTask(
        model.train(),  # a baseline loaded from the store comes in eval mode
        optimizer=hydra.utils.instantiate(recipe.optimizer) if recipe is not None else torch.optim.SGD,
        scheduler=hydra.utils.instantiate(recipe.scheduler) if recipe is not None and recipe.get("scheduler") else None,
    )
    resume, note, saving = None, ResumeNote(), {}
    if checkpoints is not None and epochs > 0:
        checkpoints.fetch()
        resume = checkpoints.last
        if resume is not None:
            run.set_tags({RESUMED_FROM_TAG: checkpoints.previous_attempt() or ""})
        checkpoints.record_attempt(run.run_id)
        noted = [note] if resume is not None else []  # a fresh start has no resume to note
        saving = {"enable_checkpointing": True, "callbacks": [checkpoints.callback(run.run_id), *noted]}
    trainer: pl.Trainer = hydra.utils.instantiate(cfg.trainer, max_epochs=epochs, **{
        **saving,
        "callbacks": [*callbacks, EpochMetricsLogger(run), StepAsideForTiming(), *saving.get("callbacks", [])]})
    started = time.perf_counter()
    with safe_loading():  # a checkpoint is read with weights_only=True
        trainer.fit(task, datamodule=data, ckpt_path=resume, weights_only=True)
    if resume is not None:
        run.log_metrics({RESUMED_AT_EPOCH: note.resumed_at(trainer)})
    return task.model, time.perf_counter() - started


def finalize(model: nn.Module, callbacks: list[CompressionCallback]) -> nn.Module:
    """Step 3: each callback's deployable form, in config order (prune, then quantize)."""
    for callback in callbacks:
        model = callback.finalize(model)
    return model.eval()


# ----------------------------------------------------------------------------- step 4: evaluate


def evaluate(ctx: RunContext, model: nn.Module, baseline: nn.Module, callbacks: list[CompressionCallback],
             teacher: nn.Module | None = None) -> Report:
    """Step 4: the contract's figures of the finalized model against its baseline (report.measure), each
    method's per-layer summary, the layers it left alone, and why the model is slower when it is.

    The files to log (model/, the tables) wait in `report.folder` until `track` sends them.
    """
    # scored, exported and timed on the hardware's threads; the run may train on fewer (train_threads), and
    # may train again after this (a baseline evaluated before the method's own fine-tune)
    with torch_threads(measuring_threads(ctx.cfg.hardware)):
        return _evaluate(ctx, model, baseline, callbacks, teacher)


def _evaluate(ctx: RunContext, model: nn.Module, baseline: nn.Module, callbacks: list[CompressionCallback],
              teacher: nn.Module | None) -> Report:
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="workbench-"))
    try:
        (folder / MODEL_FOLDER).mkdir()
        # models a callback keeps for comparison (QAT's fake-quant model), scored as test_acc_<name>
        references = {name: ref for cb in callbacks for name, ref in cb.reference_models().items()}
        with scratch_dir() as scratch:  # the baseline's (and teacher's) files, written only to be measured
            report = measure(model, baseline, ctx.data, ctx.cfg.hardware, ctx.device, folder / MODEL_FOLDER,
                             Path(scratch), references, teacher, model_recipe(ctx.cfg.model.net, ctx.data.shape))
        summaries = {callback.name: callback.summary(model) for callback in callbacks}
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    report.folder = folder
    report.tables.update({summary_table(name): rows for name, rows in summaries.items()})
    # every layer a method left alone is in its summary with the reason, and counted here
    report.metrics.update({layers_skipped(name): sum(1 for row in rows if row.get("skipped"))
                           for name, rows in summaries.items()})
    for callback in callbacks:  # a method's own figures (Deep Compression's stage ratios)
        report.metrics.update(callback.metrics(model, report.metrics))
    energy, _ = energy_report(report.metrics, ctx.timings, ctx.cfg.hardware, run_cores(ctx.cfg.hardware),
                              open_counter(ctx.device), model, tuple(ctx.data.split("test").tensors[0].shape[1:]),
                              train_cores=run_cores(ctx.cfg.hardware, training=True))
    report.metrics.update(energy)  # energy_*_estimate; energy_*_measured where a counter reads (evaluation/energy.py)
    reason = slower_reason(report, summaries, list(ctx.cfg.hardware.latency.batch_sizes))
    if reason is not None:
        report.tags[SLOWER_TAG] = reason
    report.metrics[TIME_EVALUATE_S] = time.perf_counter() - started
    return report


# ----------------------------------------------------------------------------- step 5: track


def track(ctx: RunContext, run: TrackedRun, report: Report) -> dict[str, float]:
    """Step 5: tags, tables, config, params, the artifact and the metrics into the run; then judge it:
    a collapsed model ends its run FAILED (RunRejected) after its figures are logged, so the store
    shows what it scored. A run that passes logs its MLflow models. Returns the metrics logged."""
    started = time.perf_counter()
    try:
        if report.tags:
            run.set_tags(report.tags)
        for artifact_file, rows in report.tables.items():
            if rows:
                (report.folder / artifact_file).write_text(csv_text(rows))
        (report.folder / CONFIG_ARTIFACT).write_text(OmegaConf.to_yaml(ctx.cfg, resolve=True))
        run.log_params(config_params(ctx.cfg))
        run.log_folder(report.folder)
        metrics = {**report.metrics, **ctx.timings, TIME_TRACK_S: time.perf_counter() - started,
                   RUN_TIME_S: time.perf_counter() - run.started}
        run.log_metrics(metrics)
        log.info("%s: test_acc %.2f%% (drop %.2f, 95%% CI %.2f..%.2f), %.1fx smaller, speedup bs1 %.2fx",
                 run_name(ctx.cfg), metrics[TEST_ACC], metrics[ACC_DROP], metrics[ACC_DROP_CI95_LOW],
                 metrics[ACC_DROP_CI95_HIGH], metrics[COMPRESSION_RATIO], metrics.get(speedup(1), float("nan")))
        for tag, text in report.tags.items():
            if tag != TIMED_ON_TAG:  # a fact, not a warning
                log.warning("%s: %s: %s", run_name(ctx.cfg), tag, text)
        check_not_collapsed(metrics[TEST_ACC], ctx.data.num_classes, chance_margin(ctx.cfg))
        metrics.update(log_mlflow_models(ctx, run, report.folder / MODEL_FOLDER))
    finally:
        shutil.rmtree(report.folder, ignore_errors=True)
    return metrics


def log_mlflow_models(ctx: RunContext, run: TrackedRun, model_dir: Path) -> dict[str, float]:
    """The run's MLflow models (mlflow_model.py: a pyfunc over model.pt, the ONNX flavour where
    model.onnx was written), each with a signature and a few raw test images as its input example;
    the seconds it took as TIME_LOG_MODEL_S. Off with tracking.log_model=false."""
    if not ctx.cfg.tracking.get("log_model", True):
        return {}
    started = time.perf_counter()
    raw_images, _ = ctx.data.raw_test
    log_run_models(run.store.uri, run.store.experiment_id, run.run_id, model_dir, ctx.data.input_spec,
                   ctx.data.num_classes, raw_images[:INPUT_EXAMPLE_IMAGES], ctx.run_tags())
    figures = {TIME_LOG_MODEL_S: time.perf_counter() - started}
    run.log_metrics(figures)
    return figures


def chance_margin(cfg: DictConfig) -> float | None:
    return OmegaConf.select(cfg, "run_checks.chance_margin", default=CHANCE_MARGIN_POINTS)


def check_not_collapsed(test_acc: float, num_classes: int, margin: float | None) -> None:
    """Raise RunRejected when the accuracy is within `margin` points of chance: a model that learned
    nothing (or was destroyed by its compression) is not a result, whatever its size or speed."""
    if margin is None:
        return
    chance = 100.0 / num_classes
    if test_acc <= chance + margin:
        raise RunRejected(f"collapsed: test_acc {test_acc:.1f}% is within {margin:g} points of chance ({chance:.1f}%)")


def slower_reason(report: Report, summaries: dict[str, list[dict]], batch_sizes: list[int]) -> str | None:
    """Why the model is slower than its baseline at the largest batch timed (32 where timed), from what
    the run knows; None when it is not slower than SLOWER_SPEEDUP."""
    batch = 32 if 32 in batch_sizes else max(batch_sizes)
    ratio = report.metrics.get(speedup(batch), 1.0)
    if not ratio < SLOWER_SPEEDUP:
        return None
    causes = []
    if NOISY_TAG in report.tags:
        causes.append(f"timed under contention ({NOISY_TAG}: {report.tags[NOISY_TAG]})")
    low, high = (report.metrics.get(key) for key in speedup_ci95(batch))
    if high is not None and high >= SLOWER_SPEEDUP:
        causes.append(f"within the timing noise (95% interval [{low:.2f}, {high:.2f}] reaches {SLOWER_SPEEDUP})")
    if report.latency_label == DEQUANTIZED:
        # decoded once, so no decoding runs per call: a pruned or clustered model runs its baseline's float32
        # kernels; low-bit codes also keep their activation quantizers
        causes.append("weights decoded to float at load (dequantized): the runtime runs float32 layers (with any "
                      "activation quantizers the method keeps), not narrow kernels")
    if report.metrics.get(INT8_KERNEL_OPS, 0) > 0:
        causes.append(f"runs on {report.metrics[INT8_KERNEL_OPS]:.0f} int8 kernel op(s): on layers this small their "
                      "quantize/dequantize costs more than the int8 arithmetic saves (ptq_static and qat time this "
                      "with min_speedup and keep such models float; low-bit codes cannot stay float and keep their size)")
    if report.latency_label == SIMULATED:
        causes.append("int8 simulated in float kernels (no int8 kernel ran on this runtime; "
                      "hardware=cpu with compile=auto, or cpu_ort, runs real int8)")
    for name, rows in summaries.items():
        left = [str(row.get("layer", "?")) for row in rows if row.get("skipped")]
        if left:
            causes.append(f"{name} left {len(left)} layer(s) unconverted ({', '.join(left[:4])}"
                          f"{', ...' if len(left) > 4 else ''}; see {summary_table(name)})")
    if not causes:
        causes.append("no known cause: re-measure")
    return f"{speedup(batch)} {ratio:.2f}: " + "; ".join(causes)


# ----------------------------------------------------------------------------- context


def configure_hardware(hardware: DictConfig) -> torch.device:
    """The run's device, with torch set to its training threads (evaluate switches to the measuring ones).
    Set every run, null included: an earlier job of the same sweep process may have set fewer."""
    torch.set_num_threads(training_threads(hardware))
    return torch.device(hardware.device)

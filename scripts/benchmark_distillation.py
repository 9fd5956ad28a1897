"""Benchmark of knowledge distillation on mnist5k: a resnet20 teacher and a narrow lenet5 student.

    .venv/bin/python scripts/benchmark_distillation.py accuracy [--seeds 5] [--width 0.5] [--augment null,affine]
        [--teacher-checkpoint model.pt | --teacher-epochs 10] [--alpha A] [--temperature T] [--kd-set key=value]
    flock /tmp/bench.lock .venv/bin/python scripts/benchmark_distillation.py cost [--rounds 3]

accuracy (separate train.py runs into a scratch store; no timing):
  1. trains the resnet20 teacher with the baseline recipe (affine augmentation), or takes --teacher-checkpoint;
  2. for each student augmentation (none, then affine) and each seed, trains the narrow student without
     KD (its baseline) and with KD from that teacher, both from scratch with the same recipe and the
     same data: like for like;
  3. prints per-seed accuracies with the paired 95% interval of the difference, and the mean and
     spread of the KD gain over seeds.
cost (one process, interleaved rounds after a warm-up epoch):
  the seconds of a training epoch of the student alone, with KD from cached logits of fixed
  augmented views, and with the teacher online; the teacher's one-off pass that fills the cache is
  reported apart, and amortised over a sweep of --sweep-runs runs that share it.

Measured 2026-11-23 (2 cores; teacher resnet20, 10 epochs with affine augmentation, 98.30%; students
lenet5 x0.5, 15,738 weights, hardware=cpu_1t, 30 epochs; gain = KD minus no-KD test accuracy, same seed):
  no augmentation (the student alone overfits: last-epoch training accuracy 99.4%, test 94.8-96.4%;
      with KD 98.0% and 96.2% on average)
      defaults (alpha 0.9, T 4): +0.47 over seeds 0-9 (std 0.72, won 7 of 10)
      alpha 0.5:                 +0.70 over seeds 0-9 (std 0.57, won 9 of 10), 95.7% -> 96.4% on average
  affine augmentation (the student alone 96.2-96.8%: augmentation already regularizes it)
      defaults: +0.08 over 10 seeds (std about 0.5); 5 seeds each: alpha 0.5 -0.14; T 2 alpha 0.5 +0.18
      (std 0.28); 32 views -0.04; teacher online (fresh views every batch) -0.18; 100 epochs -0.24
      (the student alone 97.5%)
  lenet5 x0.25 (4,157 weights): no augmentation (alone: training 96.5%, test 92-94%) defaults -0.20,
      alpha 0.5 +0.16 (5 seeds, std 0.5-0.8); affine: T 4 -1.23 (3 seeds), T 1 +0.12 (5 seeds, std 0.80)
  cost, quiet machine: student alone 0.20 s/epoch; KD from cached views 1.02x, teacher online 5.78x;
      the teacher's pass over 8 views 21.7 s once = 111 student epochs (+0.62x per epoch if spread
      over 6 runs x 30 epochs). On the machine loaded by other jobs: 0.97x and 4.52x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from lightning_modules.compression import distillation
from lightning_modules.compression.distillation import (
    KnowledgeDistillation,
    view_outputs,
)
from lightning_modules.contract import EXPERIMENT, SWEEP_TAG, run_model_uri, sqlite_uri
from lightning_modules.data import FixedViews, InMemoryDataModule
from lightning_modules.models import LeNet5, resnet20
from lightning_modules.task import ClassificationTask

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- accuracy


def train(uri: str, folder: Path, *overrides: str) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "-m", "data=mnist5k", "trainer.enable_progress_bar=false",
               f"hydra.sweep.dir={folder}", *overrides]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(overrides)}\n{result.stderr[-4000:]}")


def runs(uri: str, **tags: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def accuracy(args: argparse.Namespace) -> None:
    seeds = ",".join(str(s) for s in range(args.first_seed, args.first_seed + args.seeds))
    kd = [f"method.callbacks.distill.{key}={value}" for key, value in
          (("alpha", args.alpha), ("temperature", args.temperature), ("views", args.views)) if value is not None]
    kd += args.kd_set
    with tempfile.TemporaryDirectory(prefix="workbench-kd-") as temporary:
        scratch = args.store or temporary  # a kept store: its baselines and teacher logits serve later calls
        uri = sqlite_uri(scratch)
        if args.teacher_checkpoint is None:
            train(uri, Path(scratch) / f"teacher-{os.getpid()}", "model=resnet20", "method=baseline",
                  f"data.augment={args.teacher_augment}", f"baseline.epochs={args.teacher_epochs}")
            found = sorted(runs(uri, model="resnet20"), key=lambda r: r.info.start_time)[-1]
            teacher = [f"method.teacher.uri={run_model_uri(found.info.run_id)}"]
            print(f"teacher: resnet20 trained here, test_acc {found.data.metrics['test_acc']:.2f}% "
                  f"({args.teacher_epochs} epochs, data.augment={args.teacher_augment})")
        else:
            teacher = [f"method.teacher.checkpoint={args.teacher_checkpoint}"]
            print(f"teacher: resnet20 from {args.teacher_checkpoint}")
        for augment in args.augment.split(","):
            student = ["model=lenet5", f"model.net.width_multiplier={args.width}", f"data.augment={augment}",
                       f"baseline.epochs={args.epochs}", f"hardware={args.hardware}"]
            train(uri, Path(scratch) / f"students-{augment}", *student, "method=baseline", f"seed={seeds}")
            if args.baselines_only:
                continue
            kd_sweep = f"kd-{augment}-{os.getpid()}"  # this call's KD runs, apart from other calls' in a kept store
            train(uri, Path(scratch) / kd_sweep, *student, "method=kd", f"seed={seeds}", *teacher, *kd,
                  f"method.callbacks.distill.cache_dir={scratch}/logits")  # the seeds share the teacher's pass
            print_gains(uri, args, augment, kd_sweep, kd)


def print_gains(uri: str, args: argparse.Namespace, augment: str, kd_sweep: str, kd: list[str]) -> None:
    """Per seed: the student without KD (its baseline) and with KD, and the gain's paired interval."""
    student_runs = sorted(runs(uri, model="lenet5"), key=lambda r: r.info.start_time)  # the newest run wins
    student_runs = [r for r in student_runs if r.data.params.get("model.net.width_multiplier") == str(args.width)
                    and r.data.params.get("data.augment") == ("None" if augment == "null" else augment)]
    baselines = {r.data.tags["seed"]: r.data.metrics for r in student_runs if r.data.tags["method"] == "baseline"}
    distilled = {r.data.tags["seed"]: r.data.metrics for r in student_runs if r.data.tags.get(SWEEP_TAG) == kd_sweep}
    print(f"\n== student lenet5 x{args.width}: {baselines[str(args.first_seed)]['params_total']:.0f} params, "
          f"{args.epochs} epochs from scratch, data.augment={augment}, the same recipe with and without KD; "
          f"KD {' '.join(kd) or 'defaults'}")
    gains = []
    for seed in sorted(distilled, key=int):
        base, kd_run = baselines[seed], distilled[seed]
        gains.append(kd_run["test_acc"] - base["test_acc"])
        print(f"seed {seed}: without KD {base['test_acc']:.2f}%  with KD {kd_run['test_acc']:.2f}%  gain {gains[-1]:+.2f} "
              f"points (paired 95% CI {-kd_run['acc_drop_ci95_high']:+.2f}..{-kd_run['acc_drop_ci95_low']:+.2f})")
    spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    print(f"KD gain over {len(gains)} seeds: mean {statistics.mean(gains):+.2f} points, std {spread:.2f}, "
          f"won {sum(g > 0 for g in gains)} of {len(gains)}")


# ----------------------------------------------------------------------------- cost


class EpochClock(pl.Callback):
    """Seconds of each training epoch (validation switched off, so only training is timed)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self.started)


def epoch_seconds(data: InMemoryDataModule, width: float, epochs: int, kd: KnowledgeDistillation | None) -> list[float]:
    """Per-epoch seconds of one fit of a fresh student, the first epoch dropped as warm-up."""
    clock = EpochClock()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[clock, *([kd] if kd is not None else [])], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    student = LeNet5(1, 28, 10, width_multiplier=width)
    trainer.fit(ClassificationTask(student, optimizer=partial(torch.optim.Adam, lr=2e-3)), datamodule=data)
    return clock.seconds[1:]


def with_teacher(teacher: torch.nn.Module, mode: str, views: int) -> KnowledgeDistillation:
    callback = KnowledgeDistillation(teacher_logits=mode, views=views)
    callback.attach_teacher(teacher)
    return callback


def cost(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    data = InMemoryDataModule("mnist5k", root=ROOT / "data", augment="affine")
    images = data.split("train").tensors[0]
    # the cost does not depend on the teacher's weights: an untrained resnet20 costs what a trained one does
    teacher = resnet20(in_channels=1, num_classes=10).eval().requires_grad_(False)
    started = time.perf_counter()
    views = FixedViews("affine", args.views if args.views is not None else 8, len(images))  # 8: conf/compression/kd.yaml
    key = distillation.content_key(teacher, images, views)
    distillation.LOGIT_CACHE[key] = view_outputs(teacher, images, views, torch.device("cpu")).cpu()
    teacher_pass = time.perf_counter() - started

    timed: dict[str, list[float]] = {"student alone": [], "KD, cached views": [], "KD, teacher online": []}
    for round_number in range(args.rounds):  # interleaved: a drift in the machine's load hits every setting
        timed["student alone"] += epoch_seconds(data, args.width, args.fit_epochs, None)
        timed["KD, cached views"] += epoch_seconds(data, args.width, args.fit_epochs, with_teacher(teacher, "cache", views.count))
        if round_number == 0:  # the online teacher is slow; one round shows its order of magnitude
            timed["KD, teacher online"] += epoch_seconds(data, args.width, 2, with_teacher(teacher, "online", views.count))
    alone = statistics.median(timed["student alone"])
    print(f"student lenet5 x{args.width} on mnist5k (3,500 training images, affine augmentation), "
          f"{args.rounds} interleaved rounds of {args.fit_epochs} epochs, first epoch of each fit dropped:")
    for name, seconds in timed.items():
        print(f"  {name:<20} {statistics.median(seconds):6.2f} s/epoch (median of {len(seconds)}, "
              f"range {min(seconds):.2f}..{max(seconds):.2f})  {statistics.median(seconds) / alone:5.2f}x the student alone")
    per_epoch_share = teacher_pass / (args.sweep_runs * args.sweep_epochs) / alone
    print(f"one-off teacher pass over {views.count} fixed views: {teacher_pass:.1f} s "
          f"({teacher_pass / views.count:.1f} s per view) = {teacher_pass / alone:.1f} student epochs; amortised over a "
          f"sweep of {args.sweep_runs} runs x {args.sweep_epochs} epochs that share it (cache_dir): "
          f"+{per_epoch_share:.2f}x per epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("accuracy", "cost"))
    parser.add_argument("--width", type=float, default=0.5, help="the student's width multiplier")
    parser.add_argument("--views", type=int, default=None, help="method.callbacks.distill.views (default: the config's)")
    accuracy_args = parser.add_argument_group("accuracy")
    accuracy_args.add_argument("--seeds", type=int, default=5)
    accuracy_args.add_argument("--first-seed", type=int, default=0)
    accuracy_args.add_argument("--epochs", type=int, default=30, help="the student's recipe (baseline.epochs)")
    accuracy_args.add_argument("--augment", default="null,affine",
                               help="data.augment of the students, one section each (null: none)")
    accuracy_args.add_argument("--teacher-augment", default="affine", help="data.augment of the teacher trained here")
    accuracy_args.add_argument("--teacher-epochs", type=int, default=10)
    accuracy_args.add_argument("--teacher-checkpoint", default=None, help="a resnet20 model.pt instead of training one")
    accuracy_args.add_argument("--hardware", default="cpu", help="of the students (cpu_1t: one thread each, for a busy machine)")
    accuracy_args.add_argument("--store", default=None, help="keep the scratch store in this folder (default: temporary)")
    accuracy_args.add_argument("--baselines-only", action="store_true", help="train the students without KD and stop")
    accuracy_args.add_argument("--alpha", type=float, default=None, help="method.callbacks.distill.alpha")
    accuracy_args.add_argument("--temperature", type=float, default=None, help="method.callbacks.distill.temperature")
    accuracy_args.add_argument("--kd-set", action="append", default=[],
                               help="another override of the KD runs, e.g. method.callbacks.distill.teacher_logits=online")
    cost_args = parser.add_argument_group("cost")
    cost_args.add_argument("--rounds", type=int, default=3)
    cost_args.add_argument("--fit-epochs", type=int, default=4, help="epochs per timed fit; the first is the warm-up")
    cost_args.add_argument("--sweep-runs", type=int, default=6, help="runs sharing one teacher pass (seeds x methods)")
    cost_args.add_argument("--sweep-epochs", type=int, default=30)
    args = parser.parse_args()
    if args.part == "accuracy":
        accuracy(args)
    else:
        cost(args)


if __name__ == "__main__":
    main()

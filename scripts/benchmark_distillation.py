"""Benchmark of knowledge distillation on mnist5k: a resnet20 teacher and a narrow lenet5 student.

    .venv/bin/python scripts/benchmark_distillation.py [--seeds 3] [--teacher-epochs 8] [--epochs 15] [--width 0.25]

1. trains one resnet20 teacher (one run, its own recipe);
2. for each seed, trains the narrow student without KD (its baseline) and with KD from that teacher,
   both from scratch with the same recipe and unaugmented data (so the teacher's logits are cached);
3. prints per-seed accuracies with the paired 95% interval of the difference, the mean and spread of
   the KD gain over seeds, and the cost of a KD epoch relative to the student alone, cached and online.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]


def train(uri: str, folder: Path, *overrides: str) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "-m", "data=mnist5k", "data.augment=null",
               "trainer.enable_progress_bar=false", f"hydra.sweep.dir={folder}", *overrides]
    result = subprocess.run(command, cwd=ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri},
                            capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(overrides)}\n{result.stderr[-4000:]}")


def runs(uri: str, **tags: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("workbench")
    found = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in found if all(r.data.tags.get(k) == v for k, v in tags.items())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=None, help="method.callbacks.distill.alpha (default: the config's)")
    parser.add_argument("--temperature", type=float, default=None, help="method.callbacks.distill.temperature")
    args = parser.parse_args()
    seeds = ",".join(str(s) for s in range(args.seeds))
    student = ["model=lenet5", f"model.net.width_multiplier={args.width}"]
    kd = [f"method.callbacks.distill.{key}={value}" for key, value in
          (("alpha", args.alpha), ("temperature", args.temperature)) if value is not None]
    online_epochs = max(2, args.epochs // 5)

    with tempfile.TemporaryDirectory(prefix="workbench-kd-") as scratch:
        uri = f"sqlite:///{scratch}/mlflow.db"
        train(uri, Path(scratch) / "teacher", "model=resnet20", "method=baseline", f"baseline.epochs={args.teacher_epochs}")
        teacher = runs(uri, model="resnet20")[0]
        teacher_uri = f"runs:/{teacher.info.run_id}/model/model.pt"
        train(uri, Path(scratch) / "students", *student, f"baseline.epochs={args.epochs}", "method=baseline",
              f"seed={seeds}")
        train(uri, Path(scratch) / "kd", *student, f"baseline.epochs={args.epochs}", "method=kd",
              f"seed={seeds}", f"method.teacher.uri={teacher_uri}", *kd)
        student_runs = sorted(runs(uri, model="lenet5"), key=lambda r: r.info.start_time)
        baselines = {r.data.tags["seed"]: r for r in student_runs if r.data.tags["method"] == "baseline"}
        cached = {r.data.tags["seed"]: r for r in student_runs if r.data.tags["method"] == "kd"}
        # a short online run: the teacher runs on every batch (what augmented data requires)
        train(uri, Path(scratch) / "online", *student, f"baseline.epochs={online_epochs}", "method=kd", "seed=0",
              f"method.teacher.uri={teacher_uri}", "method.callbacks.distill.teacher_logits=online", *kd)
        online = max(runs(uri, model="lenet5", method="kd"), key=lambda r: r.info.start_time)
        online_student = max(runs(uri, model="lenet5", method="baseline"), key=lambda r: r.info.start_time)

    print(f"teacher resnet20: test_acc {teacher.data.metrics['test_acc']:.2f}% ({args.teacher_epochs} epochs)")
    print(f"student lenet5 x{args.width}: {baselines['0'].data.metrics['params_total']:.0f} params, "
          f"{args.epochs} epochs from scratch, same recipe with and without KD\n")
    gains = []
    for seed in sorted(baselines):
        base, kd = baselines[seed].data.metrics, cached[seed].data.metrics
        gain = kd["test_acc"] - base["test_acc"]
        gains.append(gain)
        print(f"seed {seed}: without KD {base['test_acc']:.2f}%  with KD {kd['test_acc']:.2f}%  "
              f"gain {gain:+.2f} points (paired 95% CI {-kd['acc_drop_ci95_high']:+.2f}..{-kd['acc_drop_ci95_low']:+.2f})")
    spread = statistics.stdev(gains) if len(gains) > 1 else float("nan")
    print(f"\nKD gain over {len(gains)} seeds: mean {statistics.mean(gains):+.2f} points, std {spread:.2f}")

    per_epoch_student = statistics.mean(b.data.metrics["train_time_s"] for b in baselines.values()) / args.epochs
    per_epoch_cached = statistics.mean(k.data.metrics["train_time_s"] for k in cached.values()) / args.epochs
    online_ratio = online.data.metrics["train_time_s"] / online_student.data.metrics["train_time_s"]
    per_seed = [cached[seed].data.metrics["train_time_s"] / baselines[seed].data.metrics["train_time_s"]
                for seed in sorted(cached)]
    print(f"epoch cost relative to the student alone: cached teacher logits {per_epoch_cached / per_epoch_student:.2f}x "
          f"on average (target <= 1.3x), per seed {', '.join(f'{r:.2f}x' for r in per_seed)} (the first seed pays "
          f"the teacher's pass, the others find its logits in the process's cache); online teacher "
          f"{online_ratio:.2f}x ({online_epochs} epochs each)")


if __name__ == "__main__":
    main()

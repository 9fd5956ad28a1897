"""Register the best run of a sweep within an accuracy budget in the MLflow Model Registry.

    python scripts/register_best.py --sweep latest --max-drop 1.0 --objective compression --name lenet-best
    python scripts/register_best.py --sweep NAME --max-drop 0.5 --objective speed --hardware cpu_1t --batch 1 \\
        --name lenet-fast --conservative

Among the sweep's FINISHED runs whose drop against their dense baseline is within --max-drop points
(with --conservative: the upper end of the paired 95% interval of the drop), never one within 2
points of chance, it takes the most compressed (compression_ratio) or the fastest (lowest median
latency at --batch on --hardware) and registers its logged MLflow model (`models:/<model_id>`: the
pyfunc that takes raw pixels and returns class probabilities) as a new version of --name, with its
figures as tags and a description of how they were measured (lightning_modules/registry.py).
The store: --tracking-uri, else MLFLOW_TRACKING_URI, else the checkout's mlruns/mlflow.db.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.analysis import load_runs  # noqa: E402
from lightning_modules.contract import EXPERIMENT, resolve_store_uri  # noqa: E402
from lightning_modules.registry import pick_best, register  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", required=True, help="the sweep's name (tag `sweep`), or `latest`")
    parser.add_argument("--max-drop", type=float, required=True, help="accuracy budget: points of drop allowed")
    parser.add_argument("--objective", choices=("compression", "speed"), default="compression")
    parser.add_argument("--hardware", help="only runs measured on this hardware (required for speed when the "
                                           "sweep spans several)")
    parser.add_argument("--batch", type=int, default=1, help="objective speed: the batch size whose latency counts")
    parser.add_argument("--conservative", action="store_true",
                        help="judge the budget by the upper end of the drop's 95%% interval")
    parser.add_argument("--name", required=True, help="the registered model's name")
    parser.add_argument("--tracking-uri", help="the store (default: MLFLOW_TRACKING_URI, else mlruns/mlflow.db)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--dry-run", action="store_true", help="say which run would be registered, register nothing")
    args = parser.parse_args(argv)

    uri = resolve_store_uri(args.tracking_uri)
    try:
        runs = load_runs(uri, args.experiment, sweep=args.sweep)
        choice = pick_best(runs, args.max_drop, args.objective, args.hardware, args.batch, args.conservative, uri)
    except (FileNotFoundError, ValueError) as error:
        print(f"register_best: {error}", file=sys.stderr)
        return 2
    row = choice.run
    print(f"best of sweep {row['sweep']} ({choice.objective.words}, drop <= {args.max_drop:g}): {row['run_name']} "
          f"run {choice.run_id}, test_acc {row['test_acc']:.2f}%, drop {row['acc_drop']:.2f}, "
          f"{choice.objective.metric} {row[choice.objective.metric]:.4g}")
    if args.dry_run:
        return 0
    version = register(choice, args.name, uri)
    print(f"registered {args.name} version {version.version}: models:/{args.name}/{version.version} "
          f"(logged model {choice.model_uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

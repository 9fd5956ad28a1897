#!/usr/bin/env python
"""The artifact format, measured on the runs of a store: per FINISHED run, the size of its model.pt
(no pickle: the architecture as data, a compressed JSON header, each tensor in its narrowest
encoding) beside a plain `torch.save` of the same model's state dict (every tensor as it is in
memory, read back with weights_only=True), each as a ratio to the run's baseline file written the
same way (both by this version's code from the logged model); the ONNX file's size where the run
logged one; and the load times (median of --loads loads, one format after the other, in this process): model.pt to
a ready model, the state dict to its tensors only (it names no architecture to build).
The format it replaced (a pickled module skeleton) is no longer written or read anywhere: loading it ran code.

    scripts/benchmark_artifact.py --store sqlite:////tmp/sizes/mlflow.db [--loads 20]

The targets of issue 15: an int8 file at least 3.9x smaller than its fp32 baseline on every model
and runtime, a 4-bit file at least 7x (the limits: 4x and 8x, less the scales and biases).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.analysis import experiment_id, open_client, search_all  # noqa: E402
from lightning_modules.contract import (  # noqa: E402
    BASELINE_RUN_TAG, EXPERIMENT, MODEL_ARTIFACT, SIZE_BYTES, baseline_metric, size_bytes_of,
)
from lightning_modules.architecture import ModelRecipe  # noqa: E402
from lightning_modules.data import InputSpec  # noqa: E402
from lightning_modules.evaluation.artifact import (  # noqa: E402
    ArtifactError, load_deployable, read_header, save_deployable,
)


def save_state_dict(model: torch.nn.Module, path: Path) -> int:
    """The plain PyTorch peer: the state dict's tensors as they are, no architecture, no encoding."""
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def resave(logged: Path, path: Path) -> torch.nn.Module:
    """The logged artifact written again by this version's code (the run may predate an encoding)."""
    header, _ = read_header(logged)
    model = load_deployable(logged, low_bit_as_int8=True)
    recipe = ModelRecipe.from_json(header["recipe"]) if header["recipe"] else None
    save_deployable(model, path, recipe, InputSpec.from_json(header["input"]) if header["input"] else None)
    return model


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def median_ms(load, path: Path, loads: int) -> float:
    times = []
    for _ in range(loads):
        started = time.perf_counter()
        load(path)
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="MLflow tracking URI of the runs to measure")
    parser.add_argument("--loads", type=int, default=20, help="loads timed per file and format")
    args = parser.parse_args()
    client = open_client(args.store)
    runs = [run for run in search_all(client, [experiment_id(client, EXPERIMENT)], "attributes.status = 'FINISHED'")
            if run.data.tags.get("method")]
    runs.sort(key=lambda run: (run.data.tags["method"] != "baseline", run.data.tags["model"], run.data.tags["method"]))
    sizes: dict[str, tuple[int, int]] = {}
    print(f"{'model':10} {'method':18} {'hardware':8} {'model.pt':>9} {'ratio':>6} {'state':>9} {'ratio':>6} "
          f"{'onnx':>9} {'ratio':>6} {'load ms':>8} {'state':>8}")
    with tempfile.TemporaryDirectory(prefix="workbench-artifact-") as scratch:
        for run in runs:
            run_id, tags, metrics = run.info.run_id, run.data.tags, run.data.metrics
            logged = Path(client.download_artifacts(run_id, MODEL_ARTIFACT, f"{scratch}/{run_id}"))
            new, old = Path(scratch) / run_id / "current.pt", Path(scratch) / run_id / "state_dict.pt"
            try:
                model = resave(logged, new)
            except ArtifactError as error:  # written by an earlier state of this format
                print(f"{tags['model']:10} {tags['method']:18} skipped: {error}")
                continue
            sizes[run_id] = (new.stat().st_size, save_state_dict(model, old))
            new_ms, old_ms = median_ms(load_deployable, new, args.loads), median_ms(load_state_dict, old, args.loads)
            base = sizes.get(tags.get(BASELINE_RUN_TAG, run_id), (float("nan"), float("nan")))
            onnx = metrics.get(size_bytes_of(".onnx"), float("nan"))
            onnx_ratio = metrics.get(baseline_metric(SIZE_BYTES), float("nan")) / onnx
            print(f"{tags['model']:10} {tags['method']:18} {tags.get('hardware', ''):8} "
                  f"{sizes[run_id][0]:9d} {base[0] / sizes[run_id][0]:6.2f} {sizes[run_id][1]:9d} "
                  f"{base[1] / sizes[run_id][1]:6.2f} {onnx:9.0f} {onnx_ratio:6.2f} {new_ms:8.2f} {old_ms:8.2f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""mobilenetv2 in int8 on ONNX Runtime with its ReLU6s folded into the next quantizer (how `convert`
deploys it since 2026-12-03) against the form before (a quantizer on each side of every ReLU6, which
ONNX Runtime runs as a dequantize-requantize pair there: 134 nodes against 71), and against
the fp32 model: latency at batch 1 and 32, interleaved in one process after warm-up, on 1 and 2 threads,
with the node count of the graph ONNX Runtime runs. Random weights calibrated on random inputs: the
kernels, not the accuracy, are timed.

    flock /tmp/timing.lock .venv/bin/python scripts/benchmark_int8_relu6.py [--threads 2,1] [--rounds 2]

Measured 2026-12-03, quiet 2-core AVX2 host (no VNNI), weights at -63..63, speedup over fp32 [95% interval],
two rounds each: 2 threads, batch 1: before 1.03x / 0.89x, folded 1.45x / 1.28x; batch 32: before 1.04x /
1.06x, folded 1.62x / 1.68x. 1 thread, batch 1: before 1.14x / 1.13x, folded 1.63x / 1.55x; batch 32:
before 1.18x / 1.20x, folded 1.67x / 1.71x. The pairs cost mobilenetv2's int8 model about a third of its time.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.compression import quantization  # noqa: E402
from lightning_modules.compression.quantization import PTQStatic, calibrate, convert, prepare, set_mode  # noqa: E402
from lightning_modules.evaluation.latency import measure_latency  # noqa: E402
from lightning_modules.evaluation.runtime import deploy, export_onnx, optimized_ops  # noqa: E402
from lightning_modules.layers import called_module  # noqa: E402
from lightning_modules.models import mobilenetv2  # noqa: E402

INPUT_SHAPE = (1, 28, 28)


def int8_form(model: nn.Module) -> nn.Module:
    gm, prepared = prepare(copy.deepcopy(model), PTQStatic().scheme)
    calibrate(gm, prepared, [torch.randn(64, *INPUT_SHAPE) for _ in range(4)])
    set_mode(prepared, observing=False, fake_quant=True)
    return convert(gm, prepared)


def int8_form_before(model: nn.Module) -> nn.Module:
    """The deployment before: ReLU6 not recognised as ReLU-like, so quantized on both sides."""
    relu_top = quantization._relu_top

    def relu_only(gm, node):
        return None if node.op == "call_module" and isinstance(called_module(gm, node), nn.Hardtanh) \
            else relu_top(gm, node)

    with mock.patch.object(quantization, "_relu_top", relu_only):
        return int8_form(model)


def node_count(model: nn.Module) -> int:
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, Path(folder) / "m.onnx", INPUT_SHAPE)
        return len(optimized_ops(Path(folder) / "m.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    fp32 = mobilenetv2(in_channels=1, image_size=28).eval()
    forms = {"fp32": fp32, "int8 before": int8_form_before(fp32), "int8 folded": int8_form(fp32)}
    print("nodes ONNX Runtime runs: " + ", ".join(f"{name} {node_count(model)}" for name, model in forms.items()))
    cpu = torch.device("cpu")
    for threads in map(int, args.threads.split(",")):
        for index in range(args.rounds):
            deployed = {name: deploy(model, "ort", cpu, threads, INPUT_SHAPE) for name, model in forms.items()}
            timed = measure_latency(deployed, INPUT_SHAPE, [1, 32], cpu, min_time_s=1.0, reference="fp32")
            for batch in (1, 32):
                cells = [f"{name} {timed[name][f'latency_ms_p50_bs{batch}']:.3f} ms" +
                         (f" ({timed[name][f'speedup_bs{batch}']:.2f}x [{timed[name][f'speedup_bs{batch}_ci95_low']:.2f}, "
                          f"{timed[name][f'speedup_bs{batch}_ci95_high']:.2f}])" if name != "fp32" else "")
                         for name in forms]
                print(f"threads {threads} round {index} batch {batch:2d}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main()

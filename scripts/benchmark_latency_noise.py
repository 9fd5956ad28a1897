#!/usr/bin/env python
"""How far timing noise moves a speedup, and whether `latency_noisy` says so: the calibration of
hardware.latency.noisy_speedup_error.

Each pair is two identical copies of one model, so its true speedup is 1.0. Every pair is timed the
way a run times its model against its baseline (evaluation/latency.py `measure_latency`, with the
shipped hardware=cpu_1t settings), first on the machine as it is, then beside 1, 2 and 3 busy processes
(each one thread of float matrix products, as a training job is). Per reading it prints the speedup,
its 95% interval and the p95/p50 spreads, and per condition how many readings were off by more than
5% and how many the tag would have marked.

    flock /tmp/timing.lock python scripts/benchmark_latency_noise.py [--rounds 3] [--busy 0,1,2,3]

Run it on an otherwise idle machine: the "0 busy" rows are the idle calibration.

ONNX Runtime's pool threads spin after a call (its default); `--only ort` times the ORT pairs with spinning
on, off, and stopped after each call (runtime.SPINNING). Measured 2026-12-02, idle 2-core machine,
`--busy 0 --rounds 5 --only ort`: no reading more than 5% off 1.0 in any mode; lenet5 on all cores at
batch 32: largest +-9.0% spinning, 4.3% off, 3.0% stopped after each call, p50 0.70 / 0.58 / 0.45 ms (two
sessions called in turn: each one's spinning threads take the core the other needs); at batch 1 lenet300
0.036 ms spinning against 0.060 ms with either other mode (waking a sleeping thread costs more than the
call). lenet5's int8 file against its fp32 file (5 rounds each) read 1.01-1.06x at batch 32 in every mode.
Identical pairs hid what two different models showed: timed in the int8 gate's back-to-back pairs, one
session's spinning threads distorted the other's calls by up to 0.8x (scripts/benchmark_int8_gate.py), so
since 2026-12-02 the workbench's sessions stop spinning after each call (runtime.MEASURED_SPINNING).
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.contract import latency_ms_p50, latency_spread, speedup, speedup_ci95  # noqa: E402
from lightning_modules.evaluation.latency import load_per_core, measure_latency  # noqa: E402
from lightning_modules.evaluation.report import MAX_LOAD_PER_CORE, NOISY_SPEEDUP_ERROR_DEFAULT  # noqa: E402
from lightning_modules.evaluation.runtime import OrtModel, export_onnx  # noqa: E402
from lightning_modules.models import LeNet5, LeNet300  # noqa: E402
from lightning_modules.models.resnet import resnet20  # noqa: E402

INPUT = (1, 28, 28)
OFF_BY = 0.05  # a reading further than this from 1.0 is wrong beyond what an idle machine shows


def busy(seconds: float) -> None:
    """One thread of float matrix products, as a training job beside the timing is."""
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    end = time.time() + seconds
    while time.time() < end:
        a = torch.tanh(a @ a)


def settle(count: int, most_per_core: float = 0.6, patience_s: float = 240.0) -> None:
    """Wait for the 1-minute load average to show the condition: idle, or the busy processes running."""
    if count:
        time.sleep(70)  # the load average's time constant is a minute
        return
    end = time.time() + patience_s
    while load_per_core() > most_per_core and time.time() < end:
        time.sleep(5)


def identical_pairs(folder: Path, only: str = ""):
    """(name, the two copies): eager models on one thread, and one file in two ONNX Runtime sessions
    (one thread; all cores, their pool threads spinning between calls as ONNX Runtime's default, sleeping,
    or spinning during a call only: runtime.SPINNING). `only`: the pairs whose name contains it."""
    for name, model in (("lenet300", LeNet300()), ("lenet5", LeNet5()), ("resnet20", resnet20(in_channels=1))):
        if only in name:
            model.eval()
            yield name, {"model": model, "baseline": copy.deepcopy(model)}
    for name, model in (("lenet300", LeNet300()), ("lenet5", LeNet5())):
        path = folder / f"{name}.onnx"
        export_onnx(model.eval(), path, INPUT)
        for threads, spinning in ((1, "on"), (None, "on"), (None, "off"), (None, "stop_after_run")):
            label = f"{name} ort {threads or 'all'}t" + ("" if spinning == "on" else f" spin {spinning}")
            if only in label:
                yield label, {"model": OrtModel(path, threads, spinning), "baseline": OrtModel(path, threads, spinning)}


def readings(rounds: int, folder: Path, only: str = ""):
    for _ in range(rounds):
        for name, pair in identical_pairs(folder, only):
            load_before = load_per_core()
            timed = measure_latency(pair, INPUT, [1, 32], torch.device("cpu"), warmup=10, repeats=50,
                                    min_time_s=1.0, reference="baseline")
            load = max(load_before, load_per_core())  # as a run reads it (evaluation/report.py: time_models)
            for batch in (1, 32):
                figures = timed["model"]
                value = figures[speedup(batch)]
                low, high = (figures[key] for key in speedup_ci95(batch))
                yield dict(pair=name, batch=batch, speedup=value, low=low, high=high, load=load,
                           ms=timed["baseline"][latency_ms_p50(batch)],
                           error=max(value - low, high - value) / value,
                           spread_model=figures[latency_spread(batch)],
                           spread_baseline=timed["baseline"][latency_spread(batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", default="0,1,2,3", help="numbers of busy processes beside the timing")
    parser.add_argument("--threshold", type=float, default=NOISY_SPEEDUP_ERROR_DEFAULT)
    parser.add_argument("--only", default="", help="the pairs whose name contains this (e.g. 'ort')")
    args = parser.parse_args()
    torch.set_num_threads(1)  # hardware=cpu_1t
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        for count in (int(n) for n in args.busy.split(",")):
            workers = [multiprocessing.Process(target=busy, args=(3600,), daemon=True) for _ in range(count)]
            for worker in workers:
                worker.start()
            settle(count)
            try:
                rows = list(readings(args.rounds, Path(folder), args.only))
            finally:
                for worker in workers:
                    worker.terminate()
            print(f"\n{count} busy processes: {'pair':16} bs  speedup  95% interval     +-     load  p95/p50 model, baseline")
            for row in rows:
                print(f"{'':19}{row['pair']:16} {row['batch']:<3} {row['speedup']:.3f}    "
                      f"[{row['low']:.3f}, {row['high']:.3f}]  {row['error']:5.1%}  {row['load']:.2f}  "
                      f"{row['spread_model']:.2f}, {row['spread_baseline']:.2f}")
            summary.append((count, rows))
    print(f"\nper condition ('off': speedup more than {OFF_BY:.0%} from the true 1.0; 'tagged': half-width over "
          f"{args.threshold}, or load above {MAX_LOAD_PER_CORE} per core, as a run's latency_noisy):")
    print("busy  readings  off  tagged (of them by interval)  off and tagged (by interval)  largest +-  "
          "largest p95/p50")
    for count, rows in summary:
        wide = [row["error"] > args.threshold for row in rows]
        tagged = [by_interval or row["load"] > MAX_LOAD_PER_CORE for by_interval, row in zip(wide, rows)]
        off = [abs(row["speedup"] - 1.0) > OFF_BY for row in rows]
        print(f"{count:<5} {len(rows):<9} {sum(off):<4} {f'{sum(tagged)} ({sum(wide)})':<29} "
              f"{f'{sum(o and t for o, t in zip(off, tagged))} ({sum(o and w for o, w in zip(off, wide))})':<29} "
              f"{max(row['error'] for row in rows):<11.1%} "
              f"{max(max(row['spread_model'], row['spread_baseline']) for row in rows):.2f}")
    print("\nper pair and batch: readings, off, furthest from 1.0, largest +-, median p50 (ms)")
    for count, rows in summary:
        for key in dict.fromkeys((row["pair"], row["batch"]) for row in rows):
            mine = [row for row in rows if (row["pair"], row["batch"]) == key]
            furthest = max((row["speedup"] for row in mine), key=lambda value: abs(value - 1.0))
            print(f"{count} busy  {key[0]:22} bs{key[1]:<3} {len(mine):<3} "
                  f"{sum(abs(row['speedup'] - 1.0) > OFF_BY for row in mine):<3} {furthest:.3f}  "
                  f"{max(row['error'] for row in mine):.1%}  {sorted(row['ms'] for row in mine)[len(mine) // 2]:.3f}")


if __name__ == "__main__":
    main()

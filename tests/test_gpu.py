"""On a CUDA machine: training, the deployable artifact and every measurement run on the GPU.

Skipped cleanly where there is no GPU (CI, the developers' machines). Needs no MLflow, so it can
run on a bare GPU machine with `pytest --noconftest tests/test_gpu.py`.
"""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_training_and_measurement_run_on_the_gpu(tmp_path) -> None:
    from lightning_modules.compression.pruning import MagnitudePruning
    from lightning_modules.data import InMemoryDataModule
    from lightning_modules.evaluation.report import measure
    from lightning_modules.models import LeNet5
    from lightning_modules.task import ClassificationTask

    pl.seed_everything(0, verbose=False)
    data = InMemoryDataModule("digits", batch_size=64, augment="affine")
    baseline = LeNet5(1, 8, 10)
    task = ClassificationTask(baseline, optimizer=partial(torch.optim.Adam, lr=1e-2))
    pruning = MagnitudePruning(0.5, skip_layers=[])
    trainer = pl.Trainer(accelerator="cuda", devices=1, max_epochs=3, callbacks=[pruning], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=data)
    assert trainer.strategy.root_device.type == "cuda"  # Lightning moves the model back to the CPU after fit
    model = pruning.finalize(task.model)

    hardware = OmegaConf.create({"runtime": "torch", "latency": {"batch_sizes": [1, 64], "warmup": 2, "repeats": 5}})
    (tmp_path / "artifact").mkdir()
    report = measure(model, model, data, hardware, torch.device("cuda"), tmp_path / "artifact", tmp_path)
    assert report.metrics["test_acc"] > 50
    assert report.metrics["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report.metrics["latency_ms_p95_bs64"] >= report.metrics["latency_ms_p50_bs64"] > 0
    assert report.metrics["compression_ratio"] == 1.0 and report.metrics["speedup_bs1"] == 1.0

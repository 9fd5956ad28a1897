"""Accuracy and loss on a split, and a paired interval for the drop between two models."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_modules.evaluation.runtime import Deployed


@dataclass
class Predictions:
    correct: np.ndarray  # bool per test image, so two models can be compared image by image
    loss: float

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


@torch.no_grad()
def predict(model: Deployed, dataset: TensorDataset, device: torch.device, batch_size: int = 512) -> Predictions:
    """Score a deployed model (see runtime.py) on every image of `dataset`.

    Every batch has the same size (the last one padded with its own images, their outputs dropped):
    a compiled runtime compiles a graph per batch size, so scoring at a batch size the latency is
    timed at compiles nothing more."""
    correct, loss_sum = [], 0.0
    size = min(batch_size, len(dataset))
    for inputs, targets in DataLoader(dataset, batch_size=size):
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(padded(inputs, size))[: len(targets)]
        loss_sum += float(F.cross_entropy(logits, targets, reduction="sum"))
        correct.append((logits.argmax(1) == targets).cpu().numpy())
    all_correct = np.concatenate(correct)
    return Predictions(all_correct, loss_sum / len(all_correct))


def padded(inputs: torch.Tensor, size: int) -> torch.Tensor:
    """`inputs` repeated up to `size` images. The padding is the batch's own images, so what reads the
    whole batch (a dynamic quantization's activation range) finds nothing the batch does not hold."""
    if len(inputs) >= size:
        return inputs
    return inputs.repeat(math.ceil(size / len(inputs)), *([1] * (inputs.dim() - 1)))[:size]


def paired_drop_interval(
    baseline_correct: np.ndarray, correct: np.ndarray, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of (baseline accuracy - accuracy) in points, resampling images.

    Both models are scored on the same images, so the images are resampled in pairs: the interval
    reflects only the images on which the two models disagree, which is far tighter (and fairer)
    than two independent intervals.
    """
    if baseline_correct.shape != correct.shape:
        raise ValueError(f"paired interval needs predictions on the same images: {baseline_correct.shape} vs {correct.shape}")
    differences = baseline_correct.astype(np.float64) - correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(differences), size=(resamples, len(differences)))
    drops = differences[indices].mean(axis=1) * 100.0
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(drops, [tail, 1.0 - tail])
    return float(low), float(high)

"""Weight clustering (weight sharing), a Lightning callback (see base.py for the protocol).

    WeightClustering   k-means weight sharing per layer, 2**bits centroids (Han et al. 2016,
                       Deep Compression section 3), centroids fine-tuned

The math is a pure 1-D k-means (`kmeans_1d`, linear initialization as the paper recommends);
cluster assignments live beside the weights as a `weight_clusters` buffer until `finalize`
drops it. During fine-tuning every weight moves with its optimizer step and is then pulled back
to the mean of its cluster: each centroid moves by the average of its members' updates, the
shared-weight gradient of the paper. The deployable model holds at most 2**bits distinct values
per layer, which the artifact stores as a codebook plus packed indices (artifact.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression.base import (
    CompressionCallback, check_choice, check_number, register_or_update_buffer, select_layers,
)
from lightning_modules.layers import weighted_layers

log = logging.getLogger(__name__)

CLUSTERS = "weight_clusters"
INITS = ("linear", "random", "density")


def kmeans_1d(values: torch.Tensor, k: int, iterations: int = 30, init: str = "linear",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on scalars: (centroids [k'], index of each value's centroid). Empty
    clusters are dropped, so k' <= k. `linear` spreads the initial centroids evenly between the
    smallest and largest value (best in Deep Compression), `density` at quantiles, `random` at
    random values."""
    flat = values.detach().flatten().float()
    if init == "linear":
        centroids = torch.linspace(float(flat.min()), float(flat.max()), k)
    elif init == "density":
        centroids = torch.quantile(flat, torch.linspace(0, 1, k))
    else:
        centroids = flat[torch.randperm(flat.numel(), generator=generator)[:k]].clone()
    for _ in range(iterations):
        indices = torch.argmin((flat[:, None] - centroids[None, :]).abs(), dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, indices, flat)
        counts = torch.zeros_like(centroids).index_add_(0, indices, torch.ones_like(flat))
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    indices = torch.argmin((flat[:, None] - centroids[None, :]).abs(), dim=1)
    used = torch.unique(indices)
    remap = torch.full((centroids.numel(),), -1, dtype=torch.long)
    remap[used] = torch.arange(used.numel())
    return centroids[used], remap[indices].view(values.shape)


@torch.no_grad()
def share_weights(weight: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Replace every weight by the mean of its cluster (in place); returns the centroids."""
    k = int(clusters.max()) + 1
    flat, index = weight.view(-1), clusters.view(-1)
    sums = torch.zeros(k, dtype=weight.dtype, device=weight.device).index_add_(0, index, flat)
    counts = torch.zeros(k, dtype=weight.dtype, device=weight.device).index_add_(0, index, torch.ones_like(flat))
    centroids = sums / counts.clamp(min=1)
    flat.copy_(centroids[index])
    return centroids


class WeightClustering(CompressionCallback):
    """k-means weight sharing with 2**bits centroids per layer, fine-tuned.

    Args:
        bits: index bits per weight; each layer gets at most 2**bits shared values (1..8).
        init: centroid initialization, `linear` (the paper's choice), `density` or `random`.
        iterations: Lloyd iterations of the k-means.
        skip_layers: layer names left unclustered (logged); `first`/`last` stand for the model's
            first and last weighted layer.
        seed: seed of the `random` initialization.
    """

    name = "cluster"

    def __init__(self, bits: int = 4, init: str = "linear", iterations: int = 30,
                 skip_layers: Sequence[str] = (), seed: int = 0) -> None:
        self.bits = check_number("bits", bits, 1, 8, integer=True)
        self.init = check_choice("init", init, INITS)
        self.iterations = check_number("iterations", iterations, 1, integer=True)
        self.skip_layers = list(skip_layers)
        self.skipped: dict[str, str] = {}
        self.clustered = False
        self._generator = torch.Generator().manual_seed(seed)

    # -- hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered:
            self.cluster(pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.share(pl_module.model)

    # -- the workers
    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        targets, self.skipped = select_layers(model, self.skip_layers)
        for name, reason in self.skipped.items():
            log.info("clustering skips %s: %s", name, reason)
        return dict(targets)

    @torch.no_grad()
    def cluster(self, model: nn.Module) -> None:
        for name, module in self.target_layers(model).items():
            centroids, indices = kmeans_1d(module.weight.cpu(), 2**self.bits, self.iterations, self.init, self._generator)
            module.weight.copy_(centroids[indices].to(module.weight))
            indices = indices.to(module.weight.device)
            register_or_update_buffer(module, CLUSTERS, indices)
        self.clustered = True

    def share(self, model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, CLUSTERS):
                share_weights(module.weight, getattr(module, CLUSTERS))

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        self.share(model)
        for module in model.modules():
            module._buffers.pop(CLUSTERS, None)
        return model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        rows = []
        for name, module in weighted_layers(model):
            rows.append({"layer": name, "weights": module.weight.numel(),
                         "distinct_values": int(torch.unique(module.weight).numel()),
                         "index_bits": self.bits if name not in self.skipped else 32,
                         "skipped": self.skipped.get(name, "")})
        return rows

    def state_dict(self) -> dict[str, Any]:
        return {"clustered": self.clustered, "skipped": self.skipped, "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clustered = state_dict["clustered"]
        self.skipped = state_dict["skipped"]
        self._generator.set_state(state_dict["generator"])

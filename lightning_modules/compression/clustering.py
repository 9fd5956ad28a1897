"""Weight clustering (weight sharing), a Lightning callback (see base.py for the protocol).

    WeightClustering   k-means weight sharing per layer, 2**bits centroids (Han et al. 2016,
                       Deep Compression section 3), centroids fine-tuned

The math is a pure 1-D k-means (`kmeans_1d`, linear initialization as the paper recommends);
cluster assignments live beside the weights as a `weight_clusters` buffer until `finalize`
drops it. Weights that are exactly zero when clustering starts (pruned) get no cluster (index
-1): they stay zero and zero is not one of the 2**bits shared values, so clustering composes
after pruning. During fine-tuning each weight's gradient is replaced by the SUM of its cluster's
gradients (the paper's centroid gradient), so all members take the same step; after the step
every weight is set to its cluster's mean (the optimizer's per-weight state may still differ
when pruning trained the same weights earlier in the fit). The deployable model holds at most
2**bits distinct nonzero values per layer; the artifact stores it as a codebook plus packed
indices, or Huffman-coded when the layer is also sparse (huffman.py).

`bits` may differ by layer kind ({conv: 8, linear: 5} is Deep Compression's), and `begin_epoch`
starts clustering later in the fit, so that a pruning ramp in the same fit ends first.
`stage_sizes` gives the bytes of each Deep Compression stage (pruned, quantized, Huffman-coded).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_modules.compression import huffman
from lightning_modules.compression.base import (
    CompressionCallback, check_choice, check_number, register_or_update_buffer, select_layers,
)
from lightning_modules.contract import (
    BASELINE_SIZE_BYTES, BITS_PER_INDEX, BITS_PER_VALUE, BITS_PER_WEIGHT, CLUSTER_CALLBACK, COMPRESSION_RATIO_HUFFMAN,
    COMPRESSION_RATIO_HUFFMAN_PAYLOAD, COMPRESSION_RATIO_PRUNED, COMPRESSION_RATIO_QUANTIZED, SIZE_BYTES,
)
from lightning_modules.layers import weighted_layers

log = logging.getLogger(__name__)

CLUSTERS = "weight_clusters"
INITS = ("linear", "random", "density")
LAYER_KINDS = ("conv", "linear")  # the keys of a per-kind `bits`
UNCLUSTERED = -1  # the cluster index of a zero (pruned) weight: it has no shared value
MASK = "weight_mask"  # a pruning callback's mask (base.py): a weight it masks later leaves its cluster


def layer_kind(module: nn.Module) -> str:
    return "conv" if isinstance(module, nn.Conv2d) else "linear"


def check_bits(bits: Any) -> dict[str, int]:
    """{layer kind: bits} from an int (every kind) or a mapping naming each of LAYER_KINDS."""
    if isinstance(bits, Mapping):
        unknown = [key for key in bits if key not in LAYER_KINDS]
        missing = [kind for kind in LAYER_KINDS if kind not in bits]
        if unknown or missing:
            raise ValueError(f"bits={dict(bits)!r} is not valid; allowed: an integer in 1..8 or a mapping "
                             f"with exactly the keys {', '.join(LAYER_KINDS)}")
        return {kind: check_number(f"bits.{kind}", bits[kind], 1, 8, integer=True) for kind in LAYER_KINDS}
    bits = check_number("bits", bits, 1, 8, integer=True,
                        allowed="an integer in 1..8, or {conv: <1..8>, linear: <1..8>}")
    return {kind: bits for kind in LAYER_KINDS}


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


def cluster_sums(values: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """The sum of `values` over each cluster (entries of index UNCLUSTERED left out)."""
    index = clusters.reshape(-1)
    member = index >= 0
    k = int(index.max()) + 1 if bool(member.any()) else 0
    sums = torch.zeros(k, dtype=values.dtype, device=values.device)
    return sums.index_add_(0, index[member], values.reshape(-1)[member])


def spread(per_cluster: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Each entry's cluster value, zero where the entry has no cluster."""
    if per_cluster.numel() == 0:
        return torch.zeros(clusters.shape, dtype=per_cluster.dtype, device=per_cluster.device)
    return torch.where(clusters >= 0, per_cluster[clusters.clamp(min=0)], torch.zeros((), dtype=per_cluster.dtype,
                                                                                     device=per_cluster.device))


@torch.no_grad()
def share_weights(weight: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Replace every weight by the mean of its cluster, and weights without one by zero (in place);
    returns the centroids."""
    centroids = cluster_sums(weight, clusters) / cluster_sums(torch.ones_like(weight), clusters).clamp(min=1)
    weight.copy_(spread(centroids, clusters))
    return centroids


@torch.no_grad()
def sum_gradients(weight: torch.Tensor, clusters: torch.Tensor) -> None:
    """Each weight's gradient becomes its cluster's summed gradient (the paper's centroid gradient,
    its equation 3); zero for a weight without a cluster."""
    if weight.grad is not None:
        weight.grad.copy_(spread(cluster_sums(weight.grad, clusters), clusters))


@torch.no_grad()
def cluster_nonzero(weight: torch.Tensor, k: int, iterations: int, init: str,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means of the nonzero entries of `weight`, which take their centroid's value (in place);
    returns the cluster index of every entry, UNCLUSTERED for the zeros (they stay zero)."""
    clusters = torch.full(weight.shape, UNCLUSTERED, dtype=torch.long)
    nonzero = (weight != 0).cpu()
    if bool(nonzero.any()):
        centroids, indices = kmeans_1d(weight.detach().cpu()[nonzero], k, iterations, init, generator)
        clusters[nonzero] = indices
        weight.copy_(spread(centroids, clusters).to(weight))
    return clusters.to(weight.device)


class WeightClustering(CompressionCallback):
    """k-means weight sharing with 2**bits centroids per layer, fine-tuned.

    Args:
        bits: index bits per weight; each layer gets at most 2**bits shared values (1..8): an int
            for every layer, or per layer kind, {conv: 8, linear: 5} (Deep Compression's).
        init: centroid initialization, `linear` (the paper's choice), `density` or `random`.
        iterations: Lloyd iterations of the k-means.
        skip_layers: layer names left unclustered (logged); `first`/`last` stand for the model's
            first and last weighted layer.
        begin_epoch: the epoch of the fit at whose start the weights are clustered (0: before
            training); later, a pruning ramp in the same fit ends before clustering starts.
        seed: seed of the `random` initialization.
    """

    name = CLUSTER_CALLBACK

    def __init__(self, bits: int | Mapping[str, int] = 4, init: str = "linear", iterations: int = 30,
                 skip_layers: Sequence[str] = (), begin_epoch: int = 0, seed: int = 0) -> None:
        self.bits = check_bits(bits)
        self.init = check_choice("init", init, INITS)
        self.iterations = check_number("iterations", iterations, 1, integer=True)
        self.skip_layers = list(skip_layers)
        self.begin_epoch = check_number("begin_epoch", begin_epoch, 0, integer=True)
        self.skipped: dict[str, str] = {}
        self.clustered = False
        self._generator = torch.Generator().manual_seed(seed)

    # -- hooks
    def check_epochs(self, epochs: int) -> None:
        if self.begin_epoch and self.begin_epoch >= epochs:
            raise ValueError(f"begin_epoch={self.begin_epoch} is not valid; allowed: an integer below "
                             f"fine_tune.epochs={epochs} (the fit must train the shared weights)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs is not None:
            self.check_epochs(trainer.max_epochs)
        if not self.clustered and self.begin_epoch == 0:
            self.cluster(pl_module.model)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.clustered and trainer.current_epoch >= self.begin_epoch:
            self.cluster(pl_module.model)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        for module in pl_module.model.modules():
            if hasattr(module, CLUSTERS):
                sum_gradients(module.weight, getattr(module, CLUSTERS))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.share(pl_module.model)

    # -- the workers
    def target_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        targets, self.skipped = select_layers(model, self.skip_layers)
        for name, reason in self.skipped.items():
            log.info("clustering skips %s: %s", name, reason)
        return dict(targets)

    def layer_bits(self, module: nn.Module) -> int:
        return self.bits[layer_kind(module)]

    @torch.no_grad()
    def cluster(self, model: nn.Module) -> None:
        for name, module in self.target_layers(model).items():
            clusters = cluster_nonzero(module.weight, 2 ** self.layer_bits(module), self.iterations, self.init,
                                       self._generator)
            register_or_update_buffer(module, CLUSTERS, clusters)
        self.clustered = True
        log.info("clustering: %s bits per layer kind", self.bits)

    @torch.no_grad()
    def share(self, model: nn.Module) -> None:
        for module in model.modules():
            if hasattr(module, CLUSTERS):
                clusters = getattr(module, CLUSTERS)
                if hasattr(module, MASK):  # a weight a pruning callback masks leaves its cluster for good
                    clusters.masked_fill_(getattr(module, MASK) == 0, UNCLUSTERED)
                share_weights(module.weight, clusters)

    # -- protocol
    def finalize(self, model: nn.Module) -> nn.Module:
        if not self.clustered:  # never fitted (begin_epoch past the fit, or no fit): cluster now, untrained
            log.warning("clustering was not applied during training; clustering the final weights without fine-tuning")
            self.cluster(model)
        self.share(model)
        for module in model.modules():
            module._buffers.pop(CLUSTERS, None)
        return model

    def summary(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per layer: weights kept %, index bits, shared values, and the bytes of each Deep
        Compression stage (dense fp32, pruned, quantized, Huffman-coded)."""
        rows = []
        for name, module in weighted_layers(model):
            weight = module.weight.detach()
            clustered = name not in self.skipped
            sizes = stage_sizes(weight, self.layer_bits(module) if clustered else None)
            rows.append({"layer": name, "weights": weight.numel(),
                         "kept_percent": 100.0 * int(torch.count_nonzero(weight)) / max(1, weight.numel()),
                         "distinct_values": int(torch.unique(weight).numel()),
                         "index_bits": self.layer_bits(module) if clustered else 32,
                         **{f"bytes_{stage}": size for stage, size in sizes.items() if stage in STAGES},
                         "huffman_bits_per_index": sizes["bits_per_index"],
                         "huffman_bits_per_value": sizes["bits_per_value"],
                         "skipped": self.skipped.get(name, "")})
        return rows

    def metrics(self, model: nn.Module, measured: Mapping[str, float]) -> dict[str, float]:
        """Deep Compression's stage-by-stage figures (its Table 1 and Figure 1): the model's fp32
        bytes over those of each stage, every tensor counted (biases stored as they are). The
        pruned and quantized stages are payloads (no container); compression_ratio_huffman is the
        real file against the baseline's file (= compression_ratio), and its payload-only ratio
        beside it shows what the file's container costs."""
        return stage_metrics(model, {name: self.layer_bits(module) for name, module in weighted_layers(model)
                                     if name not in self.skipped}, measured)

    def state_dict(self) -> dict[str, Any]:
        return {"clustered": self.clustered, "skipped": self.skipped, "generator": self._generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.clustered = state_dict["clustered"]
        self.skipped = state_dict["skipped"]
        self._generator.set_state(state_dict["generator"])


# ----------------------------------------------------------------------------- Deep Compression's stages

STAGES = ("dense", "pruned", "quantized", "huffman")
FP32_BITS = 32


def relative_entries(weight: torch.Tensor, gap_bits: int) -> int:
    """Entries (nonzeros and filler zeros) that locate the nonzeros of `weight` by relative indices
    of `gap_bits` bits (huffman.relative_positions)."""
    positions = torch.nonzero(weight.flatten()).flatten()
    distances = torch.diff(positions, prepend=torch.tensor([-1]))
    return int(((distances - 1) // (1 << gap_bits) + 1).sum())


def stage_sizes(weight: torch.Tensor, bits: int | None) -> dict[str, float]:
    """Bytes of `weight` at each stage of Deep Compression (`bits` None: a layer left unclustered):
        dense      fp32, every entry
        pruned     the nonzeros as fp32 values, each with its relative index at the best fixed
                   width (the paper's sparse format, filler zeros included), or dense if smaller
        quantized  the same with each value an index of `bits` bits into an fp32 codebook
        huffman    huffman.encode's payload (both streams entropy-coded), or what the artifact stores
                   instead when smaller (dense, bitmask, codebook)
    and the Huffman-coded bits per nonzero weight of the position and value streams."""
    weight = weight.detach().cpu().float()
    dense = weight.numel() * FP32_BITS / 8
    entries = {gap: relative_entries(weight, gap) for gap in huffman.GAP_BITS_TRIED}
    pruned = min(dense, *(math.ceil(n * (FP32_BITS + gap) / 8) for gap, n in entries.items()))
    sizes = {"dense": dense, "pruned": pruned, "quantized": pruned, "huffman": pruned,
             "bits_per_index": float("nan"), "bits_per_value": float("nan")}
    shared = int(torch.unique(weight[weight != 0]).numel())
    if bits is None or shared > 2 ** bits:
        return sizes
    codebook = shared * FP32_BITS / 8
    sizes["quantized"] = min(pruned, codebook + math.ceil(weight.numel() * bits / 8),
                             *(codebook + math.ceil(n * (bits + gap) / 8) for gap, n in entries.items()))
    encoded = huffman.encode(weight)
    # what the artifact stores (evaluation/artifact.py: the smallest of its encodings; Huffman wins on a pruned layer)
    bitmask = math.ceil(weight.numel() / 8) + int(torch.count_nonzero(weight)) * FP32_BITS / 8
    with_zero = shared + int(shared < weight.numel())
    codebook_dense = with_zero * FP32_BITS / 8 + math.ceil(weight.numel() * max(1, math.ceil(math.log2(max(with_zero, 2)))) / 8)
    sizes["huffman"] = min(dense, bitmask, codebook_dense, huffman.payload_bytes(encoded))
    coded = huffman.bits_per_weight(encoded)
    sizes["bits_per_index"], sizes["bits_per_value"] = coded["index_bits_per_weight"], coded["value_bits_per_weight"]
    return sizes


def stage_metrics(model: nn.Module, layer_bits: Mapping[str, int], measured: Mapping[str, float]) -> dict[str, float]:
    """The run's stage ratios and coded bits (WeightClustering.metrics): `layer_bits` {clustered
    layer: bits}; every other tensor counts at its own bytes in every stage; `measured` holds the
    shipped file's size_bytes and baseline_size_bytes when the pipeline has measured them."""
    totals = dict.fromkeys(STAGES, 0.0)
    weights = {f"{name}.weight": (module, layer_bits.get(name)) for name, module in weighted_layers(model)}
    nonzero, index_bits, value_bits = 0, 0.0, 0.0
    for key, tensor in model.state_dict().items():
        if key not in weights:
            for stage in STAGES:
                totals[stage] += tensor.numel() * tensor.element_size()
            continue
        sizes = stage_sizes(tensor, weights[key][1])
        for stage in STAGES:
            totals[stage] += sizes[stage]
        if not math.isnan(sizes["bits_per_index"]):
            count = int(torch.count_nonzero(tensor))
            nonzero += count
            index_bits += sizes["bits_per_index"] * count
            value_bits += sizes["bits_per_value"] * count
    figures = {COMPRESSION_RATIO_PRUNED: totals["dense"] / totals["pruned"],
               COMPRESSION_RATIO_QUANTIZED: totals["dense"] / totals["quantized"],
               COMPRESSION_RATIO_HUFFMAN_PAYLOAD: totals["dense"] / totals["huffman"]}
    if measured.get(SIZE_BYTES) and measured.get(BASELINE_SIZE_BYTES):
        figures[COMPRESSION_RATIO_HUFFMAN] = measured[BASELINE_SIZE_BYTES] / measured[SIZE_BYTES]
    if nonzero:
        figures[BITS_PER_INDEX] = index_bits / nonzero
        figures[BITS_PER_VALUE] = value_bits / nonzero
        figures[BITS_PER_WEIGHT] = (index_bits + value_bits) / nonzero
    return figures

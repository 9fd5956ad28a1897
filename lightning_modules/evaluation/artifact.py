"""The deployable artifact: the file a user would ship, and whose size the workbench reports.

One file holds the architecture (the module pickled on the `meta` device, so it carries no
weights) and the weights, each tensor in the smallest of the registered encodings:
    dense     the tensor as it is
    bitmask   one bit per entry saying nonzero, then the nonzero values (for sparse tensors)
`load_deployable` rebuilds the identical model. Methods that store weights differently (packed
low-bit integers, codebooks) add an encoding here and touch nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

FORMAT = "compression-workbench/deployable-v1"

Encoded = dict[str, Any]


def _encode_dense(tensor: torch.Tensor) -> Encoded:
    return {"encoding": "dense", "tensor": tensor}


def _decode_dense(encoded: Encoded) -> torch.Tensor:
    return encoded["tensor"]


def _encode_bitmask(tensor: torch.Tensor) -> Encoded:
    flat = tensor.flatten()
    nonzero = flat != 0
    bits = np.packbits(nonzero.numpy())
    return {"encoding": "bitmask", "shape": tuple(tensor.shape), "bits": torch.from_numpy(bits), "values": flat[nonzero]}


def _decode_bitmask(encoded: Encoded) -> torch.Tensor:
    shape = encoded["shape"]
    numel = int(np.prod(shape)) if shape else 1
    nonzero = torch.from_numpy(np.unpackbits(encoded["bits"].numpy(), count=numel).astype(bool))
    flat = torch.zeros(numel, dtype=encoded["values"].dtype)
    flat[nonzero] = encoded["values"]
    return flat.view(shape)


DECODERS: dict[str, Callable[[Encoded], torch.Tensor]] = {"dense": _decode_dense, "bitmask": _decode_bitmask}


def _payload_bytes(encoded: Encoded) -> int:
    return sum(v.numel() * v.element_size() for v in encoded.values() if isinstance(v, torch.Tensor))


def encode_tensor(tensor: torch.Tensor) -> Encoded:
    """The smallest encoding of `tensor`: bitmask+values pays off once about 1/32 of an fp32 tensor is zero."""
    tensor = tensor.detach().cpu().contiguous()
    dense = _encode_dense(tensor)
    if not tensor.is_floating_point() or tensor.numel() < 64:
        return dense
    sparse = _encode_bitmask(tensor)
    return sparse if _payload_bytes(sparse) < _payload_bytes(dense) else dense


def decode_tensor(encoded: Encoded) -> torch.Tensor:
    return DECODERS[encoded["encoding"]](encoded)


def save_deployable(model: nn.Module, path: str | Path) -> int:
    """Write the artifact and return its size in bytes, as stored on disk."""
    path = Path(path)
    skeleton = copy.deepcopy(model).to("meta")
    state = {key: encode_tensor(value) for key, value in model.state_dict().items()}
    torch.save({"format": FORMAT, "skeleton": skeleton, "state": state}, path)
    return path.stat().st_size


def load_deployable(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved by `save_deployable` (the file is trusted: it unpickles the skeleton)."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a workbench artifact (format {payload.get('format')!r}, expected {FORMAT!r})")
    model = payload["skeleton"].to_empty(device=device)
    model.load_state_dict({key: decode_tensor(value) for key, value in payload["state"].items()})
    return model.eval()


def encoding_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per tensor: which encoding the artifact uses and how many bytes it takes."""
    rows = []
    for key, value in model.state_dict().items():
        encoded = encode_tensor(value)
        rows.append({"tensor": key, "encoding": encoded["encoding"], "numel": value.numel(),
                     "bytes": _payload_bytes(encoded)})
    return rows

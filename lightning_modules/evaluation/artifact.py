"""The deployable artifact: the file a user would ship, and whose size the workbench reports.

One file holds the architecture (the module pickled on the `meta` device, so it carries no
weights) and the weights, each tensor in the smallest of the registered encodings:
    dense     the tensor as it is
    bitmask   one bit per entry saying nonzero, then the nonzero values (for sparse tensors)
    packed    integer codes that fit in b < 8 bits (low-bit quantization): the offset to the
              smallest code, then b bits per entry, packed (ceil(n b / 8) bytes)
    codebook  a float tensor with at most 256 distinct values (weight clustering): the distinct
              values, then each entry's index packed at ceil(log2(values)) bits
    huffman   a pruned float tensor whose nonzeros take at most 256 distinct values (pruning then
              clustering: Deep Compression): relative positions and codebook indices, each stream
              Huffman-coded (compression/huffman.py documents the format), its arrays end to end
              in one uint8 tensor (`sizes` says where each ends)
    sparse_codes  int8/uint8 codes with many zero codes (a pruned model quantized: agp_qat): one
              bit per entry saying nonzero, then the nonzero codes, packed at the fewest bits their
              range needs (8 for int8 codes); the size reflects both the zeros and the code width
`load_deployable` rebuilds the model and decodes what no kernel reads once, at load: layers of
packed low-bit codes become plain Conv2d/Linear layers of float weights (deployable_int8.py:
decode_low_bit), a codebook tensor becomes its float values; the outputs are those of the saved
model, the file keeps the narrow encodings (its size is unchanged). Methods that store weights differently add an
encoding here and touch nothing else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_modules.compression import huffman
from lightning_modules.deployable_int8 import decode_low_bit

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


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers < 2**bits, `bits` each, packed little-endian into ceil(n bits / 8) bytes."""
    planes = np.unpackbits(values.astype(np.uint8).reshape(-1, 1), axis=1, count=8, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").reshape(-1)


def _bits_for(levels: int) -> int:
    return max(1, int(np.ceil(np.log2(max(levels, 2)))))


def _encode_packed(tensor: torch.Tensor) -> Encoded:
    flat = tensor.flatten().to(torch.int64)
    offset = int(flat.min())
    bits = _bits_for(int(flat.max()) - offset + 1)
    packed = pack_bits((flat - offset).numpy(), bits)
    return {"encoding": "packed", "shape": tuple(tensor.shape), "dtype": tensor.dtype, "offset": offset,
            "bits": bits, "packed": torch.from_numpy(packed)}


def _decode_packed(encoded: Encoded) -> torch.Tensor:
    shape = encoded["shape"]
    numel = int(np.prod(shape)) if shape else 1
    values = unpack_bits(encoded["packed"].numpy(), encoded["bits"], numel).astype(np.int64) + encoded["offset"]
    return torch.from_numpy(values).to(encoded["dtype"]).view(shape)


def _encode_sparse_codes(tensor: torch.Tensor) -> Encoded:
    """Integer codes as a nonzero bitmask plus the nonzero codes, packed (_encode_packed)."""
    flat = tensor.flatten()
    nonzero = flat != 0
    values = flat[nonzero]
    packed = _encode_packed(values) if values.numel() else _encode_dense(values)
    return {"encoding": "sparse_codes", "shape": tuple(tensor.shape), "dtype": tensor.dtype,
            "bits": torch.from_numpy(np.packbits(nonzero.numpy())), "values": packed}


def _decode_sparse_codes(encoded: Encoded) -> torch.Tensor:
    shape = encoded["shape"]
    numel = int(np.prod(shape)) if shape else 1
    nonzero = torch.from_numpy(np.unpackbits(encoded["bits"].numpy(), count=numel).astype(bool))
    flat = torch.zeros(numel, dtype=encoded["dtype"])
    flat[nonzero] = decode_tensor(encoded["values"]).to(encoded["dtype"])
    return flat.view(shape)


def _encode_codebook(tensor: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> Encoded:
    bits = _bits_for(codebook.numel())
    return {"encoding": "codebook", "shape": tuple(tensor.shape), "bits": bits, "codebook": codebook,
            "indices": torch.from_numpy(pack_bits(indices.numpy(), bits))}


def _decode_codebook(encoded: Encoded) -> torch.Tensor:
    shape = encoded["shape"]
    numel = int(np.prod(shape)) if shape else 1
    indices = torch.from_numpy(unpack_bits(encoded["indices"].numpy(), encoded["bits"], numel).astype(np.int64))
    return encoded["codebook"][indices].view(shape)


# huffman.encode's arrays, stored end to end in one uint8 tensor: torch.save writes a tensor's bytes
# raw (a numpy array would be pickled at protocol 2, its bytes inflated ~1.6x) and each tensor costs
# a zip record, so one per layer
HUFFMAN_ARRAYS = ("codebook", "positions_lengths", "positions_bits", "values_lengths", "values_bits")


def _encode_huffman(tensor: torch.Tensor) -> Encoded:
    encoded = huffman.encode(tensor)
    parts = [np.ascontiguousarray(encoded.pop(key)).view(np.uint8).reshape(-1) for key in HUFFMAN_ARRAYS]
    encoded["sizes"] = tuple(len(part) for part in parts)
    encoded["blob"] = torch.from_numpy(np.concatenate(parts))
    return encoded


def _decode_huffman(encoded: Encoded) -> torch.Tensor:
    blob, arrays, start = encoded["blob"].numpy(), {}, 0
    for key, size in zip(HUFFMAN_ARRAYS, encoded["sizes"]):
        arrays[key] = blob[start:start + size].copy()
        start += size
    arrays["codebook"] = arrays["codebook"].view(np.float32)
    return huffman.decode({**encoded, **arrays})


DECODERS: dict[str, Callable[[Encoded], torch.Tensor]] = {
    "dense": _decode_dense, "bitmask": _decode_bitmask, "packed": _decode_packed, "codebook": _decode_codebook,
    "huffman": _decode_huffman, "sparse_codes": _decode_sparse_codes,
}
# encodings narrower than any runtime's own file stores the weights (float weights as a codebook or
# Huffman-coded; int8 codes without their zeros: ONNX Runtime's file holds every code, so model.pt is
# what ships)
NARROW_ENCODINGS = ("codebook", "huffman", "sparse_codes")
MAX_CODEBOOK = 256


def _payload_bytes(encoded: Encoded) -> int:
    if encoded["encoding"] == "huffman":  # the blob plus the shape, counts and gap_bits
        return encoded["blob"].numel() + huffman.HEADER_BYTES
    return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else _payload_bytes(v)
               for v in encoded.values() if isinstance(v, (torch.Tensor, dict)))


def encode_tensor(tensor: torch.Tensor) -> Encoded:
    """The smallest encoding of `tensor`: bitmask+values pays off once about 1/32 of an fp32 tensor
    is zero; int8/uint8 codes that fit in fewer bits are packed, full 8-bit ones stored without their
    zero codes (sparse_codes) once about 1/8 of them are zero; a float tensor with at most 256
    distinct values is stored as a codebook plus packed indices, or Huffman-coded when it also has
    zeros (a pruned, clustered layer) and that is smaller."""
    tensor = tensor.detach().cpu().contiguous()
    dense = _encode_dense(tensor)
    if tensor.numel() < 64:
        return dense
    if tensor.dtype in (torch.int8, torch.uint8):
        packed = _encode_packed(tensor)
        candidates = [dense, packed]
        if packed["bits"] == 8:  # full-width int8 codes; low-bit ones stay packed at their width (lowbit's file)
            candidates.append(_encode_sparse_codes(tensor))
        codebook, indices = torch.unique(tensor.flatten(), return_inverse=True)
        if codebook.numel() <= 2:  # binary codes -1, +1: one bit each (packing their range takes two)
            candidates.append(_encode_codebook(tensor, codebook, indices))
        return min(candidates, key=_payload_bytes)
    if not tensor.is_floating_point():
        return dense
    candidates = [dense, _encode_bitmask(tensor)]
    flat = tensor.flatten()
    # more distinct values in a slice means more in the whole: most tensors are ruled out cheaply
    if torch.unique(flat[: 4 * MAX_CODEBOOK]).numel() <= MAX_CODEBOOK:
        codebook, indices = torch.unique(flat, return_inverse=True)
        if codebook.numel() <= MAX_CODEBOOK:
            candidates.append(_encode_codebook(tensor, codebook, indices))
            if bool((codebook == 0).any()):  # pruned too: Huffman-coded positions and values may be smaller
                candidates.append(_encode_huffman(tensor))
    return min(candidates, key=_payload_bytes)


def decode_tensor(encoded: Encoded) -> torch.Tensor:
    return DECODERS[encoded["encoding"]](encoded)


def save_deployable(model: nn.Module, path: str | Path) -> int:
    """Write the artifact and return its size in bytes, as stored on disk."""
    path = Path(path)
    skeleton = copy.deepcopy(model).to("meta")
    state = {key: encode_tensor(value) for key, value in model.state_dict().items()}
    torch.save({"format": FORMAT, "skeleton": skeleton, "state": state}, path)
    return path.stat().st_size


def load_deployable(path: str | Path, device: str | torch.device = "cpu", low_bit_as_int8: bool = False) -> nn.Module:
    """Rebuild the model saved by `save_deployable` (the file is trusted: it unpickles the skeleton).

    Packed low-bit layers are decoded once: into float Conv2d/Linear layers, or, with
    `low_bit_as_int8` (for a runtime with int8 kernels), into int8 layers holding the codes widened to
    8 bits, which run on those kernels with the same outputs."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    if payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a workbench artifact (format {payload.get('format')!r}, expected {FORMAT!r})")
    model = payload["skeleton"].to_empty(device=device)
    model.load_state_dict({key: decode_tensor(value) for key, value in payload["state"].items()})
    return (model if low_bit_as_int8 else decode_low_bit(model)).eval()


def encoding_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per tensor: which encoding the artifact uses and how many bytes it takes."""
    rows = []
    for key, value in model.state_dict().items():
        encoded = encode_tensor(value)
        rows.append({"tensor": key, "encoding": encoded["encoding"], "numel": value.numel(),
                     "bytes": _payload_bytes(encoded)})
    return rows

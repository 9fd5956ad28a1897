"""The deployable artifact: the file a user would ship, and whose size the workbench reports.

One file holds the architecture as plain data (architecture.py: the model's class and arguments,
then what compression changed in it; no pickle, so loading runs no code from the file), the input
the model expects (shape, normalisation, class names: `Artifact.predict` takes raw images) and
the weights, each tensor in the smallest of the registered encodings:
    dense     the tensor as it is
    bitmask   one bit per entry saying nonzero, then the nonzero values (for sparse tensors)
    packed    integer codes that fit in fewer bits than their type (low-bit quantization, int32
              bias codes): the offset to the smallest code, then b <= 32 bits per entry, packed
              (ceil(n b / 8) bytes)
    codebook  a float tensor with at most 256 distinct values (weight clustering): the distinct
              values, then each entry's index packed at ceil(log2(values)) bits
    huffman   a pruned float tensor whose nonzeros take at most 256 distinct values (pruning then
              clustering: Deep Compression): relative positions and codebook indices, each stream
              Huffman-coded (compression/huffman.py documents the format), its arrays end to end
              in one uint8 tensor (`sizes` says where each ends)
    constant  every entry the same (a symmetric scheme's zero points, an all-zero bias): the value
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

import itertools
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_modules.architecture import (
    ArchitectureError, ModelRecipe, TensorSlot, build_architecture, decode_value, describe_changes, encode_value,
    tensor_slots,
)
from lightning_modules.compression import huffman
from lightning_modules.data import InputSpec
from lightning_modules.deployable_int8 import decode_low_bit

FORMAT = "compression-workbench/artifact-v2"
MAGIC = b"CWBMODEL"

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
    """Unsigned integers < 2**bits (bits <= 32), `bits` each, packed little-endian into ceil(n bits / 8) bytes."""
    as_bytes = values.astype("<u4").reshape(-1, 1).view(np.uint8)
    planes = np.unpackbits(as_bytes, axis=1, count=32, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    planes = np.zeros((count, 32), dtype=np.uint8)
    planes[:, :bits] = np.unpackbits(packed, count=count * bits, bitorder="little").reshape(count, bits)
    return np.packbits(planes, axis=1, bitorder="little").view("<u4").reshape(-1)


def _bits_for(levels: int) -> int:
    return max(1, int(np.ceil(np.log2(max(levels, 2)))))


def _encode_packed(tensor: torch.Tensor) -> Encoded | None:
    """None when the codes' range needs more than 32 bits."""
    flat = tensor.flatten().to(torch.int64)
    offset = int(flat.min())
    bits = _bits_for(int(flat.max()) - offset + 1)
    if bits > 32:
        return None
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


def _encode_constant(tensor: torch.Tensor) -> Encoded:
    """Every entry the same value (zero points of a symmetric scheme, zero biases): the value once."""
    return {"encoding": "constant", "shape": tuple(tensor.shape), "dtype": tensor.dtype,
            "value": tensor.flatten()[0].item()}


def _decode_constant(encoded: Encoded) -> torch.Tensor:
    return torch.full(encoded["shape"], encoded["value"], dtype=encoded["dtype"])


def _encode_codebook(tensor: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor) -> Encoded:
    bits = _bits_for(codebook.numel())
    return {"encoding": "codebook", "shape": tuple(tensor.shape), "bits": bits, "codebook": codebook,
            "indices": torch.from_numpy(pack_bits(indices.numpy(), bits))}


def _decode_codebook(encoded: Encoded) -> torch.Tensor:
    shape = encoded["shape"]
    numel = int(np.prod(shape)) if shape else 1
    indices = torch.from_numpy(unpack_bits(encoded["indices"].numpy(), encoded["bits"], numel).astype(np.int64))
    return encoded["codebook"][indices].view(shape)


# huffman.encode's arrays, stored end to end in one uint8 tensor: one entry in the header per layer
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
    "huffman": _decode_huffman, "sparse_codes": _decode_sparse_codes, "constant": _decode_constant,
}
# encodings narrower than any runtime's own file stores the weights (float weights without their zeros,
# as a codebook or Huffman-coded; int8 codes without their zeros: ONNX Runtime's file holds every
# weight, so model.pt is what ships and is decoded once at load). A pruned model whose quantizer kept
# every layer float (min_speedup) was shipped as a dense .onnx: 1.0x at sparsity 0.8 (issue 14's agp_qat)
NARROW_ENCODINGS = ("bitmask", "codebook", "huffman", "sparse_codes")
MAX_CODEBOOK = 256


def _payload_bytes(encoded: Encoded) -> int:
    if encoded["encoding"] == "huffman":  # the blob plus the shape, counts and gap_bits
        return encoded["blob"].numel() + huffman.HEADER_BYTES
    return sum(v.numel() * v.element_size() if isinstance(v, torch.Tensor) else _payload_bytes(v)
               for v in encoded.values() if isinstance(v, (torch.Tensor, dict)))


def encode_tensor(tensor: torch.Tensor) -> Encoded:
    """The smallest encoding of `tensor`: one value when every entry is the same; bitmask+values pays
    off once about 1/32 of an fp32 tensor is zero; integer codes that fit in fewer bits than their
    type are packed (int32 bias codes at about 16 bits, 4-bit codes at 4), int8 weight codes (8 bits, or
    7 under reduce_range) stored without their zero codes (sparse_codes) once enough of them are zero; a
    float tensor with at most 256 distinct values is stored as a codebook plus packed indices, or Huffman-coded when it
    also has zeros (a pruned, clustered layer) and that is smaller."""
    tensor = tensor.detach().cpu().contiguous()
    dense = _encode_dense(tensor)
    if tensor.numel() > 1 and tensor.dtype != torch.bool and bool((tensor == tensor.flatten()[0]).all()) \
            and not (tensor.is_floating_point() and bool(tensor.flatten()[0].isnan())):
        return _encode_constant(tensor)
    if tensor.numel() < 8:
        return dense
    if tensor.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        packed = _encode_packed(tensor)
        if packed is None:
            return dense
        candidates = [dense, packed]
        # int8 weight codes, -127..127 or reduce_range's -63..63 (7 bits): low-bit ones (6 bits and fewer) stay packed
        if packed["bits"] >= 7 and tensor.element_size() == 1:
            candidates.append(_encode_sparse_codes(tensor))
        if tensor.element_size() == 1:
            codebook, indices = torch.unique(tensor.flatten(), return_inverse=True)
            if codebook.numel() <= 2:  # binary codes -1, +1: one bit each (packing their range takes two)
                candidates.append(_encode_codebook(tensor, codebook, indices))
        return min(candidates, key=_payload_bytes)
    if not tensor.is_floating_point() or tensor.numel() < 64:
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


# ----------------------------------------------------------------------------- the container


class NotAnArtifact(ValueError):
    """The file is not a workbench artifact at all (another format: a pickle, a checkpoint, ...)."""


class ArtifactError(ValueError):
    """A workbench artifact that is damaged, truncated, or describes something it may not build."""


def _pack(value: Any, data: bytearray) -> Any:
    """An encoding's fields as JSON, its tensors appended to `data` and referenced by offset."""
    if isinstance(value, torch.Tensor):
        raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        reference = {"array": [str(value.dtype).removeprefix("torch."), list(value.shape), len(data), len(raw)]}
        data.extend(raw)
        return reference
    if isinstance(value, dict):
        return {"fields": {key: _pack(item, data) for key, item in value.items()}}
    return encode_value(value, "an encoding field")


def _unpack(value: Any, data: memoryview) -> Any:
    if isinstance(value, dict) and "array" in value:
        dtype_name, shape, offset, size = value["array"]
        dtype = decode_value({"dtype": dtype_name})
        if offset < 0 or offset + size > len(data):
            raise ArtifactError(f"a tensor lies at bytes {offset}..{offset + size} of a {len(data)}-byte data section")
        flat = torch.frombuffer(bytearray(data[offset:offset + size]), dtype=torch.uint8) if size \
            else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).reshape(shape)
    if isinstance(value, dict) and "fields" in value:
        return {key: _unpack(item, data) for key, item in value["fields"].items()}
    return decode_value(value)


def save_deployable(model: nn.Module, path: str | Path, recipe: ModelRecipe | None = None,
                    input_spec: InputSpec | None = None) -> int:
    """Write the artifact and return its size in bytes, as stored on disk.

    The file (no pickle anywhere; MAGIC, then the header's length as 4 bytes little-endian, the
    header as zlib-compressed JSON, then the tensors' bytes end to end):
        format    FORMAT
        recipe    the model's class and constructor arguments (architecture.ModelRecipe), or null
        changes   what compression changed in that model (architecture.describe_changes)
        input     the input it expects (data.InputSpec: shape, normalisation, class names), or null
        tensors   per tensor: its key, slot (parameter, buffer, ...), and its encoding's fields, each
                  tensor field as [dtype, shape, offset, bytes] into the data section; `frozen` on a
                  parameter that does not train, `channels_last` on a tensor stored in that layout
        data_bytes, data_crc32   the data section's length and CRC-32, checked at load
    `recipe` None: the whole module tree is described (a model that was not built from a config).
    """
    path = Path(path)
    data = bytearray()
    tensors = [{"key": item.key, "slot": item.slot, "encoded": _pack(encode_tensor(item.tensor), data),
                # written only where they differ from the usual: a trainable parameter in the default layout
                **({"frozen": True} if item.slot == "parameter" and not item.requires_grad else {}),
                **({"channels_last": True} if item.channels_last else {})}
               for item in tensor_slots(model)]
    header = {
        "format": FORMAT,
        "recipe": recipe.to_json() if recipe is not None else None,
        "changes": describe_changes(model, recipe),
        "input": input_spec.to_json() if input_spec is not None else None,
        "tensors": tensors,
        "data_bytes": len(data),
        "data_crc32": zlib.crc32(data),
    }
    packed_header = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    with open(path, "wb") as file:
        file.write(MAGIC + struct.pack("<I", len(packed_header)) + packed_header + data)
    return path.stat().st_size


def read_header(path: str | Path) -> tuple[dict[str, Any], memoryview]:
    """The artifact's header (checked) and its data section; NotAnArtifact / ArtifactError otherwise."""
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise ArtifactError(f"{path}: cannot be read ({error})") from error
    if not content.startswith(MAGIC):
        kind = ("a zip archive: torch.save's format, a pickle, which is never loaded because unpickling "
                "runs code; re-save it with this version" if content.startswith(b"PK\x03\x04")
                else "an unknown format")
        raise NotAnArtifact(f"{path} is not a workbench artifact (it is {kind}; expected {FORMAT})")
    try:
        (length,) = struct.unpack("<I", content[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4
        header = json.loads(zlib.decompress(content[start:start + length]))
    except (struct.error, zlib.error, ValueError) as error:
        raise ArtifactError(f"{path}: damaged or truncated workbench artifact, its header cannot be read "
                            f"({error})") from error
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {header.get('format')!r}, this version reads {FORMAT!r}")
    data = memoryview(content)[start + length:]
    if len(data) != header["data_bytes"] or zlib.crc32(data) != header["data_crc32"]:
        raise ArtifactError(f"{path}: damaged or truncated workbench artifact: its tensors take {len(data)} bytes "
                            f"with CRC-32 {zlib.crc32(data):08x}, the header says {header['data_bytes']} bytes "
                            f"with {header['data_crc32']:08x}")
    return header, data


@dataclass
class Artifact:
    """A loaded artifact: the model, and the input it expects (None for a file saved without one)."""

    model: nn.Module
    input_spec: InputSpec | None

    @torch.no_grad()
    def predict(self, raw_images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities (N, classes) for raw images, pixels as the dataset gives them."""
        if self.input_spec is None:
            raise ValueError("this artifact was saved without its input description; call .model on normalised "
                             "tensors instead")
        inputs = self.input_spec.normalise(raw_images)
        # an int8 model holds buffers and no parameters; a float one may hold no buffers
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        device = next((tensor.device for tensor in tensors), torch.device("cpu"))
        return torch.softmax(self.model.eval()(inputs.to(device)).float(), dim=1).cpu().numpy()


def load_artifact(path: str | Path, device: str | torch.device = "cpu", low_bit_as_int8: bool = False) -> Artifact:
    """Rebuild the model saved by `save_deployable`, executing nothing the file says: the model is
    built from its recipe's class (an nn.Module class or a workbench builder), its changes replayed
    from plain data (architecture.py), its tensors decoded from their encodings.

    Packed low-bit layers are decoded once: into float Conv2d/Linear layers, or, with
    `low_bit_as_int8` (for a runtime with int8 kernels), into int8 layers holding the codes widened to
    8 bits, which run on those kernels with the same outputs."""
    header, data = read_header(path)
    try:
        recipe = ModelRecipe.from_json(header["recipe"]) if header["recipe"] is not None else None
        slots = [TensorSlot(item["key"], item["slot"], decode_tensor(_unpack(item["encoded"], data)),
                            item["slot"] == "parameter" and not item.get("frozen", False),
                            bool(item.get("channels_last", False))) for item in header["tensors"]]
        model = build_architecture(recipe, header["changes"], slots)
    except ArchitectureError as error:
        raise ArtifactError(f"{path}: {error}") from error
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        raise ArtifactError(f"{path}: damaged workbench artifact ({type(error).__name__}: {error})") from error
    model = model.to(device)
    input_spec = InputSpec.from_json(header["input"]) if header.get("input") else None
    return Artifact((model if low_bit_as_int8 else decode_low_bit(model)).eval(), input_spec)


def load_deployable(path: str | Path, device: str | torch.device = "cpu", low_bit_as_int8: bool = False) -> nn.Module:
    """The model of the artifact at `path` (load_artifact's, without its input description)."""
    return load_artifact(path, device, low_bit_as_int8).model


def tensor_role(key: str) -> str:
    """What a tensor is for, by its name: the rows of the encoding table add up per role, so a file
    far from its width's limit shows what holds it there (per-channel scales and biases of a small
    layer weigh as much as its codes)."""
    name = key.rpartition(".")[2]
    if name in ("weight", "weight_codes", "weight_t_codes"):
        return "weights"
    if name in ("bias", "bias_codes"):
        return "bias"
    if "scale" in name or "zero_point" in name:
        return "scales and zero points"
    if name in ("running_mean", "running_var", "num_batches_tracked"):
        return "batchnorm statistics"
    return "other"


def encoding_table(model: nn.Module, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Per tensor: which encoding the artifact uses, its role and how many bytes it takes; with the
    saved file's `path`, a last row for the header (architecture, input, encodings' fields)."""
    rows = []
    for item in tensor_slots(model):
        encoded = encode_tensor(item.tensor)
        rows.append({"tensor": item.key, "role": tensor_role(item.key), "encoding": encoded["encoding"],
                     "numel": item.tensor.numel(), "bytes": _payload_bytes(encoded)})
    if path is not None:
        length = int.from_bytes(Path(path).read_bytes()[len(MAGIC):len(MAGIC) + 4], "little")
        rows.append({"tensor": "(header)", "role": "header", "encoding": "json+zlib", "numel": 0,
                     "bytes": len(MAGIC) + 4 + length})
    return rows

"""Huffman coding of a pruned, weight-shared tensor: the last stage of Deep Compression (Han, Mao
and Dally, ICLR 2016, section 4), as a tensor encoding the artifact can pick.

A tensor whose nonzero entries take few distinct values (pruning, then weight sharing) is stored
as two symbol streams, each entropy-coded with its own canonical Huffman code:

    positions  the nonzero entries in flattened (row-major) order, each as its distance from the
               previous one (the first from -1) minus 1, a symbol in [0, 2**gap_bits). A distance
               over 2**gap_bits is bridged by filler entries, each a full step of 2**gap_bits whose
               value is the ZERO symbol: the paper's relative indexing with filler zeros (its
               Figure 2, 8 bits for convolutions, 5 for fully-connected layers).
    values     one symbol per entry: the index of its value in the codebook (the sorted distinct
               nonzero values), or ZERO = len(codebook) for a filler.

`gap_bits` is chosen per tensor as the one giving the smallest coded size (the paper's 5 and 8 are
among those tried, so the file is never larger than the paper's layout).

The encoded form (all plain arrays and integers: nothing in it executes):
    encoding "huffman", shape, gap_bits, count (entries, fillers included), nonzero (entries without),
    codebook   float32 [K]
    for each stream ("positions", "values"): <stream>_lengths, uint8, one code length per symbol
               (0: the symbol never occurs; a canonical code is rebuilt from the lengths alone), and
               <stream>_bits, uint8, the codes concatenated most significant bit first, the last
               byte padded with zeros.
Its size is `payload_bytes`: the arrays plus 16 bytes for the shape, counts and gap_bits.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

import numpy as np
import torch

MAX_CODE_LENGTH = 16  # decoding looks codes up in a table of 2**16 entries
GAP_BITS_TRIED = range(1, 13)
HEADER_BYTES = 16  # shape, counts, gap_bits: what a byte-exact container spends beside the arrays


# ----------------------------------------------------------------------------- canonical Huffman codes


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """The Huffman code length of each symbol from its count (0 for a symbol that never occurs).

    A tree deeper than `max_length` (very skewed counts) is rebuilt from counts halved, with every
    used symbol kept at least 1, until it fits: slightly longer codes for the rarest symbols, a
    bounded decoding table for all."""
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(len(counts), dtype=np.uint8)
    used = np.flatnonzero(counts)
    if len(used) == 1:
        lengths[used] = 1  # one symbol still needs one bit per occurrence to be counted
        return lengths
    while len(used):
        depths = _tree_depths(counts[used])
        if depths.max() <= max_length:
            lengths[used] = depths
            return lengths
        counts = np.where(counts > 0, np.maximum(counts // 2, 1), 0)
    return lengths


def _tree_depths(counts: np.ndarray) -> np.ndarray:
    """Depth of each leaf in a Huffman tree over `counts` (all positive, at least two)."""
    order = itertools.count()  # ties broken by creation order: the same tree on every machine
    heap = [(int(count), next(order), [symbol]) for symbol, count in enumerate(counts)]
    heapq.heapify(heap)
    depths = np.zeros(len(counts), dtype=np.int64)
    while len(heap) > 1:
        count_a, _, symbols_a = heapq.heappop(heap)
        count_b, _, symbols_b = heapq.heappop(heap)
        merged = symbols_a + symbols_b
        depths[merged] += 1
        heapq.heappush(heap, (count_a + count_b, next(order), merged))
    return depths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol: symbols sorted by (length, symbol) take consecutive
    codes, shifted left whenever the length grows; only the lengths need storing."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def encode_symbols(symbols: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The codes of `symbols` concatenated, most significant bit first, packed into bytes."""
    if len(symbols) == 0:
        return np.zeros(0, dtype=np.uint8)
    codes, sizes = canonical_codes(lengths)[symbols], lengths[symbols].astype(np.int64)
    width = int(sizes.max())
    shifts = sizes[:, None] - 1 - np.arange(width)[None, :]  # bit j of each code, from its top
    bits = (codes[:, None] >> np.maximum(shifts, 0)) & 1
    return np.packbits(bits[shifts >= 0].astype(np.uint8))


def decode_symbols(packed: np.ndarray, lengths: np.ndarray, count: int) -> np.ndarray:
    """`count` symbols read back from `packed` with the canonical code of `lengths`.

    A table indexed by the next `width` bits gives the symbol whose code starts there and its
    length; the windows of every bit position are computed at once, the walk from code to code is
    a loop over the symbols."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    width = int(lengths.max())
    table_symbol = np.zeros(1 << width, dtype=np.int64)
    table_length = np.zeros(1 << width, dtype=np.int64)
    codes = canonical_codes(lengths)
    for symbol in np.flatnonzero(lengths):
        spread = width - int(lengths[symbol])
        start = int(codes[symbol]) << spread
        table_symbol[start:start + (1 << spread)] = symbol
        table_length[start:start + (1 << spread)] = lengths[symbol]
    bits = np.concatenate([np.unpackbits(packed).astype(np.int64), np.zeros(width, dtype=np.int64)])
    windows = np.zeros(len(bits) - width, dtype=np.int64)
    for offset in range(width):
        windows = (windows << 1) | bits[offset:offset + len(windows)]
    windows, symbol_at, length_at = windows.tolist(), table_symbol.tolist(), table_length.tolist()
    out, position = [], 0
    for _ in range(count):
        window = windows[position]
        out.append(symbol_at[window])
        position += length_at[window]
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- a pruned, shared tensor


def relative_positions(flat_nonzero: np.ndarray, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap symbols, filler flags) of the entries that locate `flat_nonzero` (sorted positions),
    fillers inserted where a distance exceeds 2**gap_bits."""
    step = 1 << gap_bits
    distances = np.diff(flat_nonzero, prepend=-1)
    fillers = (distances - 1) // step  # full steps before each nonzero entry
    entries = fillers + 1
    total = int(entries.sum())
    gaps = np.full(total, step - 1, dtype=np.int64)  # a filler advances a full step
    is_filler = np.ones(total, dtype=bool)
    last = np.cumsum(entries) - 1  # each nonzero entry comes after its fillers
    gaps[last] = distances - fillers * step - 1
    is_filler[last] = False
    return gaps, is_filler


def encode(tensor: torch.Tensor, gap_bits: int | None = None) -> dict[str, Any]:
    """The Huffman-coded form of `tensor` (see the module docstring); `gap_bits` None: the smallest."""
    if gap_bits is None:
        return min((encode(tensor, bits) for bits in GAP_BITS_TRIED), key=payload_bytes)
    flat = tensor.detach().cpu().flatten().float().numpy()
    positions = np.flatnonzero(flat)
    codebook, value_index = np.unique(flat[positions], return_inverse=True)
    gaps, is_filler = relative_positions(positions, gap_bits)
    values = np.full(len(gaps), len(codebook), dtype=np.int64)  # ZERO for the fillers
    values[~is_filler] = value_index
    encoded: dict[str, Any] = {"encoding": "huffman", "shape": tuple(tensor.shape), "gap_bits": gap_bits,
                               "count": len(gaps), "nonzero": len(positions), "codebook": codebook.astype(np.float32)}
    for stream, symbols, alphabet in (("positions", gaps, 1 << gap_bits), ("values", values, len(codebook) + 1)):
        lengths = code_lengths(np.bincount(symbols, minlength=alphabet))
        encoded[f"{stream}_lengths"] = lengths
        encoded[f"{stream}_bits"] = encode_symbols(symbols, lengths)
    return encoded


def decode(encoded: dict[str, Any]) -> torch.Tensor:
    """The tensor `encode` was given, bit for bit."""
    count, step = encoded["count"], 1 << encoded["gap_bits"]
    gaps = decode_symbols(encoded["positions_bits"], encoded["positions_lengths"], count)
    values = decode_symbols(encoded["values_bits"], encoded["values_lengths"], count)
    codebook = np.asarray(encoded["codebook"], dtype=np.float32)
    positions = np.cumsum(gaps + 1) - 1
    real = values < len(codebook)
    if np.any(gaps[~real] != step - 1):
        raise ValueError("corrupt huffman encoding: a filler entry does not advance a full step")
    size = int(np.prod(encoded["shape"]))
    flat = np.zeros(size, dtype=np.float32)
    if len(positions) and positions[-1] >= size:
        raise ValueError(f"corrupt huffman encoding: position {positions[-1]} outside a tensor of {size} values")
    flat[positions[real]] = codebook[values[real]]
    return torch.from_numpy(flat).view(encoded["shape"])


def payload_bytes(encoded: dict[str, Any]) -> int:
    arrays = ("codebook", "positions_lengths", "positions_bits", "values_lengths", "values_bits")
    return HEADER_BYTES + sum(int(np.asarray(encoded[key]).nbytes) for key in arrays)


def bits_per_weight(encoded: dict[str, Any]) -> dict[str, float]:
    """Coded bits per nonzero weight of each stream, fillers included: the paper's bits per index
    and per weight after Huffman coding."""
    nonzero = max(1, encoded["nonzero"])
    return {"index_bits_per_weight": 8 * len(encoded["positions_bits"]) / nonzero,
            "value_bits_per_weight": 8 * len(encoded["values_bits"]) / nonzero}

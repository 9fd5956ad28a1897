"""Huffman coding of pruned, weight-shared tensors (Deep Compression's last stage): exact round
trips, the paper's relative indexing with filler zeros, sizes near the entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.compression import huffman


def shared_sparse(shape: tuple[int, ...], density: float, levels: int, seed: int = 0) -> torch.Tensor:
    """A pruned tensor whose survivors take `levels` shared values (what pruning then clustering leaves)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.linspace(-0.5, 0.5, levels)
    codebook = codebook[codebook != 0]
    values = codebook[torch.randint(len(codebook), shape, generator=generator)]
    return values * (torch.rand(shape, generator=generator) < density)


# ----------------------------------------------------------------------------- the code itself


def test_code_lengths_are_huffman_lengths_and_satisfy_kraft_with_equality():
    lengths = huffman.code_lengths(np.array([5, 9, 12, 13, 16, 45]))
    assert sorted(lengths.tolist()) == [1, 3, 3, 3, 4, 4]
    assert lengths[5] == 1  # the most frequent symbol gets the shortest code
    assert sum(2.0 ** -int(n) for n in lengths) == 1.0


def test_unused_symbols_get_no_code_and_a_lone_symbol_one_bit():
    assert huffman.code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]
    assert huffman.code_lengths(np.array([3, 0, 3])).tolist() == [1, 0, 1]


def test_canonical_codes_are_prefix_free():
    lengths = huffman.code_lengths(np.array([1, 1, 2, 3, 5, 8, 13, 21]))
    codes = huffman.canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_very_skewed_counts_are_limited_to_16_bits_and_still_decode():
    counts = np.array([int(1.6 ** k) + 1 for k in range(40)])  # a Fibonacci-like tail: depth ~39 unlimited
    lengths = huffman.code_lengths(counts)
    assert lengths.max() <= huffman.MAX_CODE_LENGTH
    assert sum(2.0 ** -int(n) for n in lengths) <= 1.0
    symbols = np.random.default_rng(0).choice(40, size=5000, p=counts / counts.sum())
    assert np.array_equal(huffman.decode_symbols(huffman.encode_symbols(symbols, lengths), lengths, 5000), symbols)


def test_coded_size_is_within_one_bit_per_symbol_of_the_entropy():
    probabilities = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
    symbols = np.random.default_rng(1).choice(6, size=20000, p=probabilities)
    counts = np.bincount(symbols, minlength=6)
    lengths = huffman.code_lengths(counts)
    bits_per_symbol = 8 * len(huffman.encode_symbols(symbols, lengths)) / len(symbols)
    frequencies = counts / counts.sum()
    entropy = -float(np.sum(frequencies * np.log2(frequencies)))
    assert entropy <= bits_per_symbol < entropy + 1
    assert bits_per_symbol < 3  # fixed-width codes for 6 symbols take 3 bits


# ----------------------------------------------------------------------------- a pruned, shared tensor


@pytest.mark.parametrize(("shape", "density", "levels"), [
    ((300, 784), 0.08, 32), ((16, 6, 5, 5), 0.12, 256), ((10, 84), 0.5, 4), ((120, 400), 0.01, 32),
    ((6, 1, 5, 5), 1.0, 256),
])
def test_round_trip_is_exact(shape, density, levels):
    tensor = shared_sparse(shape, density, levels)
    encoded = huffman.encode(tensor)
    decoded = huffman.decode(encoded)
    assert decoded.shape == tensor.shape and torch.equal(decoded, tensor)
    assert encoded["nonzero"] == int(torch.count_nonzero(tensor))


@pytest.mark.parametrize("tensor", [
    torch.zeros(5, 7), torch.eye(1), torch.full((3, 3), 0.25), torch.tensor([0.0, 0.0, -1.5]),
])
def test_edge_cases_round_trip(tensor):
    assert torch.equal(huffman.decode(huffman.encode(tensor)), tensor)


def test_a_distance_over_the_bound_is_bridged_by_filler_zeros_as_in_the_paper():
    # gap_bits 3: steps of at most 8. Nonzeros at 3 and at 3 + 8 (fits) and 3 + 8 + 9 (one filler).
    gaps, is_filler = huffman.relative_positions(np.array([3, 11, 20]), gap_bits=3)
    assert gaps.tolist() == [3, 7, 7, 0] and is_filler.tolist() == [False, False, True, False]
    tensor = torch.zeros(64)
    tensor[[3, 11, 20, 63]] = torch.tensor([1.0, -1.0, 1.0, 2.0])
    encoded = huffman.encode(tensor, gap_bits=3)
    assert encoded["count"] == 4 + 1 + 5  # 20 -> 63 is 43 away: five fillers of 8, then a distance of 3
    assert torch.equal(huffman.decode(encoded), tensor)


def test_the_chosen_gap_bits_is_never_larger_than_the_papers():
    tensor = shared_sparse((300, 784), 0.08, 32, seed=3)
    best = huffman.encode(tensor)
    paper = huffman.encode(tensor, gap_bits=5)  # fully-connected layers in the paper
    assert huffman.payload_bytes(best) <= huffman.payload_bytes(paper)
    assert torch.equal(huffman.decode(paper), tensor)


def test_a_pruned_shared_layer_takes_a_fraction_of_its_dense_bytes():
    # LeNet-300-100's first layer at the paper's 8% kept and 5-bit sharing: the paper's layer
    # costs about 5 bits (value) + 5 bits (index) per survivor before Huffman, less after
    tensor = shared_sparse((300, 784), 0.08, 32, seed=2)
    encoded = huffman.encode(tensor)
    bits = huffman.bits_per_weight(encoded)
    assert bits["value_bits_per_weight"] <= 5.2 and bits["index_bits_per_weight"] <= 5.5
    assert tensor.numel() * 4 / huffman.payload_bytes(encoded) > 30


def test_a_corrupt_stream_is_refused_with_a_clear_error():
    tensor = torch.zeros(40)
    tensor[[0, 39]] = 1.0
    encoded = huffman.encode(tensor, gap_bits=2)
    encoded["shape"] = (20,)  # positions now run past the end of the tensor
    with pytest.raises(ValueError, match="corrupt huffman encoding: position 39 outside a tensor of 20 values"):
        huffman.decode(encoded)

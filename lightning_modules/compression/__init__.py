"""Compression methods, one module per family; each method is a Lightning callback (base.py)."""

from lightning_modules.compression.base import CompressionCallback
from lightning_modules.compression.pruning import MagnitudePruning
from lightning_modules.compression.lowrank import LowRankDecomposition as LowRankDecomposition

__all__ = ["CompressionCallback", "MagnitudePruning"]

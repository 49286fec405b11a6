"""Hash heads, losses, and (packed) binary codes."""

from dmmh.hashing.heads import HashHead, ScaledTanhHead, StraightThroughHead, TanhHead, binarize
from dmmh.hashing.index import HammingIndex, IndexFileError
from dmmh.hashing.multi_index import MultiIndex
from dmmh.hashing.losses import CombinedLoss, HashLoss, hash_centers
from dmmh.hashing.packing import pack_bits, unpack_bits
from dmmh.hashing.search import RangeResult, hamming_distance_packed, hamming_knn, hamming_range_search

__all__ = ["HashHead", "TanhHead", "StraightThroughHead", "ScaledTanhHead", "binarize", "CombinedLoss", "HashLoss", "hash_centers",
           "pack_bits", "unpack_bits", "hamming_distance_packed", "hamming_knn", "hamming_range_search", "RangeResult",
           "HammingIndex", "IndexFileError", "MultiIndex"]

"""Hash heads, losses, and (packed) binary codes."""

from dmmh.hashing.heads import HashHead, ScaledTanhHead, StraightThroughHead, TanhHead, binarize
from dmmh.hashing.losses import CombinedLoss, HashLoss, hash_centers

__all__ = ["HashHead", "TanhHead", "StraightThroughHead", "ScaledTanhHead", "binarize", "CombinedLoss", "HashLoss", "hash_centers"]

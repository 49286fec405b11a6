"""Per-modality encoders, registered by name in :data:`dmmh.registry.ENCODERS`."""

from dmmh.encoders.base import Encoder, TokenExpansion
from dmmh.encoders.mlp import MLPEncoder

__all__ = ["Encoder", "TokenExpansion", "MLPEncoder"]

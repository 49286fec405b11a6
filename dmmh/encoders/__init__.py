"""Per-modality encoders, registered by name in :data:`dmmh.registry.ENCODERS`."""

from dmmh.encoders.base import Encoder, TokenExpansion
from dmmh.encoders.mlp import MLPEncoder
from dmmh.encoders.mamba import Mamba, MambaEncoder
from dmmh.encoders.transformer import TransformerEncoder
from dmmh.encoders.clip import ClipImageEncoder, ClipTextEncoder  # open_clip is imported only when built

__all__ = ["Encoder", "TokenExpansion", "MLPEncoder", "Mamba", "MambaEncoder", "TransformerEncoder"]

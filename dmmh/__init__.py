"""dmmh: deep multi-modal hashing (Deep Mamba Multi-modal Hashing and friends) for PyTorch Lightning.

Compose a model from named parts::

    import dmmh
    model = dmmh.create_model(image_dim=4096, text_dim=1386, n_bits=64,
                              encoder="mlp", fusion="cnn_deep", head="tanh")

``list_encoders()``, ``list_fusions()``, ``list_hash_heads()``, ``list_losses()`` and
``list_datamodules()`` show what is registered (each takes a wildcard pattern).
"""

from __future__ import annotations

from typing import Any

from dmmh import data, encoders, fusion, hashing, metrics, models  # noqa: F401  (registers built-ins)
from dmmh.data import FeatureDataModule, SyntheticMultiLabel
from dmmh.encoders import Encoder
from dmmh.fusion import Fusion
from dmmh.hashing import CombinedLoss, HashHead, HashLoss, binarize
from dmmh.models import DMMH, DMMHModule
from dmmh.registry import DATAMODULES, ENCODERS, FUSIONS, HASH_HEADS, LOSSES, Registry, UnknownComponentError

__version__ = "0.1.0"

__all__ = [
    "DMMH", "DMMHModule", "Encoder", "Fusion", "HashHead", "HashLoss", "CombinedLoss", "FeatureDataModule",
    "SyntheticMultiLabel", "Registry", "UnknownComponentError", "ENCODERS", "FUSIONS", "HASH_HEADS", "LOSSES",
    "DATAMODULES", "binarize", "create_model", "list_encoders", "list_fusions", "list_hash_heads", "list_losses",
    "list_datamodules",
]


def create_model(**kwargs: Any) -> DMMH:
    """Build a :class:`DMMH` network; arguments given as ``None`` keep the defaults."""
    return DMMH(**{k: v for k, v in kwargs.items() if v is not None})


def list_encoders(pattern: str | None = None) -> list[str]:
    return ENCODERS.list(pattern)


def list_fusions(pattern: str | None = None) -> list[str]:
    return FUSIONS.list(pattern)


def list_hash_heads(pattern: str | None = None) -> list[str]:
    return HASH_HEADS.list(pattern)


def list_losses(pattern: str | None = None) -> list[str]:
    return LOSSES.list(pattern)


def list_datamodules(pattern: str | None = None) -> list[str]:
    return DATAMODULES.list(pattern)

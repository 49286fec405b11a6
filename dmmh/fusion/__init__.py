"""Fusion operators, registered by name in :data:`dmmh.registry.FUSIONS`."""

from dmmh.fusion.additive import AdditiveFusion
from dmmh.fusion.base import Fusion
from dmmh.fusion.cnn_deep import CNNDeepFusion

__all__ = ["Fusion", "AdditiveFusion", "CNNDeepFusion"]

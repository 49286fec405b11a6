"""The DMMH network and its LightningModule."""

from dmmh.models.dmmh import DMMH
from dmmh.models.lit import DMMHModule

__all__ = ["DMMH", "DMMHModule"]

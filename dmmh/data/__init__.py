"""LightningDataModules: the benchmarks, synthetic data, and the feature-split base."""

from dmmh.data.base import FeatureDataModule, FeatureDataset, Split
from dmmh.data.synthetic import SyntheticMultiLabel

__all__ = ["FeatureDataModule", "FeatureDataset", "Split", "SyntheticMultiLabel"]

"""LightningDataModules: the benchmarks, synthetic data, and the feature-split base."""

from dmmh.data.base import FeatureDataModule, FeatureDataset, Split
from dmmh.data.benchmarks import MSCOCO, NUSWIDE, BenchmarkDataModule, MIRFlickr25K
from dmmh.data.synthetic import SyntheticMultiLabel
from dmmh.data.uci import UCIMultipleFeatures
from dmmh.data.pairs import PairsDataModule

__all__ = ["FeatureDataModule", "FeatureDataset", "Split", "SyntheticMultiLabel", "BenchmarkDataModule", "MIRFlickr25K", "NUSWIDE", "MSCOCO", "UCIMultipleFeatures", "PairsDataModule"]

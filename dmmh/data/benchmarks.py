"""The three benchmarks: MIR-Flickr25K, NUS-WIDE (21 concepts), MS-COCO 2014.

Each reads a local feature file (see :mod:`dmmh.data.readers` for the formats: BSTH's MATLAB
v7.3 ``*_cnn_twt*.mat``, MATLAB v5, ``.npz``, a folder of ``.npy``, safetensors), validates it,
and serves ``train`` / ``query`` / ``database`` splits. ``root`` is the file or a folder holding
it. Published split sizes (DESIGN.md §2) are checked with a warning, the class count with an error.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar, Literal, Union

from lightning.pytorch.utilities import rank_zero_info

from dmmh.data.base import VAL_SPLIT, FeatureDataModule, Split
from dmmh.data.normalize import normalize_splits
from dmmh.data.cache import cached_feature_file
from dmmh.data.readers import SPLIT_KEYS, FeatureFile, find_feature_file, read_feature_file, validate_feature_file
from dmmh.registry import DATAMODULES

__all__ = ["BenchmarkDataModule", "MIRFlickr25K", "NUSWIDE", "MSCOCO"]


class BenchmarkDataModule(FeatureDataModule):
    """Base of the benchmark DataModules (subclasses set the class attributes).

    Args:
        root: the feature file, or a folder holding it (see :func:`~dmmh.data.readers.find_feature_file`).
        normalize: ``"none"``, ``"l2"``, ``"zscore"`` or ``"minmax"`` (fitted on the train split),
            or a dict ``{"image": ..., "text": ...}``.
        mmap: memory-map the arrays where the format allows (MATLAB v7.3 contiguous datasets,
            ``.npy`` folders; safetensors rows are read on demand).
        cache_dir: if set, a feature file (any format but an ``.npy`` folder) is read through a
            verified row-major ``.npy`` copy under ``cache_dir``, looked up before the source is
            read and written on first use (:func:`~dmmh.data.cache.cached_feature_file`).
        check_values: scan every array for NaN/inf and non-0/1 labels on load (a verified cache
            made from a scanned source is not scanned again).
        allow_external: read HDF5 datasets whose bytes live outside the file (external links,
            external raw storage, virtual datasets); refused by default.
        batch_size, eval_batch_size, num_workers, seed, val_split, val_seed: see
            :class:`~dmmh.data.base.FeatureDataModule` (by default 10 % of the training items are
            held out as validation queries).
    """

    display_name: ClassVar[str]
    file_patterns: ClassVar[tuple[str, ...]]
    classes: ClassVar[int]
    published_sizes: ClassVar[dict[str, int]]

    def __init__(
        self,
        root: str,
        normalize: str | dict[str, str] = "none",
        mmap: bool = True,
        cache_dir: str | None = None,
        check_values: bool = True,
        allow_external: bool = False,
        batch_size: int = 1024,
        eval_batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 0,
        val_split: Union[float, Literal["test"]] = VAL_SPLIT,
        val_seed: int = 0,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                         val_split=val_split, val_seed=val_seed)
        self.root, self.normalize, self.mmap = root, normalize, bool(mmap)
        self.cache_dir, self.check_values, self.allow_external = cache_dir, bool(check_values), bool(allow_external)
        self.source: FeatureFile | None = None
        self.save_hyperparameters()

    def _validate(self, ff: FeatureFile, check_values: bool, warn_sizes: bool = True) -> FeatureFile:
        sizes = self.published_sizes if warn_sizes else None
        validate_feature_file(ff, self.classes, sizes, self.display_name, check_values)
        return ff

    def read(self) -> FeatureFile:
        """Locate, read and validate the feature file (through the cache when ``cache_dir`` is set)."""
        path = find_feature_file(self.root, self.file_patterns)
        read = partial(read_feature_file, path, mmap=self.mmap, allow_external=self.allow_external)
        if self.cache_dir is None or path.is_dir():
            return self._validate(read(), self.check_values)
        # a miss validates the source before caching it; the copy is validated again (without the
        # value scan if the source had it: the manifest's digests prove the bytes are unchanged)
        ff, manifest = cached_feature_file(
            path, self.cache_dir, lambda: self._validate(read(), self.check_values, warn_sizes=False),
            {"values_checked": self.check_values},
        )
        return self._validate(ff, self.check_values and not manifest.get("values_checked", False))

    def load_splits(self) -> dict[str, Split]:
        ff = self.read()
        self.source = ff
        rank_zero_info(f"{self.display_name}: read {ff.describe()}")
        splits = {name: Split(*(ff.arrays[k] for k in keys)) for name, keys in SPLIT_KEYS.items()}
        return normalize_splits(splits, self.normalize)


@DATAMODULES.register("mirflickr", aliases=("mirflickr25k", "mir", "flickr25k", "mir-flickr25k"))
class MIRFlickr25K(BenchmarkDataModule):
    """MIR-Flickr25K: 24 classes; 5,000 train ⊂ 17,772 database items, 2,243 queries.
    BSTH's file: ``mir_cnn_twt.mat`` (4096-D VGG image, 1386-D bag-of-words text)."""

    display_name = "MIR-Flickr25K"
    file_patterns = ("mir*_cnn_twt*.mat", "mir*.*")
    classes = 24
    published_sizes = {"train": 5000, "query": 2243, "database": 17772}


@DATAMODULES.register("nuswide", aliases=("nus-wide", "nus", "nus_wide"))
class NUSWIDE(BenchmarkDataModule):
    """NUS-WIDE, the 21 most frequent concepts: 21,000 train ⊂ 193,749 database items, 2,085
    queries. BSTH's file: ``nus_cnn_twt.mat``. Use ``mmap`` (default) or ``cache_dir``: the
    database does not fit comfortably in memory."""

    display_name = "NUS-WIDE"
    file_patterns = ("nus*_cnn_twt*.mat", "nus*.*")
    classes = 21
    published_sizes = {"train": 21000, "query": 2085, "database": 193749}


@DATAMODULES.register("coco", aliases=("mscoco", "ms-coco", "coco2014"))
class MSCOCO(BenchmarkDataModule):
    """MS-COCO 2014: 80 classes; 18,000 train ⊂ 82,783 database items, 5,981 queries.
    BSTH's file: ``coco_cnn_twt_2014.mat``."""

    display_name = "MS-COCO"
    file_patterns = ("coco*_cnn_twt*.mat", "coco*.*")
    classes = 80
    published_sizes = {"train": 18000, "query": 5981, "database": 82783}


"""Serving: encode a collection into a searchable index with a trained checkpoint, and query it.

* :func:`encode_index` — ``Trainer.predict`` over a collection (any Lightning strategy, device
  and node count), resumable shards, one :class:`~dmmh.hashing.HammingIndex` file + ``INDEX.json``;
* :class:`Searcher` — encode queries (captions, images, feature vectors or collection items, one
  modality or both) and find their nearest items;
* :class:`Collection` — what an index is encoded from (DataModule class path, args, split).

The commands ``dmmh encode`` and ``dmmh search`` are thin shells over these (docs/search.md).
"""

from dmmh.serving.collection import Collection
from dmmh.serving.encode import EncodeResult, encode_index
from dmmh.serving.manifest import ManifestError, manifest_path, read_manifest
from dmmh.serving.model import load_model, model_fingerprint, model_modalities
from dmmh.serving.search import Searcher, read_features

__all__ = ["Collection", "EncodeResult", "encode_index", "Searcher", "read_features", "ManifestError", "manifest_path",
           "read_manifest", "load_model", "model_fingerprint", "model_modalities"]

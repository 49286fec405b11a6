"""``Searcher``: an encoded collection ready for queries — its index, manifest and model.

Opening one checks, in order: the manifest exists and describes the index file (checksum, count,
bits); the checkpoint makes codes of the index's bit length; its weights are those the index was
encoded with (fingerprint). Queries carry one or both modalities (a model trained with
``modality_dropout`` encodes either alone); each modality is given in the form its encoder takes
(``images`` / ``captions`` for the CLIP encoders, ``features`` otherwise), which the manifest
records, so a query the model cannot read is refused with what to pass instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from dmmh.hashing.index import HammingIndex
from dmmh.models.dmmh import MODALITIES
from dmmh.serving.collection import Collection
from dmmh.serving.manifest import ManifestError, check_index, manifest_path, read_manifest
from dmmh.serving.model import load_model, model_fingerprint

__all__ = ["Searcher", "read_features"]

HINTS = {"images": "--image PATH (images=)", "captions": "--caption TEXT (captions=)",
         "features": "--features FILE holding '{m}' features of width {w} (features=)"}


def read_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``image`` and/or ``text`` arrays from a ``.npz`` or ``.safetensors`` file (a vector is one query)."""
    path, suffix = Path(path), Path(path).suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    elif suffix == ".safetensors":
        from dmmh._optional import require

        arrays = dict(require("safetensors.numpy", "reading .safetensors features").load_file(str(path)))
    else:
        raise ValueError(f"{path}: features must be a .npz or .safetensors file with 'image' and/or 'text' arrays")
    out = {m: arrays[m] for m in MODALITIES if m in arrays}
    if not out:
        raise ValueError(f"{path}: has neither an 'image' nor a 'text' array (keys: {sorted(arrays)})")
    for m, a in out.items():
        if a.ndim == 1:
            out[m] = a = a[None]
        if a.ndim != 2 or not np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_:
            raise ValueError(f"{path}: {m!r} must be a numeric vector or matrix (queries, width), got {a.dtype} {a.shape}")
    rows = {m: a.shape[0] for m, a in out.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{path}: 'image' and 'text' hold different numbers of queries: {rows}")
    return out


class Searcher:
    """Queries against the index file ``index``, encoded by checkpoint ``ckpt`` (default: the
    checkpoint its manifest names), on ``device``; ``backend`` is the :class:`HammingIndex` one."""

    def __init__(self, index: str | os.PathLike, ckpt: str | os.PathLike | None = None, device: str = "cpu",
                 backend: str = "auto"):
        self.path = Path(index)
        self.manifest = read_manifest(self.path)
        self.index = HammingIndex.load(self.path, backend=backend, mmap=True)  # read on demand: any index size
        check_index(self.manifest, self.path, len(self.index), self.index.n_bits)
        ckpt = ckpt or self.manifest["model"].get("checkpoint")
        if not ckpt:
            raise ManifestError(f"{manifest_path(self.path)} names no checkpoint; pass one")
        self.ckpt = Path(ckpt)
        self.module = load_model(self.ckpt, device)
        bits = int(self.module.model.n_bits)
        if bits != self.index.n_bits:
            raise ValueError(f"checkpoint {self.ckpt} makes {bits}-bit codes but index {self.path} holds {self.index.n_bits}-bit "
                             f"codes: search with the checkpoint that encoded it ({self.manifest['model'].get('checkpoint')})")
        if model_fingerprint(self.module) != self.manifest["model"]["fingerprint"]:
            raise ValueError(f"checkpoint {self.ckpt} has other weights than the model that encoded {self.path} "
                             f"({self.manifest['model'].get('checkpoint')}); codes of different models cannot be compared: "
                             f"search with that checkpoint, or encode the collection again with this one")
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.index)

    # -- query inputs: {"image": tensor, "text": tensor} in the form the model takes -------------
    def modality(self, name: str, takes: str) -> dict[str, Any]:
        """The manifest's record of modality ``name``; an error unless its encoder takes ``takes``."""
        mods = self.manifest["model"].get("modalities")
        info = mods.get(name) if isinstance(mods, Mapping) else None
        if not isinstance(info, Mapping) or not {"input", "width"} <= set(info):
            raise ManifestError(f"{manifest_path(self.path)} lacks model.modalities.{name} (what its {name} encoder takes): "
                                f"encode the index again with `dmmh encode`")
        if info["input"] != takes:
            hint = HINTS[info["input"]].format(m=name, w=info["width"])
            raise ValueError(f"this index's model reads {name} as {info['input']} ({info.get('encoder')!r} encoder), not "
                             f"{takes}: query it with {hint}")
        return dict(info)

    def captions(self, captions: Sequence[str]) -> dict[str, Tensor]:
        """Token ids of ``captions`` by the model's ``clip_text`` tokenizer."""
        self.modality("text", "captions")
        return {"text": self.module.model.encoders["text"].tokenizer(list(captions))}

    def images(self, paths: Sequence[str | os.PathLike]) -> dict[str, Tensor]:
        """Image files through the model's ``clip_image`` transform."""
        from dmmh.data.pairs import load_image

        self.modality("image", "images")
        transform = self.module.model.encoders["image"].transform
        return {"image": torch.stack([transform(load_image(os.fspath(p))) for p in paths])}

    def features(self, arrays: Mapping[str, np.ndarray] | str | os.PathLike) -> dict[str, Tensor]:
        """Feature vectors (a dict, or a file for :func:`read_features`) of the widths the encoders take."""
        where = f"{arrays}" if not isinstance(arrays, Mapping) else "features"
        arrays = read_features(arrays) if not isinstance(arrays, Mapping) else arrays
        out = {}
        for m, a in arrays.items():
            width = self.modality(m, "features")["width"]
            a = np.asarray(a)
            a = a[None] if a.ndim == 1 else a
            if a.ndim != 2 or a.shape[1] != width:
                raise ValueError(f"{where}: {m!r} has shape {a.shape}; the model's {m} encoder takes width {width}")
            out[m] = torch.as_tensor(a, dtype=torch.float32)
        return out

    def items(self, ids: Sequence[int], split: str | None = None, modalities: Sequence[str] = MODALITIES) -> dict[str, Tensor]:
        """Items of the collection the index was encoded from (``split``: its split by default),
        by position, in the given ``modalities``."""
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities:
            raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
        c = Collection.from_dict(self.manifest["collection"])
        split = split or c.split
        dataset = c.datamodule(self.module).dataset(split)
        for i in ids:
            if not 0 <= int(i) < len(dataset):
                raise IndexError(f"item {i} is not in split {split!r} of {c.class_path} "
                                 f"({len(dataset)} items, ids 0..{len(dataset) - 1})")
        rows = [dataset[int(i)] for i in ids]
        return {m: torch.stack([r[m] for r in rows]) for m in modalities}

    # -- encoding and search ---------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, image: Tensor | None = None, text: Tensor | None = None, batch_size: int = 1024) -> Tensor:
        """±1 codes ``(Q, n_bits)`` of the queries from whichever modalities are given."""
        if image is None and text is None:
            raise ValueError("a query needs an image and/or a text input")
        n = (image if image is not None else text).shape[0]
        parts = []
        for s in range(0, n, batch_size):
            chunk = {k: v[s : s + batch_size].to(self.device) for k, v in (("image", image), ("text", text)) if v is not None}
            parts.append(self.module.encode(**chunk).cpu())
        return torch.cat(parts) if parts else torch.zeros(0, self.index.n_bits)

    def search(self, image: Tensor | None = None, text: Tensor | None = None, k: int | None = 10,
               radius: int | None = None) -> list[list[dict[str, Any]]]:
        """Per query, hits ``{"rank", "id", "distance"}`` nearest first (ties by id), plus ``image``
        and ``caption`` for a pairs collection. ``radius``: every item within that distance
        (inclusive), the first ``k`` of them when ``k`` is given; else the ``k`` nearest."""
        codes = self.encode(image, text)
        if radius is None:
            if k is None:
                raise ValueError("give k, radius or both")
            dist, ids = self.index.search(codes, k)
            rows = list(zip(dist.tolist(), ids.tolist()))
        else:
            res = self.index.range_search(codes, radius)
            lims = res.lims.tolist()
            rows = [(res.distances[a:b].tolist()[:k], res.indices[a:b].tolist()[:k]) for a, b in zip(lims[:-1], lims[1:])]
        items = self.manifest.get("items")
        return [[{"rank": r + 1, "id": i, "distance": d, **({key: col[i] for key, col in items.items()} if items else {})}
                 for r, (d, i) in enumerate(zip(drow, irow))] for drow, irow in rows]

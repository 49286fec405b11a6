"""Feature extraction with a resumable cache: a frozen CLIP backbone over a pairs data set, once.

:func:`extract_features` writes the nine benchmark arrays (``I_tr T_tr L_tr I_db T_db L_db I_te
T_te L_te``, DESIGN.md §2) to ``.npz`` or ``.safetensors``, the format the benchmark DataModules
read, so a benchmark can be rebuilt from raw images + captions. Features are computed once per
item (train items are database items) in chunks of ``chunk_size`` items, kept in
``<out>.parts/``, a :class:`dmmh.chunks.ChunkStore`: self-describing, locked against a second
writer (:class:`~dmmh.chunks.ChunkStoreBusy`), every finished chunk verified when it is reused
(a bad one is recomputed with a warning). It is removed once ``out`` is written.

Resuming: an interrupted run restarted recomputes only unfinished chunks. With the same
``batch_size`` and ``device`` it writes byte-for-byte the file an uninterrupted run would; with
others (allowed, with a warning) the features equal an uninterrupted run's within float rounding,
not byte for byte. Each chunk records the settings it was computed with; the output lists them
(``computed_with``).

The output and the chunk folder record the backbone's fingerprint (architecture, transform and
the bytes of every weight, not the checkpoint's path) and the data's (image paths relative to
``root`` and file sizes, captions, labels, splits); extraction refuses to mix features of another
backbone or data set into either. An image stored in a Hugging Face dataset counts by the
SHA-256 of its bytes, not by the dataset's ``_fingerprint``: that one changes with how the same
data was loaded (``load_dataset(folder)`` and ``load_dataset("imagefolder", data_dir=folder)``
differ, and so do runs after a transform ``datasets`` cannot hash), so a resumed or repeated
extraction would refuse its own chunks; the content hash is the same for the same items however
they arrive, at the cost of reading their bytes once more (less than decoding them for the backbone).

Command line (:mod:`dmmh.commands.extract`): ``dmmh extract --root IMAGES --out feats.npz --model ViT-B-32 --pretrained ckpt.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm  # a dependency of lightning

from dmmh._io import atomic_write, write_npz
from dmmh.chunks import ChunkStore, ChunkStoreBusy
from dmmh.data.pairs import PairsDataModule
from dmmh.data.readers import SPLIT_KEYS

__all__ = ["extract_features", "read_extraction_meta", "write_npz", "FORMAT_VERSION"]

FORMAT_VERSION = 2  # 2: chunk folders are ChunkStores; fingerprints of weight bytes, relative image paths
META_KEY = "dmmh_extraction"  # npz entry / safetensors metadata key holding the JSON record
_IDENTITY = ("format_version", "backbone", "data", "items", "chunk_size")  # what must match to reuse


def extract_features(data: PairsDataModule, backbone, out: str | os.PathLike, batch_size: int = 64,
                     chunk_size: int = 1024, device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Extract image and text features of every item of ``data`` with ``backbone`` (a
    :class:`~dmmh.encoders.clip.ClipBackbone`, run frozen in eval mode) into ``out``.

    Returns ``out``. An existing ``out`` from the same backbone and data is returned as is; one
    from another backbone or data set is an error (delete it or choose another path). Another
    run writing the same ``out`` raises :class:`~dmmh.chunks.ChunkStoreBusy`.
    """
    out = Path(out)
    fmt = {".npz": "npz", ".safetensors": "safetensors"}.get(out.suffix)
    if fmt is None:
        raise ValueError(f"{out}: the output must end in .npz or .safetensors")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    data.splits  # noqa: B018  (reads and validates the metadata)
    n = len(data.table)
    record = {"format_version": FORMAT_VERSION, "backbone": backbone.fingerprint(), "data": _data_fingerprint(data),
              "items": n, "chunk_size": int(chunk_size)}
    parts = out.with_name(out.name + ".parts")
    if out.exists():
        return _reuse(out, record, parts)
    settings = {"batch_size": int(batch_size), "device": torch.device(device).type}
    with ChunkStore(parts, record, n, chunk_size) as store:
        if out.exists():  # another run finished it between our first look and our lock
            return _reuse(out, record, parts, store)
        todo = store.pending()
        others = [i for i in store.chunk_infos() if i is not None and i != settings]
        if others:
            warnings.warn(f"{parts}: finished chunks were computed with {_distinct(others)}, this run uses {settings}: "
                          f"the features will equal an uninterrupted run's within float rounding, not byte for byte",
                          stacklevel=2)
        bar = tqdm(disable=not progress, unit="item", total=n, initial=n - sum(map(len, todo)), desc=f"extract {out.name}")
        _compute(data, backbone.to(device).eval(), store, todo, batch_size, device, settings, bar)
        features = store.read_all()
        labels = _dense_labels(data)
        arrays: dict[str, np.ndarray] = {}
        for split, (ki, kt, kl) in SPLIT_KEYS.items():
            rows = data.splits[split]
            arrays[ki], arrays[kt], arrays[kl] = features["image"][rows], features["text"][rows], labels[rows]
        spec = {k: v for k, v in backbone.spec().items() if k != "config"}
        if spec.get("pretrained") and os.path.isfile(spec["pretrained"]):
            spec["pretrained"] = os.path.basename(spec["pretrained"])  # as typed would vary; the weights are in the fingerprint
        meta = json.dumps({**record, "backbone_spec": spec, "computed_with": _distinct(store.chunk_infos())}, sort_keys=True)
        if fmt == "npz":
            write_npz(out, {**arrays, META_KEY: np.array(meta)})
        else:
            _write_safetensors(out, arrays, {META_KEY: meta})
        store.remove()
    return out


def _compute(data, backbone, store: ChunkStore, todo: list[range], batch_size: int, device, settings, bar) -> None:
    dataset = data.all_items()
    try:
        for rows in todo:
            img, txt = [], []
            for start in range(rows.start, rows.stop, batch_size):
                idx = list(range(start, min(start + batch_size, rows.stop)))
                with torch.no_grad():
                    images = torch.stack([dataset[i]["image"] for i in idx]).to(device)
                    img.append(backbone.encode_image(images).float().cpu().numpy())
                    txt.append(backbone.encode_text(data.tokens[idx].to(device)).float().cpu().numpy())
                bar.update(len(idx))
            store.write(rows, {"image": np.concatenate(img), "text": np.concatenate(txt)}, info=settings)
    finally:
        bar.close()


def _reuse(out: Path, record: dict[str, Any], parts: Path, store: ChunkStore | None = None) -> Path:
    """Return a finished ``out`` of this backbone and data; remove a chunk folder a killed run left."""
    _check_same(read_extraction_meta(out), record, str(out))
    try:
        (store or ChunkStore(parts, record, record["items"], record["chunk_size"])).remove()
    except (ChunkStoreBusy, ValueError):
        pass  # in use by a concurrent run (it removes it when done), or not ours: leave it
    return out


def _distinct(infos) -> list[dict]:
    return [json.loads(t) for t in sorted({json.dumps(i, sort_keys=True) for i in infos if i is not None})]


def read_extraction_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The extraction record stored in a file written by :func:`extract_features`."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                meta = str(z[META_KEY]) if META_KEY in z.files else None
        else:
            from dmmh._optional import require

            require("safetensors", "reading .safetensors features")
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                meta = (f.metadata() or {}).get(META_KEY)
        found = None if meta is None else json.loads(meta)
    except Exception as exc:  # zip, npy, safetensors and JSON errors come in many types
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc}); refusing to overwrite it: delete it or "
                         f"write elsewhere") from exc
    if not isinstance(found, dict):
        raise ValueError(f"{path}: not written by dmmh extract (no {META_KEY!r} record); refusing to overwrite or mix")
    return found


def _check_same(found: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for key in _IDENTITY:
        if found.get(key) == want[key]:
            continue
        if key == "backbone":
            raise ValueError(
                f"{where} holds features of another backbone ({found.get('backbone_spec')}, fingerprint "
                f"{str(found.get('backbone'))[:12]}) than this one (fingerprint {want['backbone'][:12]}); refusing to "
                f"mix them: delete it or write elsewhere")
        raise ValueError(f"{where} was made from other {key.replace('_', ' ')} ({found.get(key)!r} vs {want[key]!r}); "
                         f"delete it or write elsewhere")


def _data_fingerprint(data: PairsDataModule) -> str:
    """Each image's identity, its caption, the labels, the splits. An image file is its path
    relative to the table's root (however ``root`` was typed) and its size; an image stored in an
    HF dataset is the SHA-256 of its bytes."""
    t = data.table
    h = hashlib.sha256()
    for i, (path, caption) in enumerate(zip(t.paths, t.captions)):
        content = None if t.image_bytes is None else t.image_bytes(t.rows[i])
        if content is None:
            name = os.path.abspath(path) if t.root is None else os.path.relpath(path, t.root)
            h.update(json.dumps([name, os.path.getsize(path), caption]).encode())
        else:
            h.update(json.dumps([hashlib.sha256(content).hexdigest(), caption]).encode())
    h.update(np.ascontiguousarray(data.label_array).tobytes())
    for split in ("train", "database", "query"):
        h.update(split.encode() + np.asarray(data.splits[split], dtype=np.int64).tobytes())
    return h.hexdigest()


def _dense_labels(data: PairsDataModule) -> np.ndarray:
    y = data.label_array
    if y.ndim == 2:
        return y.astype(np.uint8)
    dense = np.zeros((len(y), data.num_classes), dtype=np.uint8)
    dense[np.arange(len(y)), y] = 1
    return dense


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from dmmh._optional import require

    require("safetensors", "writing .safetensors features")
    import safetensors.numpy as numpy_st
    atomic_write(path, lambda f: f.write(numpy_st.save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)))

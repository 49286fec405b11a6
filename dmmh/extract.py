"""Feature extraction with a resumable cache: a frozen CLIP backbone over a pairs data set, once.

:func:`extract_features` writes the nine benchmark arrays (``I_tr T_tr L_tr I_db T_db L_db I_te
T_te L_te``, DESIGN.md §2) to ``.npz`` or ``.safetensors``, the format the benchmark DataModules
read, so a benchmark can be rebuilt from raw images + captions. Features are computed once per
item (train items are database items) in chunks of ``chunk_size`` items; each finished chunk is
written atomically to ``<out>.parts/``, so an interrupted run restarted with the same arguments
recomputes nothing already finished and writes byte-for-byte the file an uninterrupted run would.

The output and the chunk folder record the backbone's fingerprint (architecture, checkpoint,
transform and a hash of every weight) and the data's (image paths, sizes, captions, labels,
splits); extraction refuses to mix features of another backbone or data set into either.

Command line (:mod:`dmmh.commands.extract`): ``dmmh extract --root IMAGES --out feats.npz --model ViT-B-32 --pretrained ckpt.pt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmmh._io import atomic_write, write_npz
from dmmh.data.pairs import PairsDataModule
from dmmh.data.readers import SPLIT_KEYS

__all__ = ["extract_features", "read_extraction_meta", "write_npz", "FORMAT_VERSION"]

FORMAT_VERSION = 1
META_KEY = "dmmh_extraction"  # npz entry / safetensors metadata key holding the JSON record


def extract_features(data: PairsDataModule, backbone, out: str | os.PathLike, batch_size: int = 64,
                     chunk_size: int = 1024, device: str | torch.device = "cpu", progress: bool = True) -> Path:
    """Extract image and text features of every item of ``data`` with ``backbone`` (a
    :class:`~dmmh.encoders.clip.ClipBackbone`, run frozen in eval mode) into ``out``.

    Returns ``out``. An existing ``out`` from the same backbone and data is returned as is; one
    from another backbone or data set is an error (delete it or choose another path).
    """
    out = Path(out)
    fmt = {".npz": "npz", ".safetensors": "safetensors"}.get(out.suffix)
    if fmt is None:
        raise ValueError(f"{out}: the output must end in .npz or .safetensors")
    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    data.splits  # noqa: B018  (reads and validates the metadata)
    record = {"format_version": FORMAT_VERSION, "backbone": backbone.fingerprint(), "data": _data_fingerprint(data),
              "backbone_spec": {k: v for k, v in backbone.spec().items() if k != "config"}, "chunk_size": int(chunk_size),
              "items": len(data.table)}
    if out.exists():
        _check_same(read_extraction_meta(out), record, str(out))
        return out
    parts = out.with_name(out.name + ".parts")
    _open_parts(parts, record)
    n = len(data.table)
    chunks = [(c, range(s, min(s + chunk_size, n))) for c, s in enumerate(range(0, n, chunk_size))]
    todo = [(c, r) for c, r in chunks if not (parts / f"chunk_{c:06d}.npz").exists()]
    backbone = backbone.to(device).eval()
    dataset = data.all_items()
    bar = _progress(progress, total=n, initial=n - sum(len(r) for _, r in todo), desc=f"extract {out.name}")
    try:
        for c, rows in todo:
            img, txt = [], []
            for start in range(rows.start, rows.stop, batch_size):
                idx = list(range(start, min(start + batch_size, rows.stop)))
                with torch.no_grad():
                    images = torch.stack([dataset[i]["image"] for i in idx]).to(device)
                    img.append(backbone.encode_image(images).float().cpu().numpy())
                    txt.append(backbone.encode_text(data.tokens[idx].to(device)).float().cpu().numpy())
                bar.update(len(idx))
            write_npz(parts / f"chunk_{c:06d}.npz", {"image": np.concatenate(img), "text": np.concatenate(txt)})
    finally:
        bar.close()
    image = np.concatenate([_load_chunk(parts, c)["image"] for c, _ in chunks])
    text = np.concatenate([_load_chunk(parts, c)["text"] for c, _ in chunks])
    labels = _dense_labels(data)
    arrays: dict[str, np.ndarray] = {}
    for split, (ki, kt, kl) in SPLIT_KEYS.items():
        rows = data.splits[split]
        arrays[ki], arrays[kt], arrays[kl] = image[rows], text[rows], labels[rows]
    meta = json.dumps(record, sort_keys=True)
    if fmt == "npz":
        write_npz(out, {**arrays, META_KEY: np.array(meta)})
    else:
        _write_safetensors(out, arrays, {META_KEY: meta})
    shutil.rmtree(parts)
    return out


def read_extraction_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The extraction record stored in a file written by :func:`extract_features`."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if META_KEY not in z.files:
                raise ValueError(f"{path}: not written by dmmh extract (no {META_KEY!r} entry); refusing to overwrite or mix")
            return json.loads(str(z[META_KEY]))
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    meta = header.get("__metadata__", {})
    if META_KEY not in meta:
        raise ValueError(f"{path}: not written by dmmh extract (no {META_KEY!r} metadata); refusing to overwrite or mix")
    return json.loads(meta[META_KEY])


def _check_same(found: dict[str, Any], want: dict[str, Any], where: str) -> None:
    if found.get("backbone") != want["backbone"]:
        raise ValueError(
            f"{where} holds features of another backbone ({found.get('backbone_spec')}, fingerprint "
            f"{str(found.get('backbone'))[:12]}) than this one ({want['backbone_spec']}, fingerprint "
            f"{want['backbone'][:12]}); refusing to mix them: delete it or write elsewhere")
    for key in ("data", "chunk_size", "format_version", "items"):
        if key in found and found[key] != want[key]:
            raise ValueError(f"{where} was made from other {key.replace('_', ' ')} ({found[key]!r} vs {want[key]!r}); "
                             f"delete it or write elsewhere")


def _open_parts(parts: Path, record: dict[str, Any]) -> None:
    meta = parts / "meta.json"
    if meta.exists():
        _check_same(json.loads(meta.read_text()), record, f"{parts} (an interrupted extraction)")
        return
    parts.mkdir(parents=True, exist_ok=True)
    atomic_write(meta, lambda f: f.write(json.dumps(record, sort_keys=True).encode()))


def _data_fingerprint(data: PairsDataModule) -> str:
    t = data.table
    h = hashlib.sha256()
    for path, caption in zip(t.paths, t.captions):
        h.update(json.dumps([os.path.abspath(path), os.path.getsize(path), caption]).encode())
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


def _load_chunk(parts: Path, c: int) -> dict[str, np.ndarray]:
    path = parts / f"chunk_{c:06d}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise ValueError(f"{path}: unreadable cached chunk ({exc}); delete it to recompute it") from exc


def _write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    from dmmh._optional import require

    require("safetensors", "writing .safetensors features")
    import safetensors.numpy as numpy_st
    atomic_write(path, lambda f: f.write(numpy_st.save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=metadata)))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(enabled: bool, **kw):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm  # a dependency of lightning

    return tqdm(unit="item", **kw)

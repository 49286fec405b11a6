"""``INDEX.json``: what an index file holds and how it was made, written atomically beside it.

Layout (JSON, ``format`` / ``version`` first)::

    index       file name, n_items, n_bits, digest (the SHA-256 the index file ends with)
    model       checkpoint path, fingerprint (weights), n_bits, modalities (encoder, input kind, width)
    collection  DataModule class_path, init_args, split, n_items
    encoding    batch_size, shard_size, precision (what fixes the codes), world_size (informative)
    items       pairs collections only: image path and caption of each id

The *record* (model fingerprint and bits, collection, batch size, shard size, precision) decides
whether finished work can be reused: equal records give equal codes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from dmmh._io import atomic_write

__all__ = ["ManifestError", "manifest_path", "read_manifest", "write_manifest", "index_digest", "record_of",
           "record_difference"]

FORMAT = "dmmh-index-manifest"
VERSION = 1
_DIGEST = 32  # bytes: the index format's trailing SHA-256
REQUIRED = {"index": ("file", "n_items", "n_bits", "digest"), "model": ("fingerprint", "n_bits"),
            "collection": ("class_path", "init_args", "split", "n_items"), "encoding": ("batch_size", "shard_size", "precision")}


class ManifestError(ValueError):
    """An index has no manifest, an unreadable one, or one that does not describe it."""


def manifest_path(index: str | os.PathLike) -> Path:
    """``INDEX.json`` for index file ``INDEX``."""
    return Path(f"{os.fspath(index)}.json")


def index_digest(index: str | os.PathLike) -> str:
    """Hex of the SHA-256 checksum an index file ends with (its own checksum of header and payload)."""
    with open(index, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < _DIGEST:
            raise ManifestError(f"{index}: {size} bytes, too short to be a dmmh index")
        f.seek(size - _DIGEST)
        return f.read(_DIGEST).hex()


def write_manifest(index: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    body = {"format": FORMAT, "version": VERSION, **manifest}
    return atomic_write(manifest_path(index), (json.dumps(body, indent=1) + "\n").encode())


def read_manifest(index: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``index``, its layout checked (not yet against the index: see :func:`check_index`)."""
    path = manifest_path(index)
    if not path.is_file():
        raise ManifestError(f"{index} has no manifest {path} (written by `dmmh encode`): it says which model and "
                            f"collection the codes come from, which searching needs")
    try:
        m = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a dmmh index manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("version") != VERSION:
        raise ManifestError(f"{path}: manifest version {m.get('version')!r}, this dmmh reads version {VERSION}")
    for section, keys in REQUIRED.items():
        missing = [k for k in keys if not isinstance(m.get(section), dict) or k not in m[section]]
        if missing:
            raise ManifestError(f"{path}: lacks {', '.join(f'{section}.{k}' for k in missing)}")
    return m


def check_index(manifest: Mapping[str, Any], index: str | os.PathLike, n_items: int, n_bits: int) -> None:
    """The manifest describes this index file (same checksum, count and bit length)."""
    want = manifest["index"]
    path = manifest_path(index)
    if index_digest(index) != want["digest"]:
        raise ManifestError(f"{path} describes another index file than {index} (checksum differs): the index was "
                            f"replaced after its manifest was written; encode it again")
    if (n_items, n_bits) != (want["n_items"], want["n_bits"]):
        raise ManifestError(f"{path}: says {want['n_items']} items of {want['n_bits']} bits, {index} holds {n_items} of {n_bits}")


def record_of(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What fixes the codes: model fingerprint and bits, collection, batch size, shard size, precision."""
    enc = manifest["encoding"]
    return {"model": {"fingerprint": manifest["model"]["fingerprint"], "n_bits": manifest["model"]["n_bits"]},
            "collection": dict(manifest["collection"]),
            "encoding": {k: enc[k] for k in ("batch_size", "shard_size", "precision")}}


def record_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key whose values differ, as ``"key: a != b"``; ``None`` when equal."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            diff = record_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else f"{prefix.rstrip('.')}: {a!r} != {b!r}"

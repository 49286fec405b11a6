"""A verified, row-major ``.npy`` copy of a feature file, for formats that cannot be memory-mapped
row by row (compressed or column-major MATLAB files, ``.npz``, safetensors).

:func:`cached_feature_file` looks the copy up by the source's identity (name, size, modification
time and a fingerprint of sampled bytes) **before** reading the source, so a hit costs no
decompression. Every copy carries a ``manifest.json`` with each file's size and SHA-256, written
with it; a hit is verified against it and, if anything differs, rebuilt with a warning that says
what was wrong. :func:`write_npy_folder` writes a folder atomically (:func:`~dmmh._io.atomic_dir`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dmmh._arrayfiles import FileFormatError
from dmmh._io import atomic_dir
from dmmh.data.readers import ALL_KEYS, FeatureFile, read_feature_file

__all__ = ["CACHE_VERSION", "MANIFEST", "source_identity", "write_npy_folder", "verify_npy_folder", "cached_feature_file"]

CACHE_VERSION = 1
MANIFEST = "manifest.json"
_BLOCK_ROWS = 8192
_FINGERPRINT_BLOCKS, _FINGERPRINT_BYTES = 16, 1 << 16


def source_identity(path: str | os.PathLike) -> dict[str, Any]:
    """Name, size, modification time and a SHA-256 of 16 evenly spaced 64 KiB blocks (first and
    last included) of the file ``path``: cheap to compute, and changed by any edit that changes
    the size, the time, or a sampled byte."""
    path = Path(path)
    st = path.stat()
    digest = hashlib.sha256(str(st.st_size).encode())
    last = max(0, st.st_size - _FINGERPRINT_BYTES)
    with open(path, "rb") as fh:
        for offset in sorted({last * i // (_FINGERPRINT_BLOCKS - 1) for i in range(_FINGERPRINT_BLOCKS)}):
            fh.seek(offset)
            digest.update(fh.read(_FINGERPRINT_BYTES))
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "fingerprint": digest.hexdigest()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_npy_folder(arrays: Mapping[str, Any], folder: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``arrays`` as row-major ``{key}.npy`` files into ``folder`` (which must not exist yet),
    with a :data:`MANIFEST` holding ``meta`` and every file's size and SHA-256, atomically
    (:func:`~dmmh._io.atomic_dir`: a killed writer's temporary is removed by the next write)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        files = {}
        for key, a in arrays.items():
            out = np.lib.format.open_memmap(tmp / f"{key}.npy", mode="w+", dtype=a.dtype, shape=tuple(a.shape))
            for start in range(0, a.shape[0], _BLOCK_ROWS):
                out[start : start + _BLOCK_ROWS] = a[start : start + _BLOCK_ROWS]
            out.flush()
            del out
            files[f"{key}.npy"] = {"bytes": (tmp / f"{key}.npy").stat().st_size, "sha256": _sha256(tmp / f"{key}.npy")}
        (tmp / MANIFEST).write_text(json.dumps({"version": CACHE_VERSION, **(meta or {}), "files": files}, indent=1))
    return folder


def verify_npy_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of ``folder`` once every file it lists is found with its recorded size and
    SHA-256; otherwise a :class:`FileFormatError` naming the folder and the file."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != CACHE_VERSION or not isinstance(files, dict):
            raise ValueError(f"version {manifest.get('version')!r}, expected {CACHE_VERSION}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FileFormatError(f"cache {str(folder)!r}: no readable {MANIFEST} ({type(exc).__name__}: {exc})") from exc
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            raise FileFormatError(f"cache {str(folder)!r}: {name} is missing")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise FileFormatError(f"cache {str(folder)!r}: {name} has {size} bytes, expected {want.get('bytes')}")
        if _sha256(path) != want.get("sha256"):
            raise FileFormatError(f"cache {str(folder)!r}: {name} does not match the SHA-256 recorded when it was written")
    return manifest


def _discard(folder: Path) -> None:
    """Move ``folder`` out of the way atomically (only one process succeeds), then delete it."""
    trash = folder.with_name(f".{folder.name}.discard-{uuid.uuid4().hex}")
    try:
        os.replace(folder, trash)
    except FileNotFoundError:
        return
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    else:
        trash.unlink(missing_ok=True)


def cached_feature_file(
    path: str | os.PathLike, cache_dir: str | os.PathLike, read_source: Callable[[], FeatureFile], meta: Mapping[str, Any] | None = None
) -> tuple[FeatureFile, dict[str, Any]]:
    """The feature file ``path`` through its verified ``.npy`` copy under ``cache_dir``:
    ``(memory-mapped FeatureFile, manifest)``. ``read_source()`` (read and validate the source)
    runs only on a miss, or when the copy fails verification (a warning says why); ``meta`` is
    recorded in the manifest of a new copy."""
    path = Path(path)
    identity = source_identity(path)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / f"{path.name}-{key}"
    manifest = None
    if folder.exists():
        try:
            manifest = verify_npy_folder(folder)
            if manifest.get("source") != identity or sorted(manifest["files"]) != sorted(f"{k}.npy" for k in ALL_KEYS):
                raise FileFormatError(f"cache {str(folder)!r} was not made from this source or lacks arrays")
        except FileFormatError as exc:
            warnings.warn(f"{exc}; rebuilding it from {path}", stacklevel=2)
            _discard(folder)
            manifest = None
    if manifest is None:
        ff = read_source()
        meta = {"source": identity, "source_format": ff.format, **(meta or {})}
        try:
            write_npy_folder({k: ff.arrays[k] for k in ALL_KEYS}, folder, meta)
        except OSError:
            if not folder.is_dir():  # else another process (e.g. a DDP rank) wrote it first: use theirs
                raise
        manifest = verify_npy_folder(folder)
    cached = read_feature_file(folder, mmap=True)
    cached.format = f"npy cache of {manifest.get('source_format', 'a')} {path}"
    return cached, manifest

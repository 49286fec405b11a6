"""A minimal stand-in for ``dmmh.chunks`` (being written on another branch, same API), installed
only while ``import dmmh.chunks`` fails. Delete this file once dmmh/chunks.py is on main."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np


class ChunkStoreBusy(RuntimeError):
    pass


class ChunkStore:
    def __init__(self, folder, record: dict, n_rows: int, chunk_size: int):
        self.folder, self.record, self.n_rows, self.chunk_size = Path(folder), record, int(n_rows), int(chunk_size)
        self._lock = None

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.folder / "lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ChunkStoreBusy(f"{self.folder} is in use by another process") from None
        meta = {"record": self.record, "n_rows": self.n_rows, "chunk_size": self.chunk_size}
        path = self.folder / "meta.json"
        if path.exists():
            found = json.loads(path.read_text())
            if found != json.loads(json.dumps(meta)):
                raise ValueError(f"{self.folder}: made by another run")
        else:
            path.write_text(json.dumps(meta))
        return self

    def __exit__(self, *exc):
        self._lock.close()

    def _chunks(self):
        return [range(s, min(s + self.chunk_size, self.n_rows)) for s in range(0, self.n_rows, self.chunk_size)]

    def _path(self, rows: range) -> Path:
        return self.folder / f"chunk_{rows.start:09d}.npz"

    def pending(self):
        return [r for r in self._chunks() if not self._path(r).exists()]

    def write(self, rows: range, arrays: dict):
        tmp = self.folder / f".tmp_{os.getpid()}.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, self._path(rows))

    def read_all(self):
        parts = []
        for r in self._chunks():
            with np.load(self._path(r)) as z:
                parts.append({k: z[k] for k in z.files})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    def remove(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def install() -> None:
    try:
        import dmmh.chunks  # noqa: F401
    except ImportError:
        module = types.ModuleType("dmmh.chunks")
        module.ChunkStore, module.ChunkStoreBusy = ChunkStore, ChunkStoreBusy
        sys.modules["dmmh.chunks"] = module

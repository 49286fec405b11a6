"""``HammingIndex``: packed binary codes with int64 ids, exact search, one-file persistence.

File format (little-endian), version 1::

    magic   8 bytes  b"DMMHHIX\\0"
    header  24 bytes uint32 version, uint32 n_bits, uint64 n_items, uint64 payload bytes
    payload          codes uint8 (n_items, n_bits / 8), then ids int64 (n_items,)
    digest  32 bytes sha256 of header + payload

Files are written to a temporary file next to the target and renamed over it (atomic).
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dmmh._checks import check_codes
from dmmh._io import atomic_write
from dmmh._optional import require
from dmmh.hashing.multi_index import BUILD_COST, MultiIndex, predicted_work, substring_count
from dmmh.hashing.packing import pack_unchecked as _pack_unchecked
from dmmh.hashing.search import (
    BACKENDS,
    RangeResult,
    _faiss_flat,
    _faiss_knn,
    _faiss_range,
    as_packed,
    check_k,
    check_radius,
    cpu_backend,
    hamming_knn,
    hamming_range_search,
)

__all__ = ["HammingIndex", "IndexFileError", "INDEX_BACKENDS"]

INDEX_BACKENDS = (*BACKENDS, "mih")
MIH_MIN_SPEEDUP = 1.5  # auto picks mih only where the uniform-codes cost model predicts this speed-up

MAGIC = b"DMMHHIX\0"
VERSION = 1
_HEADER = struct.Struct("<IIQQ")
_DIGEST = 32


class IndexFileError(ValueError):
    """A file is not a readable dmmh HammingIndex (foreign, truncated, corrupted or too new)."""


class HammingIndex:
    """Exact Hamming index over ``n_bits``-bit codes (``n_bits % 8 == 0``).

    ``add`` takes packed uint8 codes ``(N, n_bits/8)`` or unpacked codes ``(N, n_bits)`` that are
    floating (±1 or relaxed; ``x >= 0`` is bit 1) or bool, under dmmh's one rule for codes
    (:func:`dmmh._checks.check_codes`: integer codes and NaN are refused). Results are ``(distances, ids)`` ordered by
    (distance, insertion position), whatever the backend (:data:`INDEX_BACKENDS`): ``"faiss"``,
    ``"numpy"``, ``"torch"`` scan every code (:mod:`dmmh.hashing.search`); ``"mih"`` searches a
    :class:`~dmmh.hashing.multi_index.MultiIndex` (exact, sub-linear; CPU), built on its first search
    after an add; ``"auto"`` picks torch on CUDA, else mih where the cost model
    (:func:`~dmmh.hashing.multi_index.predicted_work`, uniform codes, the worst case) predicts it at least
    :data:`MIH_MIN_SPEEDUP` times faster than a scan and the searches it sped up have paid for
    building it, else the CPU scan (faiss when installed). Codes live on ``device`` (CPU by default).
    """

    def __init__(self, n_bits: int, backend: str = "auto", device: str | torch.device = "cpu"):
        if int(n_bits) != n_bits or n_bits < 8 or n_bits % 8:
            raise ValueError(f"HammingIndex: n_bits must be a positive multiple of 8, got {n_bits!r}")
        if backend not in INDEX_BACKENDS:
            raise ValueError(f"HammingIndex: backend must be one of {INDEX_BACKENDS}, got {backend!r}")
        self.n_bits, self.backend, self.device = int(n_bits), backend, torch.device(device)
        if backend == "mih" and self.device.type != "cpu":
            raise ValueError(f"HammingIndex: backend 'mih' runs on CPU, not {self.device}")
        self._codes = torch.zeros((0, self.n_bits // 8), dtype=torch.uint8, device=self.device)
        self._ids = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._faiss = None  # IndexBinaryFlat over the codes, built on first faiss search
        self._mih: MultiIndex | None = None  # built on the first mih search after an add
        self._mih_credit = 0.0  # auto: predicted scan work that mih would have saved so far

    def __len__(self) -> int:
        return self._codes.shape[0] + sum(len(i) for _, i in self._pending)

    def __repr__(self) -> str:
        return f"HammingIndex(n_bits={self.n_bits}, items={len(self)}, backend={self.backend!r}, device={str(self.device)!r})"

    @property
    def codes(self) -> Tensor:
        """Packed codes uint8 ``(N, n_bits / 8)`` in insertion order."""
        self._flush()
        return self._codes

    @property
    def ids(self) -> Tensor:
        """int64 ids ``(N,)`` in insertion order."""
        self._flush()
        return self._ids

    def _flush(self) -> None:
        if self._pending:
            new_codes = [c for c, _ in self._pending]
            if self._faiss is not None:
                for c in new_codes:
                    self._faiss.add(np.ascontiguousarray(c.numpy()))
            self._codes = torch.cat([self._codes, *new_codes])
            self._ids = torch.cat([self._ids, *(i for _, i in self._pending)])
            self._pending = []

    def _pack(self, codes, what: str) -> Tensor:
        """Packed uint8 codes on this index's device from packed or unpacked input."""
        if isinstance(codes, np.ndarray):
            codes = torch.from_numpy(codes)
        if not isinstance(codes, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor or numpy array, got {type(codes).__name__}")
        if codes.ndim != 2:
            raise ValueError(f"{what}: expected a matrix (N, bits or bytes), got shape {tuple(codes.shape)}")
        if codes.dtype == torch.uint8:
            packed = as_packed(codes, what)
        else:
            check_codes(codes, what, packed_ok=True)
            if codes.shape[1] != self.n_bits:
                raise ValueError(f"{what}: {codes.shape[1]} bits, the index holds {self.n_bits}-bit codes (shape {tuple(codes.shape)})")
            packed = _pack_unchecked(codes.to(self.device))
        if packed.shape[1] != self.n_bits // 8:
            raise ValueError(f"{what}: {packed.shape[1]} bytes per code, the index holds {self.n_bits // 8} ({self.n_bits} bits)")
        return packed.to(self.device)

    def add(self, codes, ids=None) -> HammingIndex:
        """Append codes with their int64 ``ids`` (default: consecutive from ``len(self)``)."""
        packed = self._pack(codes, "HammingIndex.add")
        if ids is None:
            ids = torch.arange(len(self), len(self) + packed.shape[0], dtype=torch.int64)
        ids = torch.as_tensor(ids)
        if ids.ndim != 1 or ids.shape[0] != packed.shape[0]:
            raise ValueError(f"HammingIndex.add: ids must have shape ({packed.shape[0]},), got {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"HammingIndex.add: ids must be integers, got {ids.dtype}")
        self._pending.append((packed.contiguous(), ids.to(torch.int64).to(self.device)))
        if len(packed):
            self._mih, self._mih_credit = None, 0.0  # the multi-index no longer covers every code
        return self

    def _backend(self, n_queries: int, k: int | None = None, radius: int | None = None) -> str:
        """The backend a search runs on (``"auto"`` resolved as the class doc says)."""
        if self.backend != "auto":
            return self.backend
        if self.device.type == "cuda":
            return "torch"
        n = len(self)
        speedup = n / max(predicted_work(n, self.n_bits, k=k, radius=radius), 1.0)
        if n == 0 or speedup < MIH_MIN_SPEEDUP:
            return cpu_backend()
        if self._mih is None:
            self._mih_credit += n_queries * (n - n / speedup)
            if self._mih_credit < BUILD_COST * substring_count(self.n_bits, n) * n:
                return cpu_backend()
        return "mih"

    def _faiss_index(self):
        self._flush()
        if self._faiss is None:
            self._faiss = _faiss_flat(self._codes)
        return self._faiss

    def multi_index(self) -> MultiIndex:
        """The :class:`~dmmh.hashing.multi_index.MultiIndex` over the codes (built now if needed)."""
        self._flush()
        if self._mih is None:
            self._mih = MultiIndex(self._codes)
        return self._mih

    def search(self, query, k: int, chunk: int | None = None) -> tuple[Tensor, Tensor]:
        """``(distances int32, ids int64)``, each ``(Q, min(k, len(self)))``, nearest first."""
        q, k = self._pack(query, "HammingIndex.search"), check_k(k)
        backend = self._backend(len(q), k=k)
        if backend == "faiss" and len(self) and len(q):
            dist, pos = _faiss_knn(self._faiss_index(), q, min(k, len(self)))
        elif backend == "mih" and len(self):
            dist, pos = self.multi_index().knn(q, k)
        else:
            dist, pos = hamming_knn(q, self.codes, k, backend=_scan(backend), chunk=chunk)
        return dist, self.ids[pos]

    def range_search(self, query, radius: int, chunk: int | None = None) -> RangeResult:
        """Every item within Hamming distance ``radius`` (inclusive) of each query; ``indices`` are ids."""
        q, radius = self._pack(query, "HammingIndex.range_search"), check_radius(radius)
        backend = self._backend(len(q), radius=radius)
        if backend == "faiss":
            res = _faiss_range(self._faiss_index(), q, radius)
        elif backend == "mih" and len(self):
            res = self.multi_index().range_search(q, radius)
        else:
            res = hamming_range_search(q, self.codes, radius, backend=_scan(backend), chunk=chunk)
        return res._replace(indices=self.ids[res.indices])

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to one file, atomically (temporary file + rename)."""
        codes, ids = self.codes.cpu().contiguous(), self.ids.cpu().contiguous()
        payload = codes.numpy().tobytes() + ids.numpy().astype("<i8").tobytes()
        header = _HEADER.pack(VERSION, self.n_bits, codes.shape[0], len(payload))
        digest = hashlib.sha256(header + payload).digest()
        path = atomic_write(path, MAGIC + header + payload + digest)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", device: str | torch.device = "cpu") -> HammingIndex:
        """Read a file written by :meth:`save`; foreign, truncated or corrupted files raise :class:`IndexFileError`.

        Only regular files are opened (a FIFO or a device is refused without waiting on it). The magic and
        header are read and checked against the file's size first, so a wrong path costs 32 bytes of
        reading, and memory is allocated only for the payload the header declares and the file holds.
        """
        n_bits, codes, ids = _read_file(Path(path))
        index = cls(n_bits, backend=backend, device=device)
        index._codes, index._ids = torch.from_numpy(codes).to(index.device), torch.from_numpy(ids).to(index.device)
        return index

    # ------------------------------------------------------------------ faiss interop

    def to_faiss(self):
        """A ``faiss.IndexBinaryIDMap`` over an ``IndexBinaryFlat`` holding these codes and ids.

        The id map owns its flat index (``own_fields``), so the returned object is self-contained:
        it stays valid whatever happens to this index or to any Python proxy of the inner index.
        """
        faiss = require("faiss", "HammingIndex.to_faiss")
        flat = faiss.IndexBinaryFlat(self.n_bits)
        out = faiss.IndexBinaryIDMap(flat)
        flat.this.disown()  # C++ ownership moves to the id map, which frees it with itself
        out.own_fields = True
        if len(self):
            out.add_with_ids(np.ascontiguousarray(self.codes.cpu().numpy()), self.ids.cpu().numpy())
        return out

    @classmethod
    def from_faiss(cls, index, backend: str = "auto", device: str | torch.device = "cpu") -> HammingIndex:
        """Import a faiss ``IndexBinaryFlat`` (ids 0..N-1) or ``IndexBinaryIDMap`` over one (codes are copied)."""
        faiss = require("faiss", "HammingIndex.from_faiss")
        # `index` (the caller's object, possibly a temporary) must stay referenced until the copies are
        # made: downcasting returns a new proxy that does not own the C++ index, so rebinding the name to
        # it would free the index under our feet.
        outer = faiss.downcast_IndexBinary(index)
        ids, flat = None, outer
        if isinstance(outer, faiss.IndexBinaryIDMap):
            ids = faiss.vector_to_array(outer.id_map).astype(np.int64)
            flat = faiss.downcast_IndexBinary(outer.index)
        if not isinstance(flat, faiss.IndexBinaryFlat):
            raise TypeError(f"from_faiss: expected IndexBinaryFlat or IndexBinaryIDMap over one, got {type(flat).__name__}")
        n, size = int(flat.ntotal), int(flat.code_size)
        codes = faiss.vector_to_array(flat.xb)
        if codes.size != n * size or size * 8 != flat.d or (ids is not None and len(ids) != n):
            raise ValueError(
                f"from_faiss: inconsistent faiss index (d={flat.d}, ntotal={n}, code_size={size}, "
                f"{codes.size} code bytes, {'no' if ids is None else len(ids)} ids)"
            )
        out = cls(flat.d, backend=backend, device=device)
        if n:
            out.add(torch.from_numpy(codes.reshape(n, size)), None if ids is None else torch.from_numpy(ids))
        return out


def _scan(backend: str) -> str:
    """The scanning backend for ``backend`` (an empty index searched with "mih" scans nothing)."""
    return "numpy" if backend == "mih" else backend


def _open_regular(path: Path):
    """``(binary file, size)`` of a regular file; anything else raises :class:`IndexFileError`."""
    # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below); no effect on files.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise IndexFileError(f"{path}: not a regular file ({kind}); a HammingIndex is read from a file written by save()")
    return os.fdopen(fd, "rb"), st.st_size


def _read_exact(f, out: np.ndarray, path: Path) -> None:
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise IndexFileError(f"{path}: truncated while reading ({done} of {len(view)} bytes; did the file change?)")
        done += got


def _read_file(path: Path) -> tuple[int, np.ndarray, np.ndarray]:
    """``(n_bits, codes, ids)`` of an index file, header checked against the file size before the body is read."""
    f, size = _open_regular(path)
    with f:
        head = f.read(len(MAGIC) + _HEADER.size)
        if not head.startswith(MAGIC) and not MAGIC.startswith(head):
            raise IndexFileError(f"{path}: not a dmmh HammingIndex file (starts with {head[:8]!r}, expected {MAGIC!r})")
        if len(head) < len(MAGIC) + _HEADER.size:
            raise IndexFileError(f"{path}: truncated: {size} bytes, the header alone needs {len(MAGIC) + _HEADER.size}")
        version, n_bits, n, n_payload = _HEADER.unpack_from(head, len(MAGIC))
        if version != VERSION:
            raise IndexFileError(f"{path}: format version {version}, this dmmh reads version {VERSION}")
        if n_bits < 8 or n_bits % 8 or n_payload != n * (n_bits // 8 + 8):
            raise IndexFileError(f"{path}: inconsistent header (n_bits={n_bits}, items={n}, payload={n_payload} bytes)")
        expected = len(head) + n_payload + _DIGEST
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise IndexFileError(f"{path}: {what}: {size} bytes, expected {expected} for {n} codes of {n_bits} bits")
        codes, ids = np.empty((n, n_bits // 8), np.uint8), np.empty(n, "<i8")  # at most the file's size
        digest = hashlib.sha256(head[len(MAGIC) :])
        for part in (codes, ids):
            _read_exact(f, part, path)
            digest.update(part)
        if digest.digest() != f.read(_DIGEST):
            raise IndexFileError(f"{path}: checksum mismatch (corrupted file)")
    return n_bits, codes, ids.astype(np.int64, copy=False)

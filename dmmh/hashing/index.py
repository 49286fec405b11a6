"""``HammingIndex``: packed binary codes with int64 ids, exact search, one-file persistence.

File format (little-endian), version 1::

    magic   8 bytes  b"DMMHHIX\\0"
    header  24 bytes uint32 version, uint32 n_bits, uint64 n_items, uint64 payload bytes
    payload          codes uint8 (n_items, n_bits / 8), then ids int64 (n_items,)
    digest  32 bytes sha256 of header + payload

Files are written to a temporary file next to the target and renamed over it (atomic), in blocks
of at most :data:`BLOCK_BYTES` (header, codes, ids, then the incrementally computed digest), so
saving and merging (:meth:`HammingIndex.merge_files`) need no copy of the index in memory;
``load(path, mmap=True)`` maps the codes and ids instead of reading them.
"""

from __future__ import annotations

import hashlib
import mmap as _mmap
import os
import stat
import struct
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

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
BLOCK_BYTES = 1 << 22  # largest piece written or hashed at once when streaming (4 MiB)


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
        """Write the index to one file, atomically (temporary file + rename), streaming it in blocks
        of at most :data:`BLOCK_BYTES`: no copy of the codes or ids is made (a CUDA index is copied
        to the host block by block)."""
        parts = [(self._codes, self._ids), *self._pending]  # not flushed: that would copy every code
        codes, ids = (c for c, _ in parts), (i for _, i in parts)
        return atomic_write(path, lambda f: _write(f, self.n_bits, len(self), codes, ids))

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto", device: str | torch.device = "cpu", *,
             mmap: bool = False, verify: bool = True) -> HammingIndex:
        """Read a file written by :meth:`save`; foreign, truncated or corrupted files raise :class:`IndexFileError`.

        Only regular files are opened (a FIFO or a device is refused without waiting on it). The magic and
        header are read and checked against the file's size first, so a wrong path costs 32 bytes of
        reading, and memory is allocated only for the payload the header declares and the file holds.

        ``mmap=True`` maps the codes and ids (copy-on-write, private: the file is never written)
        instead of reading them into memory; pages are read on first use and the kernel may drop
        them again. The file must not be truncated or rewritten in place while mapped (``save``
        replaces files by rename, which a mapping survives). Searches read the mapped codes; the
        faiss and multi-index backends build their own copy on the first search, as for any index.
        ``add`` works: the first search after it copies the codes into memory (``save`` streams
        without that copy). On a CUDA ``device`` the mapped file is copied to the device.

        ``verify=True`` checks the SHA-256 digest: one sequential pass over the whole file (by
        blocks through the mapping with ``mmap``), about the cost of reading it.
        ``verify=False`` skips it: a mapped load then costs the header checks only, and a
        corrupted payload goes unnoticed.
        """
        n_bits, codes, ids, _ = _read_file(Path(path), mmap=mmap, verify=verify)
        return cls._of(n_bits, codes, ids, backend=backend, device=device)

    @classmethod
    def _of(cls, n_bits: int, codes: np.ndarray, ids: np.ndarray, **kw) -> HammingIndex:
        index = cls(n_bits, **kw)
        index._codes, index._ids = torch.from_numpy(codes).to(index.device), torch.from_numpy(ids).to(index.device)
        return index

    @staticmethod
    def merge_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                    check: Callable[[int, HammingIndex], object] | None = None) -> Path:
        """Write one index file ``out`` holding the codes and ids of the index files ``paths`` in
        order (what adding them one after another and saving gives, byte for byte), atomically.

        Streaming: the headers are read first (``out``'s header needs the total count); then each
        input is memory-mapped in turn, verified (checksum), handed to ``check(i, index)`` (raise to
        refuse it) and its codes written; then each is mapped again, confirmed unchanged (same
        stored digest), and its ids written. At most two inputs are mapped at a time and no copy
        of their codes or ids is made. Bad inputs raise :class:`IndexFileError` naming the file,
        as do inputs of different ``n_bits``; ``out`` is then left as it was.
        """
        paths = [Path(p) for p in paths]
        if not paths:
            raise ValueError("HammingIndex.merge_files: no input files")
        heads = []
        for p in paths:
            f, size = _open_regular(p)
            with f:
                heads.append(_read_header(f, size, p)[1:])
        n_bits = heads[0][0]
        for p, (bits, _) in zip(paths, heads):
            if bits != n_bits:
                raise IndexFileError(f"{p}: {bits}-bit codes, {paths[0]} holds {n_bits}-bit codes; merged files must agree")
        digests: list[bytes] = []

        def mapped(verify: bool) -> Iterator[tuple[int, Path, np.ndarray, np.ndarray, bytes]]:
            for i, p in enumerate(paths):
                bits, codes, ids, digest = _read_file(p, mmap=True, verify=verify)
                if (bits, len(ids)) != heads[i] or (not verify and digest != digests[i]):
                    raise IndexFileError(f"{p}: changed during the merge")
                yield i, p, codes, ids, digest

        def all_codes() -> Iterator[np.ndarray]:
            for i, _, codes, ids, digest in mapped(verify=True):
                if check is not None:
                    check(i, HammingIndex._of(n_bits, codes, ids))
                digests.append(digest)
                yield codes

        def all_ids() -> Iterator[np.ndarray]:
            for _, _, _, ids, _ in mapped(verify=False):
                yield ids

        return atomic_write(out, lambda f: _write(f, n_bits, sum(n for _, n in heads), all_codes(), all_ids()))

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


def _blocks(part: Tensor | np.ndarray, dtype) -> Iterator[np.ndarray]:
    """``part``'s rows in pieces of at most :data:`BLOCK_BYTES`, as C-contiguous ``dtype`` arrays (views when possible)."""
    row_bytes = int(np.prod(part.shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, part.shape[0], step):
        block = part[start : start + step]
        if isinstance(block, Tensor):
            block = block.cpu().numpy()
        yield np.ascontiguousarray(block.astype(dtype, copy=False))


def _write(f, n_bits: int, n: int, codes: Iterable[Tensor | np.ndarray], ids: Iterable[Tensor | np.ndarray]) -> None:
    """Write one index file to ``f``: header, every block of ``codes``, of ``ids``, then the digest."""
    header = _HEADER.pack(VERSION, n_bits, n, n * (n_bits // 8 + 8))
    digest = hashlib.sha256(header)
    f.write(MAGIC + header)
    for parts, dtype, what in ((codes, np.uint8, "codes"), (ids, "<i8", "ids")):
        rows = 0
        for part in parts:
            for block in _blocks(part, dtype):
                f.write(block)
                digest.update(block)
                rows += block.shape[0]
                del block  # before the next one is made: one block alive at a time
        if rows != n:
            raise RuntimeError(f"index writer: {rows} rows of {what}, the header declares {n}")
    f.write(digest.digest())


def _read_exact(f, out: np.ndarray, path: Path) -> None:
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise IndexFileError(f"{path}: truncated while reading ({done} of {len(view)} bytes; did the file change?)")
        done += got


def _read_header(f, size: int, path: Path) -> tuple[bytes, int, int]:
    """``(magic + header bytes, n_bits, n_items)``, checked against the file's ``size``."""
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
    return head, n_bits, n


def _read_file(path: Path, mmap: bool = False, verify: bool = True) -> tuple[int, np.ndarray, np.ndarray, bytes]:
    """``(n_bits, codes, ids, stored digest)`` of an index file, header checked against the file size
    before the body is read or mapped; the digest is checked when ``verify``."""
    f, size = _open_regular(path)
    with f:
        head, n_bits, n = _read_header(f, size, path)
        start, width = len(head), n_bits // 8
        if mmap:
            mm = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_COPY)  # private: writes never reach the file
            if len(mm) != size:
                mm.close()
                raise IndexFileError(f"{path}: changed while being opened ({size} bytes, then {len(mm)})")
            stored = mm[size - _DIGEST :]
            if verify and _digest_of(mm, len(MAGIC), size - _DIGEST) != stored:
                mm.close()
                raise IndexFileError(f"{path}: checksum mismatch (corrupted file)")
            codes = np.frombuffer(mm, np.uint8, n * width, start).reshape(n, width)
            ids = np.frombuffer(mm, "<i8", n, start + n * width)
        else:
            codes, ids = np.empty((n, width), np.uint8), np.empty(n, "<i8")  # at most the file's size
            for part in (codes, ids):
                _read_exact(f, part, path)
            stored = f.read(_DIGEST)
            if verify and _digest_of(memoryview(head), len(MAGIC), len(head), codes, ids) != stored:
                raise IndexFileError(f"{path}: checksum mismatch (corrupted file)")
    return n_bits, codes, ids.astype(np.int64, copy=False), stored


def _digest_of(buffer, start: int, stop: int, *more) -> bytes:
    """SHA-256 of ``buffer[start:stop]`` (hashed by blocks of :data:`BLOCK_BYTES`, no copy) then of ``more``."""
    digest = hashlib.sha256()
    with memoryview(buffer) as view:
        for s in range(start, stop, BLOCK_BYTES):
            with view[s : min(s + BLOCK_BYTES, stop)] as block:
                digest.update(block)
    for part in more:
        digest.update(part)
    return digest.digest()

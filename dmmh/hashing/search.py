"""Exact Hamming search on packed codes (DESIGN.md §4).

Codes are uint8 ``(N, n_bits / 8)`` as written by :func:`dmmh.hashing.pack_bits` (torch tensors or
numpy arrays). Distances are integers (int32); k-NN results are ordered by (distance, database index),
faiss' tie order, so every backend returns the same ids and distances:

- ``"faiss"``: ``faiss.IndexBinaryFlat`` (CPU; needs ``faiss-cpu``), the fastest CPU path;
- ``"numpy"``: ``np.bitwise_count`` on uint64 words (CPU, no extra dependency);
- ``"torch"``: ±1 matmul (CPU or CUDA; fp16 on CUDA, exact up to 2048 bits);
- ``"auto"``: torch for CUDA tensors, else faiss when installed, else numpy.

Results are torch tensors on the query's device (CPU for faiss/numpy).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dmmh._optional import available, require
from dmmh.hashing.packing import unpack_bits

__all__ = ["hamming_distance_packed", "hamming_knn", "hamming_range_search", "RangeResult", "BACKENDS"]

BACKENDS = ("auto", "faiss", "numpy", "torch")
_INT32_KEYS = 2**31  # composite keys below this fit int32
_CHUNK_BYTES = {"cpu": 1 << 27, "cuda": 1 << 32}  # working memory per query chunk


class RangeResult(NamedTuple):
    """Range-search results in faiss' flat layout: query ``i`` owns ``lims[i]:lims[i+1]``.

    Within a query, items are ordered by (distance, database index).
    """

    lims: Tensor  # int64 (Q + 1,)
    distances: Tensor  # int32 (lims[-1],)
    indices: Tensor  # int64 (lims[-1],)

    def query(self, i: int) -> tuple[Tensor, Tensor]:
        """``(distances, indices)`` of query ``i``."""
        a, b = int(self.lims[i]), int(self.lims[i + 1])
        return self.distances[a:b], self.indices[a:b]


def as_packed(codes: Tensor | np.ndarray, what: str) -> Tensor:
    """Check ``codes`` is a uint8 ``(N, n_bytes)`` matrix; return it as a torch tensor (no copy)."""
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(codes)
    if not isinstance(codes, Tensor):
        raise TypeError(f"{what}: expected packed codes as a torch.Tensor or numpy array, got {type(codes).__name__}")
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ValueError(
            f"{what}: expected packed uint8 codes of shape (N, n_bits/8), got {codes.dtype} {tuple(codes.shape)} "
            "(pack ±1 or relaxed codes with dmmh.hashing.pack_bits first)"
        )
    return codes


def _inputs(query, database, backend: str) -> tuple[Tensor, Tensor, str]:
    q, db = as_packed(query, "query"), as_packed(database, "database")
    if q.shape[1] != db.shape[1]:
        raise ValueError(f"code lengths differ: query {q.shape[1] * 8} bits, database {db.shape[1] * 8} bits")
    if q.shape[1] == 0:
        raise ValueError("codes have 0 bits")
    if q.device != db.device:
        raise ValueError(f"query is on {q.device}, database on {db.device}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "torch" if q.is_cuda else cpu_backend()
    if backend in ("faiss", "numpy") and q.device.type != "cpu":
        raise ValueError(f"backend {backend!r} runs on CPU; codes are on {q.device} (use backend='torch')")
    return q, db, backend


def cpu_backend() -> str:
    """The CPU backend ``"auto"`` picks: faiss when installed, else numpy."""
    return "faiss" if available("faiss") else "numpy"


def check_k(k) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _chunk(n_db: int, bytes_per_pair: int, device: torch.device, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    budget = _CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // max(1, n_db * bytes_per_pair))


# ---------------------------------------------------------------- distances (one query chunk)


def _words(packed: Tensor) -> np.ndarray:
    """uint8 ``(N, B)`` → uint64 ``(N, ceil(B / 8))`` words, zero-padded (xor of pads is 0)."""
    a = packed.numpy()
    pad = -a.shape[1] % 8
    if pad:
        a = np.concatenate([a, np.zeros((a.shape[0], pad), np.uint8)], axis=1)
    return np.ascontiguousarray(a).view(np.uint64)


def _numpy_dist(qw: np.ndarray, dw: np.ndarray) -> np.ndarray:
    """uint16 ``(Q, N)`` distances (a stable argsort of uint16 is a linear-time radix sort)."""
    out = np.zeros((qw.shape[0], dw.shape[0]), np.uint16 if qw.shape[1] * 64 < 2**16 else np.int64)
    tmp = np.empty(out.shape, np.uint64)
    for w in range(qw.shape[1]):
        np.bitwise_xor(qw[:, w, None], dw[None, :, w], out=tmp)
        out += np.bitwise_count(tmp)
    return out


def _signs(packed: Tensor) -> Tensor:
    dtype = torch.float16 if packed.is_cuda and packed.shape[1] * 8 <= 2048 else torch.float32
    return unpack_bits(packed, dtype=dtype)


def _torch_dist(qs: Tensor, ds: Tensor, n_bits: int) -> Tensor:
    dot = (qs @ ds.T).to(torch.float32)
    return ((n_bits - dot) * 0.5).round_().to(torch.int32)


def hamming_distance_packed(query, database, backend: str = "auto") -> Tensor:
    """All integer Hamming distances ``(Q, N)`` (int32) between packed codes."""
    q, db, backend = _inputs(query, database, backend)
    if backend == "torch":
        return _torch_dist(_signs(q), _signs(db), q.shape[1] * 8)
    return torch.from_numpy(_numpy_dist(_words(q), _words(db)).astype(np.int32))  # "faiss" and "numpy" alike


# ---------------------------------------------------------------- k-NN


def _select(qs: Tensor, ds: Tensor, base: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """k nearest by (distance, index) from ±1 codes, via the unique key ``2 * (distance * N + index)``.

    ``2 * distance = K - dot``, so the key is ``base - N * dot`` with ``base = K * N + 2 * index``; the
    keys are distinct, so topk is exact and deterministic.
    """
    n = ds.shape[0]
    key = (qs @ ds.T).to(base.dtype)
    key.mul_(-n).add_(base)
    key = torch.topk(key, k, dim=1, largest=False, sorted=True).values
    return (key // (2 * n)).to(torch.int32), ((key % (2 * n)) // 2).to(torch.int64)


def _select_np(dist: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, idx, 1).astype(np.int32), idx


def hamming_knn(query, database, k: int, backend: str = "auto", chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Exact k nearest neighbours by Hamming distance.

    Returns ``(distances int32, indices int64)``, each ``(Q, min(k, N))``, rows ordered by
    (distance, database index). ``chunk`` (queries per block) bounds working memory.
    """
    q, db, backend = _inputs(query, database, backend)
    k = min(check_k(k), db.shape[0])
    n_q = q.shape[0]
    if k == 0 or n_q == 0:
        return torch.zeros((n_q, k), dtype=torch.int32, device=q.device), torch.zeros((n_q, k), dtype=torch.int64, device=q.device)
    if backend == "faiss":
        return _faiss_knn(_faiss_flat(db), q, k)
    step = _chunk(db.shape[0], 20 if backend == "numpy" else 12, q.device, chunk)
    dists, ids = [], []
    if backend == "numpy":
        qw, dw = _words(q), _words(db)
        for s in range(0, n_q, step):
            d, i = _select_np(_numpy_dist(qw[s : s + step], dw), k)
            dists.append(torch.from_numpy(d))
            ids.append(torch.from_numpy(i))
    else:
        ds, n_bits, n = _signs(db), q.shape[1] * 8, db.shape[0]
        kind = torch.int32 if 2 * (n_bits + 1) * n < _INT32_KEYS else torch.int64
        base = n_bits * n + 2 * torch.arange(n, device=q.device, dtype=kind)
        for s in range(0, n_q, step):
            d, i = _select(_signs(q[s : s + step]), ds, base, k)
            dists.append(d)
            ids.append(i)
    return torch.cat(dists), torch.cat(ids)


def _faiss_flat(db: Tensor):
    faiss = require("faiss", "Hamming search with backend='faiss'")
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    if db.shape[0]:
        index.add(np.ascontiguousarray(db.numpy()))
    return index


def _faiss_knn(index, q: Tensor, k: int) -> tuple[Tensor, Tensor]:
    d, i = index.search(np.ascontiguousarray(q.numpy()), k)
    return torch.from_numpy(d), torch.from_numpy(i)


# ---------------------------------------------------------------- range search


def check_radius(radius) -> int:
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    return int(radius)


def _gather_range(n_q: int, rows: Tensor, dist: Tensor, cols: Tensor) -> RangeResult:
    """Hits as (row, distance, column), any order → :class:`RangeResult` sorted by (row, distance, column)."""
    by_col = torch.sort(cols, stable=True).indices
    rows, dist, cols = rows[by_col], dist[by_col], cols[by_col]
    order = torch.sort(rows * (int(dist.max()) + 1 if dist.numel() else 1) + dist, stable=True).indices
    rows, dist, cols = rows[order], dist[order], cols[order]
    counts = torch.bincount(rows, minlength=n_q)
    lims = torch.zeros(n_q + 1, dtype=torch.int64, device=rows.device)
    lims[1:] = counts.cumsum(0)
    return RangeResult(lims, dist.to(torch.int32), cols.to(torch.int64))


def hamming_range_search(query, database, radius: int, backend: str = "auto", chunk: int | None = None) -> RangeResult:
    """All database items within Hamming distance ``radius`` (inclusive) of each query."""
    q, db, backend = _inputs(query, database, backend)
    radius = check_radius(radius)
    if backend == "faiss":
        return _faiss_range(_faiss_flat(db), q, radius)
    step = _chunk(db.shape[0], 12, q.device, chunk)
    parts = []
    if backend == "numpy":
        qw, dw = _words(q), _words(db)
        for s in range(0, q.shape[0], step):
            d = _numpy_dist(qw[s : s + step], dw)
            r, c = np.nonzero(d <= radius)
            parts.append((torch.from_numpy(r + s), torch.from_numpy(d[r, c].astype(np.int64)), torch.from_numpy(c)))
    else:
        ds, n_bits = _signs(db), q.shape[1] * 8
        for s in range(0, q.shape[0], step):
            d = _torch_dist(_signs(q[s : s + step]), ds, n_bits)
            r, c = torch.nonzero(d <= radius, as_tuple=True)
            parts.append((r + s, d[r, c], c))
    if not parts:
        e = torch.zeros(0, dtype=torch.int64, device=q.device)
        parts = [(e, e.to(torch.int32), e)]
    rows, dist, cols = (torch.cat(p) for p in zip(*parts))
    return _gather_range(q.shape[0], rows.to(torch.int64), dist.to(torch.int64), cols)


def _faiss_range(index, q: Tensor, radius: int) -> RangeResult:
    # faiss' binary range search keeps distances < radius (strict): ask for radius + 1.
    lims, d, i = index.range_search(np.ascontiguousarray(q.numpy()), radius + 1)
    rows = torch.repeat_interleave(torch.arange(q.shape[0]), torch.from_numpy(np.diff(lims).astype(np.int64)))
    return _gather_range(q.shape[0], rows, torch.from_numpy(d.astype(np.int64)), torch.from_numpy(i.astype(np.int64)))

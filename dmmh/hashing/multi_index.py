"""Exact sub-linear Hamming search by multi-index hashing (Norouzi, Punjani & Fleet, "Fast Exact Search
in Hamming Space with Multi-Index Hashing", CVPR 2012 / TPAMI 2014).

A ``b``-bit code is cut into ``m`` disjoint substrings of ``s ≈ b / m`` bits, each indexed by one table.
If two codes are within Hamming distance ``r = m·ρ + a`` (``0 <= a < m``), then by the pigeonhole
principle one of the first ``a + 1`` substrings is within ``ρ`` of the query's, or one of the others
within ``ρ - 1``. The search visits steps ``(ρ, t)`` in the order ``ρ = 0, 1, ...``, ``t = 0..m-1``;
step ``(ρ, t)`` looks up, in table ``t``, every key at distance exactly ``ρ`` from the query's
substring (all ``C(s_t, ρ)`` bit flips, enumerated as arrays), and verifies each item found by its full
Hamming distance; an item is counted at the first step that reaches it. After step ``(ρ, t)`` every
item within distance ``β = m·ρ + t`` has been found, so a query is finished when its ``k``-th smallest
distance so far is ``<= β`` (k-NN) or when ``β >= r`` (range search): the results equal the linear
scan's, ties ordered by (distance, position).

Each table holds its items sorted by substring key and a copy of the codes in that order (a
bucket's codes are read contiguously); a table whose key space is small enough holds every key's
bucket bounds directly, else the sorted distinct keys (binary search). Queries go in blocks of
:data:`QUERY_BLOCK`, every step vectorised over the block (blocks run on ``torch.get_num_threads()``
threads). The paper's substring length is ``s = log2 N`` (about one item per bucket on uniform codes);
``m = ceil(b / log2 N)`` keeps ``s <= log2 N``, which measured faster than rounding to nearest
(benchmarks/bench_search.py).

Work is counted per query in units of "one code compared by a linear scan" (:data:`PROBE_COST` per
key looked up, :data:`CANDIDATE_COST` per candidate verified, measured on CPU). A query whose work would
exceed a linear scan of the collection is finished by the scan instead (faiss when installed), so no
query costs much more than a scan. :func:`predicted_work` applies the same model to uniform random codes,
the worst case for multi-index hashing; ``HammingIndex(backend="auto")`` uses it to choose.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from dmmh.hashing.search import RangeResult, _gather_range, _words, cpu_backend, hamming_knn, hamming_range_search

__all__ = ["MultiIndex", "substring_count", "predicted_work"]

MAX_SUBSTRING_BITS = 32
DENSE_TABLE_RATIO = 8  # a table holds every key's bucket bounds when 2^s <= 8 N (else sorted keys)
PROBE_COST = 32.0  # a key lookup costs about as much as a linear scan comparing this many codes
CANDIDATE_COST = 32.0  # verifying one candidate, likewise
BUILD_COST = 500.0  # building: per item and table, likewise
CANDIDATE_BLOCK = 1 << 22  # candidates verified per vectorised pass (bounds working memory)
QUERY_BLOCK = 256


def substring_count(n_bits: int, n_items: int) -> int:
    """``m = ceil(n_bits / log2 N)``: substrings of at most ``log2 N`` bits (and at most 32)."""
    s = max(1.0, math.log2(max(n_items, 2)))
    return int(min(n_bits, max(math.ceil(n_bits / s), math.ceil(n_bits / MAX_SUBSTRING_BITS))))


def _cuts(n_bits: int, m: int) -> list[tuple[int, int]]:
    """``m`` contiguous bit ranges covering ``n_bits``, lengths differing by at most one."""
    cuts = [round(i * n_bits / m) for i in range(m + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _steps(lengths: list[int]):
    """``(rho, t, beta)`` in search order; after the step, every item within distance ``beta`` is found."""
    m = len(lengths)
    for rho in range(max(lengths) + 1):
        for t in range(m):
            yield rho, t, rho * m + t


@lru_cache(maxsize=4096)
def predicted_work(n_items: int, n_bits: int, k: int | None = None, radius: int | None = None, m: int | None = None) -> float:
    """Work per query (in codes-scanned units, see the module doc) of a multi-index search on uniform
    random codes, the worst case; a linear scan costs ``n_items``. Exactly one of ``k``, ``radius``."""
    n = max(int(n_items), 1)
    m = substring_count(n_bits, n) if m is None else m
    if radius is None:  # the expected k-th smallest distance: smallest d with N * P(Binomial(b, 1/2) <= d) >= k
        cdf, radius = 0, n_bits
        for d in range(n_bits + 1):
            cdf += math.comb(n_bits, d)
            if n * cdf >= min(k, n) * 2**n_bits:
                radius = d
                break
    lengths = [hi - lo for lo, hi in _cuts(n_bits, m)]
    work = 0.0
    for rho, t, beta in _steps(lengths):
        if rho <= lengths[t]:
            probes = math.comb(lengths[t], rho)
            work += probes * (PROBE_COST + CANDIDATE_COST * n / 2 ** lengths[t])
        if beta >= radius or work > n:
            break
    return min(work, float(n))


@lru_cache(maxsize=None)
def _flips(s: int, rho: int) -> np.ndarray:
    """All ``s``-bit masks with exactly ``rho`` bits set (int64, ``C(s, rho)`` of them), ascending."""
    if rho == 0:
        return np.zeros(1, np.int64)
    grown = (_flips(s, rho - 1)[:, None] | (1 << np.arange(s, dtype=np.int64))[None, :]).ravel()
    return np.unique(grown[np.bitwise_count(grown) == rho])


def _substring(words: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits ``lo..hi-1`` (at most 32) of each code (uint64 words, LSB-first) as int64 keys."""
    w, off = divmod(lo, 64)
    out = words[:, w] >> np.uint64(off)
    if off + (hi - lo) > 64:
        out = out | (words[:, w + 1] << np.uint64(64 - off))
    return (out & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)


class _Table:
    """Items sorted by one substring: each key's bucket, the items' positions, and the codes in that order.

    A dense table (``2^s <= DENSE_TABLE_RATIO * N``, ``N < 2^32``) holds every key's bucket as one int64
    ``start | end << 32``, read with one gather per probe; a sparse one holds the sorted distinct keys and
    their offsets, found by binary search.
    """

    def __init__(self, words: np.ndarray, lo: int, hi: int):
        self.lo, self.hi, self.bits = lo, hi, hi - lo
        keys = _substring(words, lo, hi)
        order = np.argsort(keys, kind="stable")
        n = len(keys)
        self.positions = order.astype(np.int32 if n < 2**31 else np.int64)
        self.columns = [np.ascontiguousarray(words[order, w]) for w in range(words.shape[1])]  # codes, table order
        sorted_keys = keys[order]
        self.dense = (1 << self.bits) <= DENSE_TABLE_RATIO * max(n, 1) and n < 2**32
        if self.dense:
            offsets = np.searchsorted(sorted_keys, np.arange((1 << self.bits) + 1, dtype=np.int64))
            self.spans = offsets[:-1] | (offsets[1:] << 32)
        else:
            self.keys, first = np.unique(sorted_keys, return_index=True)
            self.offsets = np.append(first, n).astype(np.int64)

    def buckets(self, probes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(start, length)`` of each probed key's bucket (length 0 where the key is absent)."""
        if self.dense:
            span = self.spans.take(probes)
            start = span & 0xFFFFFFFF
            return start, (span >> 32) - start
        if not len(self.keys):
            return np.zeros_like(probes), np.zeros_like(probes)
        at = np.minimum(np.searchsorted(self.keys, probes), len(self.keys) - 1)
        start = self.offsets.take(at)
        return start, np.where(self.keys.take(at) == probes, self.offsets.take(at + 1) - start, 0)

    @property
    def nbytes(self) -> int:
        parts = [self.positions, *self.columns] + ([self.spans] if self.dense else [self.keys, self.offsets])
        return sum(a.nbytes for a in parts)


class MultiIndex:
    """Multi-index hashing over packed uint8 codes ``(N, n_bits / 8)`` (CPU): exact k-NN and range search.

    Positions returned are row numbers of ``codes``; results equal :func:`~dmmh.hashing.hamming_knn` and
    :func:`~dmmh.hashing.hamming_range_search`, ties ordered by (distance, position). ``m``: substring
    count (default :func:`substring_count`). Memory: :attr:`nbytes` (each table keeps a copy of the codes).
    """

    def __init__(self, codes: Tensor | np.ndarray, m: int | None = None):
        codes = torch.as_tensor(codes)
        if codes.dtype != torch.uint8 or codes.ndim != 2 or codes.shape[1] == 0 or codes.device.type != "cpu":
            raise ValueError(f"MultiIndex: expected packed uint8 codes (N, n_bits/8) on CPU, got {codes.dtype} {tuple(codes.shape)} on {codes.device}")
        self.packed = codes
        self.n, self.n_bits = codes.shape[0], codes.shape[1] * 8
        self.m = substring_count(self.n_bits, self.n) if m is None else int(m)
        if not 1 <= self.m <= self.n_bits or math.ceil(self.n_bits / self.m) > MAX_SUBSTRING_BITS:
            low = math.ceil(self.n_bits / MAX_SUBSTRING_BITS)
            raise ValueError(f"MultiIndex: m must be in [{low}, {self.n_bits}] for {self.n_bits}-bit codes, got {m}")
        words = _words(codes)
        self.tables = [_Table(words, lo, hi) for lo, hi in _cuts(self.n_bits, self.m)]
        self._masks = np.zeros((self.m, words.shape[1]), np.uint64)  # each table's bits within the words
        for t, table in enumerate(self.tables):
            for bit in range(table.lo, table.hi):
                self._masks[t, bit // 64] |= np.uint64(1 << (bit % 64))

    def __len__(self) -> int:
        return self.n

    @property
    def nbytes(self) -> int:
        """Bytes held by the tables (bucket bounds, positions and a copy of the codes per table)."""
        return sum(t.nbytes for t in self.tables)

    # ---------------------------------------------------------------- search

    def knn(self, query, k: int) -> tuple[Tensor, Tensor]:
        """``(distances int32, positions int64)``, each ``(Q, min(k, N))``, ordered by (distance, position)."""
        q = self._query(query)
        k = min(int(k), self.n)
        dist, pos = np.zeros((len(q), k), np.int32), np.zeros((len(q), k), np.int64)

        def block(s: int) -> None:
            rows, d, p, scan = self._search(q[s : s + QUERY_BLOCK], k=k)
            rank = np.arange(len(rows)) - np.searchsorted(rows, rows)  # rank within its query
            dist[s + rows, rank], pos[s + rows, rank] = d, p
            if len(scan):
                sd, sp = hamming_knn(q[s + scan], self.packed, k, backend=cpu_backend())
                dist[s + scan], pos[s + scan] = sd.numpy(), sp.numpy()

        if k:
            _in_threads(block, range(0, len(q), QUERY_BLOCK))
        return torch.from_numpy(dist), torch.from_numpy(pos)

    def range_search(self, query, radius: int) -> RangeResult:
        """Every item within Hamming distance ``radius`` (inclusive) of each query, positions as indices."""
        q = self._query(query)
        radius = int(radius)

        def block(s: int):
            rows, d, p, scan = self._search(q[s : s + QUERY_BLOCK], radius=radius)
            parts = [(s + rows, d, p)]
            if len(scan):
                res = hamming_range_search(q[s + scan], self.packed, radius, backend=cpu_backend())
                counts = (res.lims[1:] - res.lims[:-1]).numpy()
                parts.append((np.repeat(s + scan, counts), res.distances.numpy(), res.indices.numpy()))
            return parts

        parts = [p for ps in _in_threads(block, range(0, len(q) if self.n else 0, QUERY_BLOCK)) for p in ps]
        rows, dist, cols = (torch.from_numpy(np.concatenate([p[i] for p in parts] or [np.zeros(0)]).astype(np.int64)) for i in range(3))
        return _gather_range(len(q), rows, dist, cols)

    def _query(self, query) -> np.ndarray:
        q = torch.as_tensor(query)
        if q.dtype != torch.uint8 or q.ndim != 2 or q.shape[1] * 8 != self.n_bits:
            raise ValueError(f"MultiIndex: expected packed uint8 queries (Q, {self.n_bits // 8}), got {q.dtype} {tuple(q.shape)}")
        return np.ascontiguousarray(q.cpu().numpy())

    def _search(self, packed: np.ndarray, k: int | None = None, radius: int | None = None):
        """One block of queries: ``(rows, distances, positions, scanned)``, sorted by (row, distance,
        position) (k-NN: the first ``k`` per row); the rows in ``scanned`` are left to a linear scan."""
        n_q, b = len(packed), self.n_bits
        qw = _words(torch.from_numpy(packed))
        qkeys = [_substring(qw, t.lo, t.hi) for t in self.tables]
        qwords = [np.ascontiguousarray(qw[:, w]) for w in range(qw.shape[1])]
        limit = np.full(n_q, b if radius is None else min(radius, b), np.int64)  # wanted: distance <= limit
        state = {"open": np.ones(n_q, bool), "scan": np.zeros(n_q, bool), "work": np.zeros(n_q)}
        pool = [np.zeros(0, np.int64)] * 3  # rows, distances, positions
        for rho, t, beta in _steps([table.bits for table in self.tables]):
            table = self.tables[t]
            if rho <= table.bits:
                found = self._step(table, rho * self.m + t, _flips(table.bits, rho), qkeys[t], qwords, limit, state)
                pool = [np.concatenate([a, f]) for a, f in zip(pool, found)]
                if k is not None:
                    pool, limit = _keep_best(pool, limit, k, b)
            state["open"] &= limit > beta  # finished: every item within its limit has been found
            if not state["open"].any():
                break
        pool = [a[~state["scan"][pool[0]]] for a in pool]
        order = np.lexsort((pool[2], pool[1], pool[0]))
        rows, dist, pos = (a[order] for a in pool)
        if k is not None:
            first_k = np.arange(len(rows)) - np.searchsorted(rows, rows) < k
            rows, dist, pos = rows[first_k], dist[first_k], pos[first_k]
        return rows, dist, pos, np.flatnonzero(state["scan"])

    def _step(self, table: _Table, step: int, flips, qkey, qwords, limit, state):
        """``(rows, distances, positions)`` of the items first found at ``step`` (``table``, ``flips`` of one
        weight) within ``limit[row]`` of query ``row``, for the open rows; rows whose work would exceed a
        scan are moved from open to scanned instead."""
        rows = np.flatnonzero(state["open"])
        probes = (qkey[rows, None] ^ flips[None, :]).ravel()
        start, length = table.buckets(probes)
        per_row = np.bincount(np.arange(len(probes)) // len(flips), weights=length, minlength=len(rows))
        work = state["work"][rows] + len(flips) * PROBE_COST + per_row * CANDIDATE_COST
        over = work > self.n
        state["work"][rows] = work
        state["scan"][rows[over]], state["open"][rows[over]] = True, False
        hit = np.flatnonzero(length * ~np.repeat(over, len(flips)))
        start, length, owner = start[hit], length[hit], rows[hit // len(flips)]
        small = np.uint8 if self.n_bits <= 255 else np.uint16
        out = [[], [], []]
        lo, ends = 0, np.cumsum(length)
        while lo < len(length):  # blocks of about CANDIDATE_BLOCK candidates
            hi = max(lo + 1, int(np.searchsorted(ends, (ends[lo - 1] if lo else 0) + CANDIDATE_BLOCK, side="right")))
            s, n, o = start[lo:hi], length[lo:hi], owner[lo:hi]
            last = np.cumsum(n)
            idx = np.repeat(s - (last - n), n)
            idx += np.arange(len(idx), dtype=idx.dtype)  # candidate rows of the table, bucket after bucket
            dist = np.zeros(len(idx), small)
            for col, qcol in zip(table.columns, qwords):
                x = col.take(idx)
                x ^= np.repeat(qcol[o], n)
                dist += np.bitwise_count(x)
            keep = np.flatnonzero(dist <= np.repeat(limit[o].astype(small), n))
            idx, dist, who = idx[keep], dist[keep].astype(np.int64), o[np.searchsorted(last, keep, side="right")]
            # the step at which each item is first found: min over tables u of (substring distance * m + u)
            first = np.full(len(idx), np.iinfo(np.int64).max)
            for u, masks in enumerate(self._masks):
                du = sum(np.bitwise_count((col.take(idx) ^ qcol[who]) & mask).astype(np.int64)
                         for col, qcol, mask in zip(table.columns, qwords, masks) if mask)
                np.minimum(first, du * self.m + u, out=first)
            new = first == step
            out[0].append(who[new])
            out[1].append(dist[new])
            out[2].append(table.positions[idx[new]].astype(np.int64))
            lo = hi
        return [np.concatenate(o) if o else np.zeros(0, np.int64) for o in out]


def _keep_best(pool, limit, k: int, n_bits: int):
    """k-NN: once a row holds k items, the k-th smallest distance becomes its limit; entries beyond go."""
    rows, dist, pos = pool
    n_q = len(limit)
    cum = np.bincount(rows * (n_bits + 1) + dist, minlength=n_q * (n_bits + 1)).reshape(n_q, n_bits + 1).cumsum(1)
    limit = np.where(cum[:, -1] >= k, np.minimum(limit, np.argmax(cum >= k, axis=1)), limit)
    keep = dist <= limit[rows]
    return [rows[keep], dist[keep], pos[keep]], limit


def _in_threads(fn, starts) -> list:
    """``[fn(s) for s in starts]``, on ``torch.get_num_threads()`` threads when there are several blocks
    (numpy releases the GIL in the vectorised passes)."""
    starts = list(starts)
    workers = max(1, min(torch.get_num_threads(), len(starts)))
    if workers == 1:
        return [fn(s) for s in starts]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, starts))

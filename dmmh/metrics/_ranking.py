"""The one ranking pass behind every retrieval metric (DESIGN.md §3).

Hamming distances are small integers, so a query's stable ranking (ascending distance, ties by
database index) is a counting sort — one histogram and one scatter, no comparison sort. From the
ranked relevance only per-query sufficient statistics are kept: the number ``R`` of relevant items,
``Σ_i i / pos_i`` over them (``pos_i``: 1-based rank of the i-th relevant item), the same sum and
the hit count within the top k, and cumulative counts per Hamming radius.

Two backends compute the same statistics:

* ``"numpy"`` (CPU default): one query at a time per worker thread, so memory stays O(threads × N).
  Distances by XOR + popcount of 64-bit words, relevance by AND of label bit masks, ranking by
  numpy's stable argsort of 8/16-bit keys (a radix sort).
* ``"torch"`` (default off CPU): chunks of queries, ±1 matmul distances, ``torch.sort(stable=True)``;
  a chunk holds about ``CHUNK_ELEMENTS`` query × database entries (~40 bytes each).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

__all__ = ["RankingStats", "ranking_stats", "distances", "BACKENDS", "CHUNK_ELEMENTS"]

BACKENDS = ("numpy", "torch")
CHUNK_ELEMENTS = 1 << 24


@dataclass
class RankingStats:
    """Per-query statistics of the stable Hamming ranking (CPU tensors).

    ``within[:, r]`` / ``rel_within[:, r]``: items / relevant items at Hamming distance ``<= r``.
    """

    n_database: int
    n_bits: int
    relevant: Tensor  # (Q,) int64
    ap_sum: Tensor  # (Q,) float64
    hits: dict[int, Tensor] = field(default_factory=dict)  # k → (Q,) int64
    ap_sum_at: dict[int, Tensor] = field(default_factory=dict)  # k → (Q,) float64
    within: Tensor | None = None  # (Q, n_bits + 1) int64
    rel_within: Tensor | None = None  # (Q, n_bits + 1) int64


def distances(query_bits: Tensor, database_bits: Tensor) -> Tensor:
    """Exact Hamming distances ``(Q, N)`` of bool bit matrices by a ±1 float32 matmul (any device)."""
    n_bits = query_bits.shape[1]
    q, d = query_bits.to(torch.float32) * 2 - 1, database_bits.to(torch.float32) * 2 - 1
    dist = torch.addmm(torch.tensor(n_bits / 2, device=q.device), q, d.T, alpha=-0.5)  # K/2 - q·d/2
    return dist.to(torch.uint8 if n_bits <= 255 else torch.int16 if n_bits <= 32767 else torch.int32)


def _words(bits: np.ndarray, smallest: bool = False) -> np.ndarray:
    """Bool ``(N, K)`` → little-endian words ``(W, N)``: uint64, or the smallest uint if one word holds K."""
    packed = np.packbits(bits, axis=1, bitorder="little")
    nbytes = packed.shape[1]
    size = next(s for s in (1, 2, 4, 8) if s >= nbytes) if smallest and nbytes <= 8 else 8
    packed = np.pad(packed, ((0, 0), (0, -nbytes % size)))
    return np.ascontiguousarray(packed.view(f"<u{size}").T)


def _numpy_stats(qb, db, yq, yd, n_bits, hit_ks, ap_ks, radii, out) -> None:
    qw, dw = _words(qb), _words(db)
    ql, dl = _words(yq, smallest=True), _words(yd, smallest=True)
    n = db.shape[0]
    acc_dtype = np.uint8 if n_bits <= 255 else np.uint16

    def rows(idx: range) -> None:
        xor, cnt, dist = np.empty(n, np.uint64), np.empty(n, np.uint8), np.empty(n, acc_dtype)
        land, rel, more = np.empty(n, dl.dtype), np.empty(n, bool), np.empty(n, bool)
        for i in idx:
            dist[:] = 0
            for w in range(len(dw)):
                np.bitwise_xor(dw[w], qw[w, i], out=xor)
                np.add(dist, np.bitwise_count(xor, out=cnt), out=dist)
            np.not_equal(np.bitwise_and(dl[0], ql[0, i], out=land), 0, out=rel)
            for w in range(1, len(dl)):
                rel |= np.not_equal(np.bitwise_and(dl[w], ql[w, i], out=land), 0, out=more)
            pos = np.flatnonzero(rel[np.argsort(dist, kind="stable")]) + 1  # 1-based ranks of relevant items
            prec = np.arange(1, len(pos) + 1) / pos
            out["relevant"][i], out["ap_sum"][i] = len(pos), prec.sum()
            for k in hit_ks:
                out["hits", k][i] = np.searchsorted(pos, k, side="right")
            for k in ap_ks:
                out["ap", k][i] = prec[: np.searchsorted(pos, k, side="right")].sum()
            if radii:
                out["within"][i] = np.cumsum(np.bincount(dist, minlength=n_bits + 1))
                out["rel_within"][i] = np.searchsorted(pos, out["within"][i], side="right")

    workers = max(1, min(torch.get_num_threads(), len(qb)))
    parts = [range(s, len(qb), workers) for s in range(workers)]
    if workers == 1:
        rows(parts[0])
        return
    with ThreadPoolExecutor(workers) as pool:  # numpy releases the GIL in every per-row call
        list(pool.map(rows, parts))


def _torch_stats(qb, db, yq, yd, n_bits, hit_ks, ap_ks, radii, out, chunk) -> None:
    n = db.shape[0]
    yq, yd = yq.to(torch.float32), yd.to(torch.float32)
    ranks = torch.arange(1, n + 1, device=db.device, dtype=torch.float64)
    for s in range(0, len(qb), chunk):
        dist = distances(qb[s : s + chunk], db)
        rel = (yq[s : s + chunk] @ yd.T) > 0  # exact: counts of common labels are small integers
        rel = torch.gather(rel, 1, torch.sort(dist, dim=1, stable=True).indices)
        hits = rel.cumsum(1)
        prec = torch.where(rel, hits / ranks, 0.0)
        rows = slice(s, s + len(dist))
        out["relevant"][rows], out["ap_sum"][rows] = hits[:, -1].cpu(), prec.sum(1).cpu()
        for k in hit_ks:
            out["hits", k][rows] = hits[:, k - 1].cpu()
        for k in ap_ks:
            out["ap", k][rows] = prec[:, :k].sum(1).cpu()
        if radii:
            counts = torch.zeros(len(dist), n_bits + 1, dtype=torch.int64, device=dist.device)
            within = counts.scatter_add_(1, dist.long(), torch.ones_like(dist, dtype=torch.int64)).cumsum(1)
            found = torch.gather(hits, 1, (within - 1).clamp(min=0))
            out["within"][rows], out["rel_within"][rows] = within.cpu(), torch.where(within > 0, found, 0).cpu()


def ranking_stats(
    query_bits: Tensor,
    database_bits: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    hit_ks: tuple[int, ...] = (),
    ap_ks: tuple[int, ...] = (),
    radii: bool = False,
    chunk: int | None = None,
    backend: str | None = None,
) -> RankingStats:
    """Statistics of ranking bool codes ``(N, K)`` by Hamming distance, labels multi-hot ``(N, C)``.

    ``hit_ks``: k (1..N) whose relevant count in the top k is wanted; ``ap_ks``: k (1..N) whose
    ``Σ i/pos_i`` over the top k is wanted; ``radii``: count items within every radius.
    ``chunk``: queries per chunk of the torch backend; ``backend``: one of :data:`BACKENDS`
    (default numpy on CPU, torch elsewhere).
    """
    backend = backend or ("numpy" if query_bits.device.type == "cpu" else "torch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    n_q, n_bits = query_bits.shape
    n = database_bits.shape[0]
    z = lambda dtype, *shape: torch.zeros(n_q, *shape, dtype=dtype)  # noqa: E731
    out = {"relevant": z(torch.int64), "ap_sum": z(torch.float64)}
    out.update({("hits", k): z(torch.int64) for k in hit_ks} | {("ap", k): z(torch.float64) for k in ap_ks})
    if radii:
        out["within"], out["rel_within"] = z(torch.int64, n_bits + 1), z(torch.int64, n_bits + 1)
    if backend == "numpy":
        arrays = {key: t.numpy() for key, t in out.items()}
        np_in = [np.ascontiguousarray(x.detach().cpu().numpy() != 0) for x in (query_bits, database_bits, query_labels, database_labels)]
        _numpy_stats(*np_in, n_bits, hit_ks, ap_ks, radii, arrays)
    else:
        chunk = max(1, CHUNK_ELEMENTS // n) if chunk is None else int(chunk)
        if chunk < 1:
            raise ValueError(f"chunk must be a positive number of queries, got {chunk}")
        dev = query_bits.device
        _torch_stats(query_bits, database_bits.to(dev), query_labels.to(dev), database_labels.to(dev), n_bits, hit_ks, ap_ks, radii, out, chunk)
    return RankingStats(
        n_database=n, n_bits=n_bits, relevant=out["relevant"], ap_sum=out["ap_sum"],
        hits={k: out["hits", k] for k in hit_ks}, ap_sum_at={k: out["ap", k] for k in ap_ks},
        within=out.get("within"), rel_within=out.get("rel_within"),
    )

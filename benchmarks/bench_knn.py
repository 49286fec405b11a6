"""Exact Hamming k-NN: every dmmh backend side by side with raw faiss (CPU) or a ±1 matmul (CUDA).

    python benchmarks/bench_knn.py [--device cpu|cuda] [--db 200000] [--queries 2000] [--k 100]
                                   [--bits 64 128] [--repeats 5] [--slow-repeats 3] [--big-db 1000000]
                                   [--big-queries N] [--out DIR]

CPU: raw ``faiss.IndexBinaryFlat`` (add + search, and search on a built index) against
``hamming_knn`` per backend and ``HammingIndex.search``; the ratio column is dmmh time / raw faiss time
(functional calls against add + search, the index against search only). Then a ``--big-db`` database
through ``HammingIndex``: add, search, save, load. CUDA: ``hamming_knn`` (torch backend, exact
(distance, index) order) against a plain ±1 bf16 matmul + topk (ties unordered) on ``--big-db`` x
``--big-queries`` (default 10k). Every timed path is checked to return the same neighbours (CPU) or the
same distances (CUDA). Times are medians of interleaved repeats after one warm-up; the slow numpy and
torch CPU paths use ``--slow-repeats``. Writes ``<out>/knn_<device>.txt``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from _report import Report, median_times, timed

from dmmh._optional import require
from dmmh.hashing import HammingIndex, hamming_knn, unpack_bits


def codes(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)


def raw_faiss(faiss, db: np.ndarray):
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(db)
    return index


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def cpu_tables(args, rep: Report) -> None:
    faiss = require("faiss", "bench_knn.py on CPU")
    rng = np.random.default_rng(0)
    rep(f"## {args.db:,} database x {args.queries:,} queries, k={args.k}; ratio = time / raw faiss time")
    rep(f"{'bits':>4}  {'path':<34} {'time (s)':>9} {'ratio':>7}")
    for bits in args.bits:
        db, q = codes(rng, args.db, bits), codes(rng, args.queries, bits)
        built = raw_faiss(faiss, db)
        index = HammingIndex(bits).add(torch.from_numpy(db))
        index.search(torch.from_numpy(q[:1]), 1)  # builds the index's faiss copy outside the timing
        fast = {
            "raw faiss add+search": lambda: raw_faiss(faiss, db).search(q, args.k),
            "dmmh hamming_knn (faiss)": lambda: hamming_knn(q, db, args.k, backend="faiss"),
            "raw faiss search (built)": lambda: built.search(q, args.k),
            "dmmh HammingIndex.search (faiss)": lambda: index.search(q, args.k),
        }
        slow = {
            "dmmh hamming_knn (numpy)": lambda: hamming_knn(q, db, args.k, backend="numpy"),
            "dmmh hamming_knn (torch)": lambda: hamming_knn(q, db, args.k, backend="torch"),
        }
        ref = built.search(q, args.k)
        for name, fn in {**fast, **slow}.items():
            if not same(fn(), ref):
                raise SystemExit(f"{name}: results differ from raw faiss at {bits} bits")
        times = median_times(fast, args.repeats, "cpu") | median_times(slow, args.slow_repeats, "cpu", warmup=0)
        for name, t in times.items():
            base = times["raw faiss search (built)" if "built" in name or "Index" in name else "raw faiss add+search"]
            rep(f"{bits:>4}  {name:<34} {t:9.3f} {t / base:6.2f}x")
    rep("# all paths returned the same ids and distances as raw faiss")


def big_cpu(args, rep: Report) -> None:
    faiss = require("faiss", "bench_knn.py on CPU")
    rng = np.random.default_rng(1)
    n_q, bits = args.big_queries or 1000, 64
    db, q = codes(rng, args.big_db, bits), codes(rng, n_q, bits)
    rep(f"## {args.big_db:,}-code database ({bits} bits), {n_q:,} queries, k={args.k}")
    t_add, index = timed(lambda: HammingIndex(bits).add(torch.from_numpy(db)), "cpu")
    index.search(torch.from_numpy(q[:1]), 1)
    built = raw_faiss(faiss, db)
    times = median_times(
        {"raw faiss search (built)": lambda: built.search(q, args.k), "dmmh HammingIndex.search": lambda: index.search(q, args.k)},
        args.repeats,
        "cpu",
    )
    if not same(index.search(q, args.k), built.search(q, args.k)):
        raise SystemExit("HammingIndex results differ from raw faiss on the big database")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.dmmh")
        t_save = timed(lambda: index.save(path), "cpu")[0]
        size = os.path.getsize(path)
        t_load, loaded = timed(lambda: HammingIndex.load(path), "cpu")
    if not same(loaded.search(q[:50], args.k), index.search(q[:50], args.k)):
        raise SystemExit("loaded index searches differently")
    base = times["raw faiss search (built)"]
    for name, t in times.items():
        rep(f"  {name:<34} {t:9.3f} s {t / base:6.2f}x")
    rep(f"  HammingIndex.add {t_add:.3f} s; save {t_save:.3f} s, load {t_load:.3f} s, file {size / 1e6:.1f} MB")


def cuda_tables(args, rep: Report) -> None:
    n_q = args.big_queries or 10_000
    rng = np.random.default_rng(2)
    rep(f"## {args.big_db:,} database x {n_q:,} queries, k={args.k}, on GPU")
    rep(f"{'bits':>4}  {'path':<40} {'time (ms)':>10} {'vs matmul':>10}")
    for bits in args.bits:
        db = torch.from_numpy(codes(rng, args.big_db, bits)).cuda()
        q = torch.from_numpy(codes(rng, n_q, bits)).cuda()
        qs, ds = unpack_bits(q, dtype=torch.bfloat16), unpack_bits(db, dtype=torch.bfloat16)

        def matmul_topk():
            return torch.topk(qs @ ds.T, args.k, dim=1).values

        paths = {"baseline: ±1 bf16 matmul + topk": matmul_topk, "dmmh hamming_knn (torch, exact order)": lambda: hamming_knn(q, db, args.k)}
        d, _ = hamming_knn(q, db, args.k)
        if not torch.equal(d.to(torch.float32), ((bits - matmul_topk().float()) / 2)):
            raise SystemExit(f"GPU distances differ from the matmul baseline at {bits} bits")
        times = median_times(paths, args.repeats, "cuda")
        base = times["baseline: ±1 bf16 matmul + topk"]
        for name, t in times.items():
            rep(f"{bits:>4}  {name:<40} {t * 1e3:10.1f} {base / t:9.2f}x")
        del qs, ds, db, q
        torch.cuda.empty_cache()
    rep("# dmmh's distances equal the baseline's; its ids follow (distance, index) order, the baseline's ties do not")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--db", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slow-repeats", type=int, default=3)
    p.add_argument("--big-db", type=int, default=1_000_000)
    p.add_argument("--big-queries", type=int, default=None, help="default 1000 on CPU, 10000 on CUDA")
    p.add_argument("--out", default=None, help="folder for knn_<device>.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    rep = Report("knn", args.device, args.out, f"exact Hamming k-NN; medians of {args.repeats} (numpy/torch CPU paths: {args.slow_repeats})")
    if args.device == "cpu":
        rep(f"# faiss {require('faiss', 'bench_knn.py').__version__}, {torch.get_num_threads()} torch threads")
        cpu_tables(args, rep)
        big_cpu(args, rep)
    else:
        cuda_tables(args, rep)
    rep.save()


if __name__ == "__main__":
    main()

"""Exact Hamming k-NN at scale: faiss ``IndexBinaryFlat`` (a linear scan) vs multi-index hashing.

    python benchmarks/bench_search.py [--sizes 1000000 10000000] [--bits 64 128] [--k 1 10 100]
                                      [--queries 1000] [--classes 1000] [--flip 0.05] [--threads 1]
                                      [--repeats 1] [--kinds uniform clustered] [--out DIR]

Codes: (a) ``uniform``: every bit a fair coin, the worst case for multi-index hashing (the nearest
neighbours are far: about 15 bits at 10 M x 64 bits); (b) ``clustered``: ``--classes`` centres drawn
uniformly, each item (database and query alike) a random class's centre with every bit flipped
independently with probability ``--flip``. A trained model's codes are tighter than this default:
the demo's 64-bit DMMH model (``make demo``, UCI digits) puts database codes at a 0.6 % and query
codes at a 1.3 % flip rate from their class's majority code, so 5 % is the harder setting.

Per size x bits x kind: build times, memory of each index, then per k the time per query of raw faiss
search (built), of :class:`~dmmh.hashing.MultiIndex` (tables built), and of
``HammingIndex(backend="auto")`` (tables built: auto then picks mih only where its uniform-codes cost
model predicts >= 1.5x), each ratio to faiss in the same run (ratio > 1: faster than faiss), and the
backend auto picked. Every result is checked equal to faiss' (ids and distances). faiss and the
multi-index run on ``--threads`` threads (default 1: on a shared machine OpenMP's 2-thread faiss is
erratic). Writes ``<out>/search_cpu.txt``.
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from _report import Report, median_times, timed

from dmmh._optional import require
from dmmh.hashing import HammingIndex
from dmmh.hashing.multi_index import BUILD_COST, predicted_work, substring_count


def uniform(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray, flip: float, block: int = 1 << 20) -> np.ndarray:
    """Items of random classes: the class centre with each bit flipped with probability ``flip``."""
    out = np.empty((n, centres.shape[1]), np.uint8)
    for s in range(0, n, block):
        m = min(block, n - s)
        noise = np.packbits(rng.random((m, centres.shape[1] * 8)) < flip, axis=1, bitorder="little")
        out[s : s + m] = centres[rng.integers(0, len(centres), m)] ^ noise
    return out


def data(kind: str, rng, n: int, n_q: int, bits: int, classes: int, flip: float):
    if kind == "uniform":
        return uniform(rng, n, bits), uniform(rng, n_q, bits)
    centres = uniform(rng, classes, bits)
    return clustered(rng, n, centres, flip), clustered(rng, n_q, centres, flip)


def same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


def run(args, rep: Report, faiss) -> None:
    rep(f"{'N':>10} {'bits':>4} {'codes':<9} {'k':>4} {'faiss ms/q':>10} {'mih ms/q':>9} {'mih x':>6} "
        f"{'auto ms/q':>9} {'auto x':>6} {'auto':>5} {'kth dist':>8}")
    notes = []
    for n in args.sizes:
        for bits in args.bits:
            for kind in args.kinds:
                rng = np.random.default_rng([n, bits, len(kind)])
                db, q = data(kind, rng, n, args.queries, bits, args.classes, args.flip)
                t_flat, flat = timed(lambda: _flat(faiss, db), "cpu")
                index = HammingIndex(bits).add(torch.from_numpy(db))
                t_mih, mih = timed(index.multi_index, "cpu")
                index._faiss_index()  # its own faiss copy, for when auto scans
                label = "uniform" if kind == "uniform" else f"clust{args.flip:g}"
                notes.append(f"{n:>10,} {bits:>4} {label:<9}: faiss add {t_flat:.1f} s, {db.nbytes / 2**20:.0f} MiB; "
                             f"multi-index build {t_mih:.1f} s, m={mih.m}, {(mih.nbytes + db.nbytes) / 2**20:.0f} MiB "
                             f"(tables + codes); auto: {_payback(n, bits, 10)} at k=10")
                for k in args.k:
                    ref, got, auto = flat.search(q, k), mih.knn(q, k), index.search(q, k)
                    if not (same(got, ref) and same(auto, ref)):
                        raise SystemExit(f"results differ from faiss: N={n} bits={bits} {kind} k={k}")
                    times = median_times({"faiss": lambda: flat.search(q, k), "mih": lambda: mih.knn(q, k),
                                          "auto": lambda: index.search(q, k)}, args.repeats, "cpu", warmup=0)
                    t_f, t_m, t_a = times["faiss"], times["mih"], times["auto"]
                    pick = index._backend(len(q), k=k)
                    per = lambda t: t / len(q) * 1e3  # noqa: E731
                    rep(f"{n:>10,} {bits:>4} {label:<9} {k:>4} {per(t_f):10.3f} {per(t_m):9.3f} {t_f / t_m:6.2f} "
                        f"{per(t_a):9.3f} {t_f / t_a:6.2f} {pick:>5} {int(np.median(ref[0][:, -1])):>8}")
                del db, q, flat, index, mih
    rep("# every multi-index and auto result equals faiss' (ids and distances, ties included)")
    rep("# x = faiss time / that time (> 1: faster than faiss); kth dist = median distance of the k-th neighbour")
    for line in notes:
        rep(f"# {line}")


def _flat(faiss, db: np.ndarray):
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(db)
    return index


def _payback(n: int, bits: int, k: int) -> str:
    """When auto builds the multi-index: after the queries whose predicted savings pay for the build."""
    saving = n - predicted_work(n, bits, k=k)
    if saving < n / 3:
        return "never builds it (predicted gain < 1.5x on uniform codes)"
    return f"builds it after ~{math.ceil(BUILD_COST * substring_count(bits, n) * n / saving):,} queries"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--bits", type=int, nargs="+", default=[64, 128])
    p.add_argument("--kinds", nargs="+", choices=("uniform", "clustered"), default=["uniform", "clustered"])
    p.add_argument("--k", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--flip", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="timings per path (median; interleaved)")
    p.add_argument("--out", default=None, help="folder for search_cpu.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    faiss = require("faiss", "bench_search.py")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rep = Report("search", "cpu", args.out, "exact Hamming k-NN: faiss IndexBinaryFlat vs multi-index hashing (mih)")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rep(f"# faiss {faiss.__version__}; {args.threads} thread(s) each; {args.queries:,} queries; median of {args.repeats} "
        f"timing(s) after a checked run; load average {load:.1f} at start (2 cores: > 2 means a shared, busy machine)")
    rep(f"# clustered: {args.classes:,} classes, bit-flip probability {args.flip:g} around each class centre")
    run(args, rep, faiss)
    rep(f"# load average {os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan'):.1f} at the end")
    rep.save()


if __name__ == "__main__":
    main()

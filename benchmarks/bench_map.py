"""mAP@all at NUS-WIDE scale: dmmh's counting-sort pass vs a per-query stable-argsort loop.

The baseline is the loop of the common Python ports (DeepHash ``CalcMap``) with a *stable* argsort
so that both follow DESIGN.md §3 and must give the same number. Random ±1 codes; 21 classes with
Zipf-like frequencies (about 2 labels per item, at least one), like NUS-WIDE's 21 concepts.

    python benchmarks/bench_map.py [--device cpu|cuda] [--baseline-queries 2085]

``--baseline-queries n`` times the baseline on the first n queries only and extrapolates its time
linearly (marked in the table); the mAP comparison then uses those n queries.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time

import numpy as np
import torch

from dmmh.metrics.functional import mean_average_precision


def nuswide_like(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    p = 0.45 / np.arange(1, classes + 1) ** 0.9
    y = (rng.random((n, classes)) < p).astype(np.float32)
    none = y.sum(1) == 0
    y[none, rng.integers(0, classes, int(none.sum()))] = 1
    return y


def baseline_map(qb: np.ndarray, db: np.ndarray, ql: np.ndarray, dl: np.ndarray) -> float:
    """Per-query loop: label product, Hamming by matvec, stable argsort, AP (empty query → 0)."""
    n_bits, aps = qb.shape[1], []
    for i in range(len(qb)):
        gnd = (dl @ ql[i] > 0).astype(np.float64)
        tsum = int(gnd.sum())
        if tsum == 0:
            aps.append(0.0)
            continue
        hamm = 0.5 * (n_bits - db @ qb[i])
        gnd = gnd[np.argsort(hamm, kind="stable")]
        tindex = np.flatnonzero(gnd) + 1.0
        aps.append(float(np.mean(np.arange(1, tsum + 1) / tindex)))
    return float(np.mean(aps))


def baseline_map_torch(qb: torch.Tensor, db: torch.Tensor, ql: torch.Tensor, dl: torch.Tensor) -> float:
    """The same loop in torch (for CUDA)."""
    n_bits, aps = qb.shape[1], []
    for i in range(len(qb)):
        gnd = (dl @ ql[i] > 0).double()
        tsum = int(gnd.sum())
        if tsum == 0:
            aps.append(0.0)
            continue
        hamm = 0.5 * (n_bits - db @ qb[i])
        gnd = gnd[torch.sort(hamm, stable=True).indices]
        tindex = torch.nonzero(gnd).squeeze(1).double() + 1
        aps.append(float((torch.arange(1, tsum + 1, device=db.device) / tindex).mean()))
    return float(np.mean(aps))


def timed(fn, *args, sync=lambda: None):
    sync()
    t = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--queries", type=int, default=2085)
    ap.add_argument("--database", type=int, default=193749)
    ap.add_argument("--bits", type=int, nargs="+", default=[128])
    ap.add_argument("--classes", type=int, default=21)
    ap.add_argument("--baseline-queries", type=int, default=None, help="time the baseline on this many queries")
    ap.add_argument("--repeats", type=int, default=3, help="timings of the fast path (median)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(a.seed)
    ql, dl = nuswide_like(a.queries, a.classes, rng), nuswide_like(a.database, a.classes, rng)
    nb = a.queries if a.baseline_queries is None else min(a.baseline_queries, a.queries)
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), platform.processor())
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{os.cpu_count()}-core CPU, {model} ({torch.get_num_threads()} torch threads)"
    print(f"# mAP@all, {a.queries} queries x {a.database} database, {a.classes} classes "
          f"({dl.sum(1).mean():.2f} labels/item); {machine}; torch {torch.__version__}, numpy {np.__version__}")
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; baseline on {nb} queries" + (" (time extrapolated)" if nb < a.queries else ""))
    print(f"{'bits':>5} {'baseline s':>11} {'dmmh s':>8} {'speed-up':>9} {'mAP baseline':>14} {'mAP dmmh':>14} {'|diff|':>9}")
    for bits in a.bits:
        qb = rng.choice(np.float32([-1, 1]), (a.queries, bits))
        db = rng.choice(np.float32([-1, 1]), (a.database, bits))
        t = lambda x: torch.from_numpy(x).to(dev)  # noqa: E731
        args = (t(qb), t(db), t(ql), t(dl))
        times = []
        for _ in range(a.repeats):
            fast, dt = timed(mean_average_precision, *args, sync=sync)
            times.append(dt)
        fast_sub = fast if nb == a.queries else mean_average_precision(args[0][:nb], *args[1:2], args[2][:nb], args[3])
        if dev.type == "cuda":
            base, tb = timed(baseline_map_torch, args[0][:nb], args[1], args[2][:nb], args[3], sync=sync)
        else:
            base, tb = timed(baseline_map, qb[:nb], db, ql[:nb], dl)
        tb *= a.queries / nb
        tf = float(np.median(times))
        print(f"{bits:>5} {tb:>11.2f} {tf:>8.2f} {tb / tf:>8.1f}x {base:>14.12f} {fast_sub:>14.12f} {abs(base - fast_sub):>9.1e}")


if __name__ == "__main__":
    main()

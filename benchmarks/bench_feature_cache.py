"""Loading a compressed MATLAB v7.3 feature file: through the verified ``.npy`` cache (a hit:
source fingerprint, SHA-256 of the copy, memory map) vs decompressing the source, as every run did
before the cache was looked up first (issue #15 item 12).

Both paths run the same ``MIRFlickr25K(...).splits`` (read, validate, serve) in this process; the
value scan runs on the source, and on a hit is replaced by the digest check. Peak traced memory
(numpy allocations) is reported too.

    python benchmarks/bench_feature_cache.py [--rows 20000] [--dim 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import h5py
import numpy as np
from _report import Report, median_times

from dmmh.data import MIRFlickr25K


def write_compressed_mat73(path: Path, rows: int, dim: int, rng: np.random.Generator) -> Path:
    """MIR-like splits (5 % train, 5 % query, the rest database), ReLU-like float32 features,
    gzip-compressed and chunked as MATLAB's ``save -v7.3`` writes them (stored column-major)."""
    sizes = {"tr": rows // 20, "te": rows // 20, "db": rows - rows // 10}
    with h5py.File(path, "w", userblock_size=512) as f:
        for split, n in sizes.items():
            parts = {
                "I": np.maximum(rng.standard_normal((n, dim), dtype=np.float32), 0),
                "T": rng.integers(0, 2, (n, 1386)).astype(np.float64),
                "L": (rng.random((n, 24)) < 0.1).astype(np.float64),
            }
            for key, a in parts.items():
                f.create_dataset(f"{key}_{split}", data=a.T, chunks=True, compression="gzip", compression_opts=1)
    return path


def load(path: Path, cache_dir: Path | None) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # split sizes unlike the published ones
        splits = MIRFlickr25K(root=str(path), cache_dir=None if cache_dir is None else str(cache_dir)).splits
    return len(splits["database"])


def peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_compressed_mat73(Path(tmp) / "mir_cnn_twt.mat", a.rows, a.dim, np.random.default_rng(0))
        cache = Path(tmp) / "cache"
        load(path, cache)  # the miss that writes the copy
        report = Report("feature_cache", "cpu", a.out, "compressed MATLAB v7.3 load: cache hit vs decompressing the source")
        report(f"# {a.rows} rows, image {a.dim}-D float32 + text 1386-D + labels 24 float64; "
               f"file {path.stat().st_size / 2**20:.0f} MiB (gzip level 1), median of {a.repeats}")
        times = median_times({"source": lambda: load(path, None), "cache hit": lambda: load(path, cache)}, a.repeats, "cpu", warmup=0)
        peaks = {"source": peak_bytes(lambda: load(path, None)), "cache hit": peak_bytes(lambda: load(path, cache))}
        report(f"{'path':<10} | {'seconds':>8} | {'peak traced MiB':>15}")
        for name in times:
            report(f"{name:<10} | {times[name]:8.2f} | {peaks[name] / 2**20:15.1f}")
        report(f"cache hit is {times['source'] / times['cache hit']:.1f}x faster, "
               f"{peaks['source'] / max(peaks['cache hit'], 1):.0f}x less traced memory")
        report.save()


if __name__ == "__main__":
    main()

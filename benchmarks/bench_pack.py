"""Sign + pack throughput: dmmh's ``pack_bits`` per backend against its baseline, same process.

    python benchmarks/bench_pack.py [--device cpu|cuda] [--rows N] [--bits K] [--repeats R] [--out DIR]

CPU: ``pack_bits`` (auto = numpy path; bf16 compared in torch first), the torch path (one int64
multiply per 8 bits) and the plain reference ``pack_bits_ref`` against raw
``np.packbits(x >= 0, bitorder="little")`` (bf16 input pre-converted to fp32 for numpy, untimed). CUDA: the fused Triton kernel against the torch eager
paths (``pack_bits_torch``, the baseline of the ratio column, and ``pack_bits_ref``), and its achieved bandwidth (bytes read + written / time) as a fraction of
a device-to-device copy measured in the same run. Times are medians of ``--repeats`` after a warm-up.
Writes ``<out>/pack_<device>.txt`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from _report import Report, median_times

from dmmh.hashing import pack_bits
from dmmh.hashing.packing import pack_bits_ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rows", type=int, default=None, help="codes to pack (default 1M on CPU, 8M on CUDA)")
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="default 5 on CPU, 10 on CUDA")
    p.add_argument("--out", default=None, help="folder for pack_<device>.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    n = args.rows or (8_000_000 if dev == "cuda" else 1_000_000)
    k, repeats = args.bits, args.repeats or (10 if dev == "cuda" else 5)
    rep = Report("pack", dev, args.out, f"sign+pack of {n:,} x {k} codes -> uint8 (N, {k // 8}); median of {repeats}")

    copy_bw = None
    if dev == "cuda":
        src = torch.randn(n, k, device=dev)
        dst = torch.empty_like(src)
        t = median_times({"copy": lambda: dst.copy_(src)}, repeats, dev)["copy"]
        copy_bw = 2 * src.numel() * 4 / t
        rep(f"# device-to-device copy of {src.numel() * 4 / 1e9:.2f} GB: {t * 1e3:.3f} ms, {copy_bw / 1e12:.3f} TB/s (read + write)")
        del src, dst
    base_name = "torch" if dev == "cuda" else "np.packbits"
    rep(f"{'dtype':<6} {'path':<10} {'time (ms)':>10} {'GB/s':>8} {'Mcodes/s':>9} {'vs ' + base_name:>16} {'% of copy':>10}")
    for label, dtype in DTYPES.items():
        if dev == "cpu" and dtype == torch.float16:
            continue  # CPU half math is emulated; fp32 and bf16 are the CPU-relevant inputs
        x = torch.randn(n, k, device=dev).to(dtype)
        if dev == "cuda":
            paths = {"triton": lambda: pack_bits(x, backend="triton"), "torch": lambda: pack_bits(x, backend="torch")}
        else:
            xn = x.float().numpy() if dtype == torch.bfloat16 else x.numpy()  # numpy has no bf16
            paths = {
                "dmmh auto": lambda: pack_bits(x),
                "torch": lambda: pack_bits(x, backend="torch"),
                base_name: lambda: np.packbits(xn >= 0, axis=1, bitorder="little"),
            }
        paths["torch ref"] = lambda: pack_bits_ref(x)
        ref = np.packbits((x.float() >= 0).cpu().numpy(), axis=1, bitorder="little")
        for name, fn in paths.items():
            out = fn()
            got = out.cpu().numpy() if isinstance(out, torch.Tensor) else out
            if not np.array_equal(got, ref):
                raise SystemExit(f"{name} ({label}) packed differently from np.packbits")
        times = median_times(paths, repeats, dev)
        moved = x.numel() * x.element_size() + n * k // 8
        for name, t in times.items():
            frac = f"{moved / t / copy_bw * 100:9.1f}%" if copy_bw and name == "triton" else f"{'':>10}"
            rep(f"{label:<6} {name:<10} {t * 1e3:10.2f} {moved / t / 1e9:8.2f} {n / t / 1e6:9.1f} {times[base_name] / t:15.2f}x {frac}")
        del x
    rep.save()


if __name__ == "__main__":
    main()

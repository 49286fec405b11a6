"""Selective scan time per backend, forward without gradients and forward + backward, and the ratio to the reference loop.

    python benchmarks/bench_selective_scan.py [--device cpu|cuda] [--repeats 3] [--shapes 256,256,64,16 ...] [--out DIR]

Every backend runs in this process on the same inputs (fp32, with z, D, delta_bias and softplus, as a
Mamba layer calls it: u, delta and z with contiguous channels, B and C views of one projection); each
time is the median of ``--repeats`` runs after ``--warmup`` runs. On the CPU every row is measured with
one thread and with torch's default thread count (they take turns); on CUDA the table adds mamba-ssm's
own ``selective_scan_fn`` and the ratio of dmmh's CUDA path to it. Writes
``<out>/selective_scan_<device>.txt`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from _report import Report

from dmmh.ops.selective_scan import selective_scan_fn

DEFAULT_SHAPES = ((256, 256, 64, 16), (1024, 256, 128, 16), (32, 1024, 512, 16))


def make_inputs(b: int, d: int, l: int, n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Inputs shaped, laid out and scaled as a freshly initialised Mamba layer produces them."""
    g = torch.Generator().manual_seed(seed)
    seq = lambda scale=1.0: (torch.randn(b, l, d, generator=g) * scale).to(device).transpose(1, 2)  # noqa: E731
    proj = torch.randn(b, l, 2 * n, generator=g).to(device)
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device)
    dt_bias = torch.log(torch.expm1(torch.empty(d).uniform_(1e-3, 1e-1, generator=g))).to(device)
    B, C = proj[..., :n].transpose(1, 2), proj[..., n:].transpose(1, 2)
    return [t.requires_grad_() if t.is_leaf else t for t in (seq(), seq(0.1), A, B, C, torch.ones(d, device=device), seq(), dt_bias)]


def timed(fn, inputs: list[torch.Tensor], grad: bool, device: str) -> float:
    for t in inputs:
        t.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if grad:
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
    else:
        with torch.no_grad():
            fn(*inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def medians(fns: dict, inputs: list[torch.Tensor], threads: tuple[int, ...], args, skip: set) -> dict:
    """Median seconds per (backend, threads, grad); thread counts take turns."""
    times: dict = {}
    for r in range(args.warmup + args.repeats):
        for th in threads:
            torch.set_num_threads(th)
            for name, fn in fns.items():
                for grad in (False, True):
                    if (name, grad) in skip:
                        continue
                    t = timed(fn, inputs, grad, args.device)
                    if r >= args.warmup:
                        times.setdefault((name, th, grad), []).append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def backends(device: str) -> dict[str, object]:
    def path(name):
        return lambda u, dl, A, B, C, D, z, bias: selective_scan_fn(u, dl, A, B, C, D, z, bias, True, backend=name)

    paths = {"ref (loop)": path("ref"), "torch (eager)": path("torch")}
    if device == "cpu":
        paths["cpu (C++)"] = path("cpu")
    if device == "cuda":
        paths["cuda (dmmh)"] = path("cuda")
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn
        except ImportError as exc:
            print(f"# mamba_ssm not importable ({exc}); no mamba-ssm row")
        else:
            paths["mamba_ssm kernel"] = lambda u, dl, A, B, C, D, z, bias: mamba_fn(u, dl, A, B, C, D, z, bias, True)
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--shapes", nargs="*", default=None, help="B,D,L,N tuples (default: the three of issue 3)")
    p.add_argument("--skip-ref-above", type=int, default=None, help="skip the reference loop when B*D*L*N exceeds this")
    p.add_argument("--out", default=None, help="folder for selective_scan_<device>.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    default = torch.get_num_threads()
    threads = (1, default) if args.device == "cpu" and default > 1 else (default,)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    rep = Report("selective_scan", args.device, args.out,
                 f"selective scan, fp32, z/D/delta_bias/softplus on; median of {args.repeats} after {args.warmup} warm-up")
    if hasattr(os, "getloadavg"):
        rep(f"# load average at start: {os.getloadavg()[0]:.1f} (other processes share the machine)")
    rep(f"{'B':>5} {'D':>5} {'L':>4} {'N':>3}  {'backend':<17} {'threads':>7} {'fwd ms':>9} {'vs ref':>8} {'fwd+bwd ms':>11} {'vs ref':>8} {'vs mamba':>9}")
    for b, d, l, n in shapes:
        inputs = make_inputs(b, d, l, n, args.device)
        fns = backends(args.device)
        big = args.skip_ref_above and b * d * l * n > args.skip_ref_above
        times = medians(fns, inputs, threads, args, {("ref (loop)", g) for g in (False, True)} if big else set())
        for name in fns:
            for th in threads:
                cells = []
                for grad in (False, True):
                    t, ref = times.get((name, th, grad)), times.get(("ref (loop)", th, grad))
                    cells += [f"{t * 1e3:9.1f}" if t else f"{'-':>9}", f"{ref / t:7.1f}x" if t and ref else f"{'n/a':>8}"]
                mamba = times.get(("mamba_ssm kernel", th, True))
                fb = times.get((name, th, True))
                vs_mamba = f"{fb / mamba:8.2f}x" if mamba and fb else f"{'n/a':>9}"
                rep(f"{b:>5} {d:>5} {l:>4} {n:>3}  {name:<17} {th:>7} {cells[0]} {cells[1]} {cells[2]:>11} {cells[3]} {vs_mamba}")
    torch.set_num_threads(default)
    rep.save()


if __name__ == "__main__":
    main()

"""Selective scan fwd+bwd time per backend, and the ratio to the reference loop.

    python benchmarks/bench_selective_scan.py [--device cpu|cuda] [--repeats 3] [--shapes 256,256,64,16 ...]

Every backend runs in this process on the same inputs (fp32, with z, D, delta_bias and softplus, as
a Mamba layer calls it); each time is the median of ``--repeats`` runs after ``--warmup`` runs. On CUDA the
table adds mamba-ssm's own ``selective_scan_fn`` and the ratio of dmmh's CUDA path to it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import torch

from dmmh.ops.selective_scan import selective_scan_fn

DEFAULT_SHAPES = ((256, 256, 64, 16), (1024, 256, 128, 16), (32, 1024, 512, 16))


def make_inputs(b: int, d: int, l: int, n: int, device: str, seed: int = 0) -> list[torch.Tensor]:
    """Inputs shaped and scaled as a freshly initialised Mamba layer produces them."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)  # noqa: E731
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1).to(device)
    dt_bias = torch.log(torch.expm1(torch.empty(d).uniform_(1e-3, 1e-1, generator=g))).to(device)
    return [t.requires_grad_() for t in (r(b, d, l), r(b, d, l, scale=0.1), A, r(b, n, l), r(b, n, l), torch.ones(d, device=device), r(b, d, l), dt_bias)]


def time_fwd_bwd(fn, inputs: list[torch.Tensor], repeats: int, device: str, warmup: int = 1) -> float:
    def once() -> float:
        for t in inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*inputs)
        out.backward(torch.ones_like(out))
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):  # allocator, lazy imports, kernels
        once()
    return statistics.median(once() for _ in range(repeats))


def backends(device: str) -> dict[str, object]:
    def path(name):
        return lambda u, dl, A, B, C, D, z, bias: selective_scan_fn(u, dl, A, B, C, D, z, bias, True, backend=name)

    paths = {"ref (loop)": path("ref"), "cpu (fast)": path("cpu")}
    if device == "cuda":
        paths["cuda (dmmh)"] = path("cuda")
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn
        except ImportError as exc:
            print(f"# mamba_ssm not importable ({exc}); no mamba-ssm row")
        else:
            paths["mamba_ssm kernel"] = lambda u, dl, A, B, C, D, z, bias: mamba_fn(u, dl, A, B, C, D, z, bias, True)
    return paths


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next(l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if l.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()}-core CPU, {model}, {torch.get_num_threads()} torch threads"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--shapes", nargs="*", default=None, help="B,D,L,N tuples (default: the three of issue 3)")
    p.add_argument("--skip-ref-above", type=int, default=None, help="skip the reference loop when B*D*L*N exceeds this")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES
    print(f"# selective scan fwd+bwd, fp32, z/D/delta_bias/softplus on; median of {args.repeats} after {args.warmup} warm-up")
    print(f"# {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; {machine(args.device)}; torch {torch.__version__}")
    if hasattr(os, "getloadavg"):
        print(f"# load average at start: {os.getloadavg()[0]:.1f} (other processes share the machine)")
    print(f"{'B':>5} {'D':>5} {'L':>4} {'N':>3}  {'backend':<17} {'time (ms)':>10} {'vs ref':>8} {'vs mamba':>12}")
    for b, d, l, n in shapes:
        inputs = make_inputs(b, d, l, n, args.device)
        times: dict[str, float] = {}
        for name, fn in backends(args.device).items():
            if name.startswith("ref") and args.skip_ref_above and b * d * l * n > args.skip_ref_above:
                continue
            times[name] = time_fwd_bwd(fn, inputs, args.repeats, args.device, args.warmup)
        ref, mamba = times.get("ref (loop)"), times.get("mamba_ssm kernel")
        for name, t in times.items():
            vs_ref = f"{ref / t:7.2f}x" if ref else "    n/a"
            vs_mamba = f"{t / mamba:11.2f}x" if mamba else "        n/a"
            print(f"{b:>5} {d:>5} {l:>4} {n:>3}  {name:<17} {t * 1e3:10.1f} {vs_ref:>8} {vs_mamba:>12}", flush=True)


if __name__ == "__main__":
    main()

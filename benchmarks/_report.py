"""Shared by bench_pack.py and bench_knn.py: timing, machine line, and the result file."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from dmmh._io import atomic_write

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (StopIteration, OSError):
        model = platform.processor() or "unknown CPU"
    return f"{os.cpu_count()}-core CPU, {model}"


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Seconds for one call (synchronising CUDA), and its result."""
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def median_times(fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds per function; repeats are interleaved so load drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            timed(fn, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn, device)[0])
    return {name: statistics.median(t) for name, t in times.items()}


class Report:
    """Print lines as they come and write them all to ``<out>/<name>_<device>.txt`` (atomically) at the end."""

    def __init__(self, name: str, device: str, out: str | os.PathLike | None, title: str):
        self.path = Path(out or RESULTS) / f"{name}_{device}.txt"
        self.lines: list[str] = []
        now = datetime.datetime.now().astimezone()
        self(f"# {title}")
        self(f"# {now:%Y-%m-%d %H:%M %Z}; {machine(device)}; torch {torch.__version__}")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> Path:
        atomic_write(self.path, ("\n".join(self.lines) + "\n").encode())
        print(f"# written to {self.path}")
        return self.path

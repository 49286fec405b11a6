"""Build (once per machine and source version, cached on disk) and load dmmh's C++ CPU kernels.

The source is ``mamba_cpu.cpp`` beside this file (the selective scan and the causal convolution of the
Mamba layer). Torch's own extension builder (``torch.utils.cpp_extension``: ninja and a C++ compiler,
as for ``torch.compile``) compiles it into ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``) under a name that hashes the source, the flags, the torch version and
the CPU, so a changed source or another machine builds afresh and a cached build loads in milliseconds. The operators ``torch.ops.dmmh.selective_scan_fwd``,
``selective_scan_bwd``, ``causal_conv1d_fwd`` and ``causal_conv1d_bwd`` are defined here, at import (with
what ``FlopCounterMode`` counts for them); the library registers their CPU implementations. The first
build takes about a minute; :func:`load` raises :class:`KernelUnavailable` with the compiler's message
when it fails.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["KernelUnavailable", "load", "available", "channels_last", "compute_dtype", "needs_grad", "SOURCE"]

SOURCE = Path(__file__).with_name("mamba_cpu.cpp")
log = logging.getLogger(__name__)


class KernelUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded on this machine."""


def _flags() -> list[str]:
    """Compiler flags: optimised for this CPU, then those of ``$DMMH_CPU_KERNEL_FLAGS`` (space-separated; e.g.
    ``-march=x86-64-v3`` for a build that runs on other CPUs, ``-mno-avx512f`` for the portable lane loops
    instead of the AVX-512 ones)."""
    flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for's threads (torch's own libgomp is already loaded)
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=native", "-mprefer-vector-width=512"]
    elif platform.machine().lower() in ("aarch64", "arm64"):
        flags += ["-mcpu=native"]
    return flags + os.environ.get("DMMH_CPU_KERNEL_FLAGS", "").split()


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in keep}))


def _name(flags: list[str]) -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(), _cpu_identity().encode()):
        digest.update(part)
    return f"dmmh_cpu_{digest.hexdigest()[:16]}"


def load():
    """``torch.ops.dmmh`` (building the kernels first if needed), or :class:`KernelUnavailable`."""
    ops, error = _load()
    if error is not None:
        raise error
    return ops


@functools.lru_cache(maxsize=1)
def _load():
    """Tried once per process: ``(ops, None)`` or ``(None, KernelUnavailable)``."""
    try:
        from filelock import FileLock

        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" notices
        from torch.utils import cpp_extension

        _ninja_on_path()
        flags = _flags()
        name = _name(flags)
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
        build = root / name
        build.mkdir(parents=True, exist_ok=True)
        library = build / f"{name}.so"
        # dmmh's processes build one at a time under their own OS lock (released when its holder dies).
        # Torch's builder takes "lock" in the same folder: before torch 2.13 a file whose mere existence
        # blocks (FileBaton), so a build killed midway, or another lock on that path, would make every
        # later build wait forever. While this lock is held no dmmh build runs: such a file is stale.
        with FileLock(str(build / "dmmh-build.lock")):
            if library.exists():
                try:
                    torch.ops.load_library(str(library))
                    return torch.ops.dmmh, None
                except OSError:  # not a library: a build killed while linking; built again
                    library.unlink()
            (build / "lock").unlink(missing_ok=True)
            log.warning("building dmmh's C++ kernels in %s (once per machine; about a minute)", build)
            cpp_extension.load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                               build_directory=str(build), is_python_module=False)
        return torch.ops.dmmh, None
    except Exception as exc:  # noqa: BLE001 - any failure (no compiler, no ninja, bad flags) means "not available"
        error = KernelUnavailable(f"dmmh's C++ kernels are unavailable: {type(exc).__name__}: {str(exc)[-2000:]}")
        error.__cause__ = exc
        return None, error


def _ninja_on_path() -> None:
    """Torch's builder runs ``ninja`` from ``PATH``; when ``PATH`` has none (a virtual environment that is not
    activated), the ``ninja`` package's own binary is put first on this process's ``PATH``."""
    import shutil

    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# Outputs that were not asked for (the last state, saved states, gradients of absent inputs) are empty
# tensors: undefined ones would not pass through Python dispatch modes such as FlopCounterMode.
SCHEMAS = {
    "selective_scan_fwd": "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
                          "Tensor? delta_bias, bool softplus, bool last, bool ckpt, Tensor? delta_proj=None) -> Tensor[]",
    "selective_scan_bwd": "(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
                          "Tensor? delta_bias, bool softplus, Tensor dout, Tensor? dlast, Tensor? ckpt) -> Tensor[]",
    "causal_conv1d_fwd": "(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor",
    "causal_conv1d_bwd": "(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dout) -> Tensor[]",
}
_LIBRARY = torch.library.Library("dmmh", "DEF")
for _op, _schema in SCHEMAS.items():
    _LIBRARY.define(_op + _schema)


def _scan_flops(factor: int):
    return lambda u, delta, A, *rest, out_shape=None, **kw: factor * u[0] * u[1] * u[2] * A[1]


def _scan_fwd_flops(u, delta, A, B, C, D, z, delta_bias, softplus, last, ckpt, delta_proj=None, out_shape=None, **kw):
    """The forward's contraction with C, plus the matrix product of a fused low-rank delta (``delta_proj``)."""
    return 2 * u[0] * u[1] * u[2] * (A[1] + (delta_proj[1] if delta_proj is not None else 0))


def _conv_flops(factor: int):
    return lambda x, weight, *rest, out_shape=None, **kw: factor * x[0] * x[1] * x[2] * weight[1]


# FlopCounterMode counts for the kernels what it counted for the matrix products of the pure-PyTorch paths
# they replace: the scan's contraction with C (2 b d l n) and three such products in its backward; the
# convolution's multiply-adds, twice in its backward.
for _op, _formula in (("selective_scan_fwd", _scan_fwd_flops), ("selective_scan_bwd", _scan_flops(6)),
                      ("causal_conv1d_fwd", _conv_flops(2)), ("causal_conv1d_bwd", _conv_flops(4))):
    register_flop_formula(getattr(torch.ops.dmmh, _op))(_formula)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether :func:`load` succeeds (tried once per process); warns once, with the reason, when it does not."""
    try:
        load()
    except KernelUnavailable as exc:
        warnings.warn(f"{exc}; falling back to the slower pure-PyTorch paths", RuntimeWarning, stacklevel=2)
        return False
    return True


def channels_last(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A ``(b, d, l)`` tensor in ``dtype`` with contiguous channels (stride 1 along ``d``), as the kernels
    take it; no copy when it already is (a transposed view of a ``(b, l, d)`` activation is)."""
    if t is None or (t.dtype == dtype and (t.stride(1) == 1 or t.shape[1] <= 1)):
        return t
    return torch.empty(t.shape[0], t.shape[2], t.shape[1], dtype=dtype, device=t.device).copy_(t.transpose(1, 2)).transpose(1, 2)


def needs_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd records an operation on ``tensors`` (grad mode on and one of them requires grad)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 when any input is float64, else float32 (half-precision inputs are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32

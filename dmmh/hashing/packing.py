"""Bit packing of binary codes (DESIGN.md §4).

Bit value: ``x >= 0 → 1``. Layout: uint8 ``(N, n_bits // 8)``, LSB-first within a byte (bit
``8i + j`` is ``1 << j`` of byte ``i``), faiss' binary layout, equal to
``np.packbits(x >= 0, axis=1, bitorder="little")``.

``n_bits`` must be a multiple of 8: other lengths raise a ``ValueError`` (no silent padding, as
faiss' binary indexes also require). Input follows dmmh's one rule for codes
(:func:`dmmh._checks.check_codes`): floats (±1 or relaxed) or bool bits; integer codes, floats that
are all 0/1, and NaN are refused with an error saying what to pass (``nan="zero"`` maps NaN to bit 0).

:func:`pack_bits` dispatches to a fused Triton kernel (one pass: read floats, write bytes) for CUDA
tensors when Triton is installed, to ``np.packbits`` for CPU tensors, and to the pure-PyTorch
:func:`pack_bits_torch` elsewhere; all give the same bytes as the plain reference :func:`pack_bits_ref`.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
from torch import Tensor

from dmmh._checks import check_codes
from dmmh._optional import available, require

__all__ = ["pack_bits", "unpack_bits", "pack_bits_ref", "unpack_bits_ref", "pack_bits_numpy", "pack_bits_torch", "pack_bits_triton"]

BACKENDS = ("auto", "numpy", "torch", "triton")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_bits_ref(x: Tensor, nan: str = "error") -> Tensor:
    """Pure-PyTorch packing of ``(N, K)`` codes (float or bool), ``K % 8 == 0``: the plain reference."""
    _check_codes(x, "pack_bits_ref", nan)
    bits = (x >= 0) if x.dtype != torch.bool else x
    bits = bits.reshape(x.shape[0], x.shape[1] // 8, 8).to(torch.uint8)
    return (bits * _WEIGHTS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_bits_ref(packed: Tensor, n_bits: int | None = None) -> Tensor:
    """Inverse of :func:`pack_bits_ref`: uint8 ``(N, K/8)`` → ±1 float32 codes ``(N, K)``."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack_bits: expected uint8 (N, n_bytes), got {packed.dtype} {tuple(packed.shape)}")
    if n_bits is not None and n_bits != packed.shape[1] * 8:
        raise ValueError(f"unpack_bits: {packed.shape[1]} bytes hold {packed.shape[1] * 8} bits, not {n_bits}")
    bits = (packed.unsqueeze(-1) & _WEIGHTS.to(packed.device)) != 0
    return bits.reshape(packed.shape[0], packed.shape[1] * 8).to(torch.float32) * 2 - 1


def _check_codes(x: Tensor, what: str, nan: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected codes of shape (N, n_bits), got {tuple(x.shape)}")
    if x.shape[1] % 8:
        raise ValueError(f"{what}: n_bits must be a multiple of 8, got {x.shape[1]} (shape {tuple(x.shape)})")
    check_codes(x, what, nan)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pack_bits(x: Tensor, backend: str = "auto", nan: str = "error") -> Tensor:
    """Pack ``(N, K)`` codes (float or bool; ``K % 8 == 0``) into uint8 ``(N, K / 8)``.

    ``backend``: ``"triton"`` (fused kernel; CUDA tensors of dtype fp32/fp16/bf16, or CPU tensors
    under ``TRITON_INTERPRET=1``), ``"torch"`` (:func:`pack_bits_torch`, any device), ``"numpy"``
    (:func:`pack_bits_numpy`, CPU), or ``"auto"``: numpy on CPU, Triton for CUDA float tensors when
    Triton is installed, else torch. All give the same bytes. ``nan``: ``"error"`` (default) or
    ``"zero"`` (NaN packs to bit 0).
    """
    if backend not in BACKENDS:
        raise ValueError(f"pack_bits: backend must be one of {BACKENDS}, got {backend!r}")
    _check_codes(x, "pack_bits", nan)
    if backend == "auto":
        return pack_unchecked(x)
    return {"numpy": _pack_numpy, "torch": _pack_torch, "triton": _pack_triton}[backend](x)


def pack_unchecked(x: Tensor) -> Tensor:
    """:func:`pack_bits` (``backend="auto"``) of codes the caller has already checked with ``check_codes``."""
    if x.device.type == "cpu":
        return _pack_numpy(x)
    return _pack_triton(x) if x.is_cuda and x.dtype in _TRITON_DTYPES and available("triton") else _pack_torch(x)


def pack_bits_numpy(x: Tensor, nan: str = "error") -> Tensor:
    """CPU packing with ``np.packbits`` (the fastest CPU path measured); returns a torch tensor."""
    _check_codes(x, "pack_bits_numpy", nan)
    return _pack_numpy(x)


def _pack_numpy(x: Tensor) -> Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"pack_bits(backend='numpy'): needs a CPU tensor, got one on {x.device}")
    x = x.detach()
    try:
        bits = x.numpy() >= 0 if x.dtype != torch.bool else x.numpy()
    except TypeError:  # dtypes numpy lacks (bfloat16): compare in torch
        bits = (x >= 0).numpy()
    return torch.from_numpy(np.packbits(bits, axis=1, bitorder="little"))


_MAGIC = 0x0102040810204080  # byte j of a little-endian int64 (0 or 1) lands on bit 56 + j of the product


def pack_bits_torch(x: Tensor, nan: str = "error") -> Tensor:
    """Pure-PyTorch packing, ~10x faster than :func:`pack_bits_ref`: every 8 bit-bytes are read as one
    int64 and gathered into a byte by one multiplication (no carries: each product bit gets one term)."""
    _check_codes(x, "pack_bits_torch", nan)
    return _pack_torch(x)


def _pack_torch(x: Tensor) -> Tensor:
    if sys.byteorder != "little":
        return pack_bits_ref(x, nan="zero")  # already checked
    bits = (x if x.dtype == torch.bool else x >= 0).contiguous()
    words = bits.view(torch.uint8).view(torch.int64)  # (N, K / 8)
    return ((words * _MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: Tensor, n_bits: int | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``(N, K/8)`` → codes ``(N, K)``: ±1 of ``dtype``, or the bits themselves if ``dtype=torch.bool``."""
    codes = unpack_bits_ref(packed, n_bits)
    return codes > 0 if dtype == torch.bool else codes.to(dtype)


def pack_bits_triton(x: Tensor, nan: str = "error") -> Tensor:
    """Fused sign + pack in one Triton kernel (same result as :func:`pack_bits_ref`)."""
    _check_codes(x, "pack_bits_triton", nan)
    return _pack_triton(x)


def _pack_triton(x: Tensor) -> Tensor:
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"pack_bits(backend='triton'): dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if not x.is_cuda and not _interpreting():
        raise ValueError("pack_bits(backend='triton'): needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)")
    triton = require("triton", "pack_bits(backend='triton')")
    n, k = x.shape
    out = torch.empty((n, k // 8), dtype=torch.uint8, device=x.device)
    if n == 0 or k == 0:
        return out
    block_b = min(triton.next_power_of_2(k // 8), 16)
    block_n = 4096 // (8 * block_b)  # 4096 inputs per program
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 8, block_b))
    _pack_kernel()[grid](x, out, n, k // 8, x.stride(0), x.stride(1), BLOCK_N=block_n, BLOCK_B=block_b)
    return out


_KERNEL = None


def _pack_kernel():
    """Build the Triton kernel on first use (so importing dmmh never imports Triton)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    triton = require("triton", "pack_bits(backend='triton')")
    tl = triton.language

    @triton.jit
    def pack_kernel(x_ptr, out_ptr, n_rows, n_bytes, stride_n, stride_k, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        byts = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        bits = tl.arange(0, 8)
        r3 = rows[:, None, None].to(tl.int64)
        b3 = byts[None, :, None]
        cols = (b3 * 8 + bits[None, None, :]).to(tl.int64)
        mask = (r3 < n_rows) & (b3 < n_bytes)
        x = tl.load(x_ptr + r3 * stride_n + cols * stride_k, mask=mask, other=-1.0)
        weights = (1 << bits).to(tl.int32)[None, None, :]
        packed = tl.sum(tl.where(x >= 0, weights, 0), axis=2)
        r2 = rows[:, None].to(tl.int64)
        b2 = byts[None, :]
        tl.store(out_ptr + r2 * n_bytes + b2, packed.to(tl.uint8), mask=(r2 < n_rows) & (b2 < n_bytes))

    _KERNEL = pack_kernel
    return _KERNEL

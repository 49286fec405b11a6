"""Bit packing of binary codes (DESIGN.md §4).

Bit value: ``x >= 0 → 1``. Layout: uint8 ``(N, n_bits // 8)``, LSB-first within a byte (bit
``8i + j`` is ``1 << j`` of byte ``i``), faiss' binary layout, equal to
``np.packbits(x >= 0, axis=1, bitorder="little")``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pack_bits_ref", "unpack_bits_ref"]

_WEIGHTS = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)


def pack_bits_ref(x: Tensor) -> Tensor:
    """Pure-PyTorch packing of ``(N, K)`` codes (any real dtype or bool), ``K % 8 == 0``."""
    if x.ndim != 2:
        raise ValueError(f"pack_bits: expected codes of shape (N, n_bits), got {tuple(x.shape)}")
    if x.shape[1] % 8:
        raise ValueError(f"pack_bits: n_bits must be a multiple of 8, got {x.shape[1]} (shape {tuple(x.shape)})")
    bits = (x >= 0) if x.dtype != torch.bool else x
    bits = bits.view(x.shape[0], -1, 8).to(torch.uint8)
    return (bits * _WEIGHTS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_bits_ref(packed: Tensor, n_bits: int | None = None) -> Tensor:
    """Inverse of :func:`pack_bits_ref`: uint8 ``(N, K/8)`` → ±1 float32 codes ``(N, K)``."""
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"unpack_bits: expected uint8 (N, n_bytes), got {packed.dtype} {tuple(packed.shape)}")
    if n_bits is not None and n_bits != packed.shape[1] * 8:
        raise ValueError(f"unpack_bits: {packed.shape[1]} bytes hold {packed.shape[1] * 8} bits, not {n_bits}")
    bits = (packed.unsqueeze(-1) & _WEIGHTS.to(packed.device)) != 0
    return bits.flatten(1).to(torch.float32) * 2 - 1

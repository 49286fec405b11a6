"""Hash heads: features → relaxed codes in training, ±1 codes at retrieval time.

Subclass :class:`HashHead` and register it to use your own head by name::

    @HASH_HEADS.register("scaled")
    class Scaled(HashHead):
        def relax(self, z):
            return torch.tanh(3 * z)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmmh.registry import HASH_HEADS

__all__ = ["HashHead", "TanhHead", "StraightThroughHead", "ScaledTanhHead", "binarize"]


def binarize(x: Tensor) -> Tensor:
    """±1 codes with ``x >= 0 → +1`` (so zero never becomes a third value), same dtype as ``x``."""
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))


class HashHead(nn.Module):
    """Base hash head: an optional linear projection to ``n_bits``, then :meth:`relax`.

    Args:
        in_dim: width of the fused features.
        n_bits: code length.
        projection: ``"linear"`` always projects, ``"identity"`` requires ``in_dim == n_bits``,
            ``"auto"`` projects only when the widths differ.

    Override :meth:`relax` (the differentiable code used by the losses) and, rarely,
    :meth:`binarize` (how retrieval codes are taken from relaxed ones).
    """

    def __init__(self, in_dim: int, n_bits: int, projection: str = "auto"):
        super().__init__()
        if n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        if projection not in ("auto", "linear", "identity"):
            raise ValueError(f"projection must be 'auto', 'linear' or 'identity', got {projection!r}")
        if projection == "identity" and in_dim != n_bits:
            raise ValueError(f"projection='identity' needs in_dim == n_bits, got {in_dim} and {n_bits}")
        self.in_dim, self.n_bits = int(in_dim), int(n_bits)
        use_linear = projection == "linear" or (projection == "auto" and in_dim != n_bits)
        self.proj: nn.Module = nn.Linear(in_dim, n_bits) if use_linear else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Relaxed codes ``(B, n_bits)``, differentiable."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{type(self).__name__}: expected input (batch, {self.in_dim}), got {tuple(x.shape)}")
        return self.relax(self.proj(x))

    def relax(self, z: Tensor) -> Tensor:
        return torch.tanh(z)

    def binarize(self, h: Tensor) -> Tensor:
        return binarize(h)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """±1 retrieval codes ``(B, n_bits)``."""
        return self.binarize(self(x))


@HASH_HEADS.register("tanh")
class TanhHead(HashHead):
    """``tanh`` relaxation in training, ``sign`` at retrieval (the DMMH paper's head)."""


@HASH_HEADS.register("straight_through", aliases=("ste", "sign_ste"))
class StraightThroughHead(HashHead):
    """Forward gives exact ±1 codes; backward passes the gradient of ``tanh`` (straight-through)."""

    def relax(self, z: Tensor) -> Tensor:
        h = torch.tanh(z)
        return h + (binarize(h) - h).detach()


@HASH_HEADS.register("scaled_tanh")
class ScaledTanhHead(HashHead):
    """``tanh(beta * z)``: larger ``beta`` pushes codes towards ±1 (HashNet-style continuation)."""

    def __init__(self, in_dim: int, n_bits: int, projection: str = "auto", beta: float = 1.0):
        super().__init__(in_dim, n_bits, projection)
        self.beta = float(beta)

    def relax(self, z: Tensor) -> Tensor:
        return torch.tanh(self.beta * z)

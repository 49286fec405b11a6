"""The encoder interface: one modality's feature vector → a short token sequence.

Every encoder maps ``(B, in_dim)`` features to tokens ``(B, num_tokens, dim)``; the
fusion stage combines the token sequences of all modalities. Subclasses set
``in_dim``, ``dim`` and ``num_tokens`` and implement :meth:`encode_tokens`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmmh._checks import check_features
from dmmh._passes import Dropout

__all__ = ["Encoder", "TokenExpansion", "mlp"]


class Encoder(nn.Module):
    """Base class: validates input, then calls :meth:`encode_tokens`."""

    in_dim: int
    dim: int
    num_tokens: int

    def __init__(self, in_dim: int, dim: int, num_tokens: int):
        super().__init__()
        if in_dim < 1 or dim < 1 or num_tokens < 1:
            raise ValueError(f"in_dim, dim and num_tokens must be >= 1, got {in_dim}, {dim}, {num_tokens}")
        self.in_dim, self.dim, self.num_tokens = int(in_dim), int(dim), int(num_tokens)
        self.name = type(self).__name__  # overwritten by the model with the modality name

    def forward(self, x: Tensor) -> Tensor:
        check_features(x, self.in_dim, f"{self.name} input")
        out = self.encode_tokens(x)
        return out

    def encode_tokens(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def pooled(self, x: Tensor) -> Tensor:
        """Mean of the token sequence, ``(B, dim)``."""
        return self(x).mean(dim=1)


def mlp(in_dim: int, hidden: list[int] | tuple[int, ...], out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """``Linear → ReLU → Dropout`` per hidden width, then a final ``Linear``."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU(inplace=True)]
        if dropout > 0:
            layers.append(Dropout(dropout))  # nn.Dropout that trains in parallel passes (dmmh._passes)
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class TokenExpansion(nn.Module):
    """The "dilation" step: ``Linear(dim, dim * T)`` reshaped to ``T`` tokens plus a fixed
    sinusoidal positional encoding (as in BSTH, DMMH's closest published relative)."""

    def __init__(self, dim: int, num_tokens: int, positional: bool = True):
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.proj = nn.Linear(dim, dim * num_tokens) if num_tokens > 1 else nn.Identity()
        self.register_buffer("pos", sinusoidal_positions(num_tokens, dim) if positional else torch.zeros(num_tokens, dim), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.proj, nn.Linear):  # the positions added as part of the bias: one pass over the output
            bias = self.pos.flatten() if self.proj.bias is None else self.proj.bias + self.pos.flatten()
            return F.linear(x, self.proj.weight, bias).view(x.shape[0], self.num_tokens, self.dim)
        return self.proj(x).view(x.shape[0], self.num_tokens, self.dim) + self.pos.to(x.dtype)


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The Transformer's sine/cosine positional table, ``(length, dim)``."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table

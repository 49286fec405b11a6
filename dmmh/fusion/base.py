"""The fusion interface: token sequences of the present modalities → one feature vector."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Fusion"]


class Fusion(nn.Module):
    """Base class. ``forward(tokens)`` takes a list of ``(B, num_tokens, dim)`` tensors, one per
    present modality, and returns ``(B, out_dim)``."""

    out_dim: int

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens, self.dim = int(num_tokens), int(dim)

    def forward(self, tokens: list[Tensor]) -> Tensor:
        if not tokens:
            raise ValueError("fusion needs at least one modality's tokens")
        for i, t in enumerate(tokens):
            if t.ndim != 3 or t.shape[1:] != (self.num_tokens, self.dim):
                raise ValueError(
                    f"{type(self).__name__}: modality {i} tokens have shape {tuple(t.shape)}, "
                    f"expected (batch, {self.num_tokens}, {self.dim})"
                )
        return self.fuse(tokens)

    def fuse(self, tokens: list[Tensor]) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

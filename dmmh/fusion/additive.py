"""``additive``: element-wise sum of the modalities' tokens (DMMH step 4), flattened."""

from __future__ import annotations

from torch import Tensor

from dmmh.fusion.base import Fusion
from dmmh.registry import FUSIONS


def add_tokens(tokens: list[Tensor]) -> Tensor:
    """Sum of the modalities' token tensors."""
    out = tokens[0]
    for t in tokens[1:]:
        out = out + t
    return out


@FUSIONS.register("additive", aliases=("add", "sum"))
class AdditiveFusion(Fusion):
    """Sum the token sequences, flatten to ``(B, num_tokens * dim)``."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__(num_tokens, dim)
        self.out_dim = self.num_tokens * self.dim

    def fuse(self, tokens: list[Tensor]) -> Tensor:
        return add_tokens(tokens).flatten(1)

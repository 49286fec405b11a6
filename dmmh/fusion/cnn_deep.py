"""``cnn_deep``: additive fusion followed by a deep grouped 1x1 CNN, one group per token (DMMH step 5)."""

from __future__ import annotations

from torch import Tensor, nn

from dmmh.fusion.additive import add_tokens
from dmmh.fusion.base import Fusion
from dmmh.registry import FUSIONS


@FUSIONS.register("cnn_deep", aliases=("cnn",))
class CNNDeepFusion(Fusion):
    """``sum → Conv(T*d → T*h, groups=T) → BN → tanh → … → Conv(T*h → T*out_per_token, groups=T)``.

    Each token is convolved on its own (groups = tokens), so with ``num_tokens == n_bits`` and
    ``out_per_token == 1`` every bit gets its own small network, as in BSTH.

    Args:
        num_tokens, dim: shape of each modality's tokens.
        hidden: width per token of each hidden layer (default ``(dim // 2,)``).
        out_per_token: outputs per token; ``out_dim = num_tokens * out_per_token``.
        dropout: dropout after each hidden activation.
    """

    def __init__(self, num_tokens: int, dim: int, hidden: tuple[int, ...] | None = None, out_per_token: int = 1, dropout: float = 0.0):
        super().__init__(num_tokens, dim)
        hidden = tuple(hidden) if hidden is not None else (max(dim // 2, 1),)
        t = self.num_tokens
        layers: list[nn.Module] = []
        prev = dim
        for width in hidden:
            layers += [nn.Conv1d(t * prev, t * width, 1, groups=t), nn.BatchNorm1d(t * width), nn.Tanh()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            prev = width
        layers.append(nn.Conv1d(t * prev, t * out_per_token, 1, groups=t))
        self.net = nn.Sequential(*layers)
        self.out_dim = t * out_per_token

    def fuse(self, tokens: list[Tensor]) -> Tensor:
        fused = add_tokens(tokens)  # (B, T, d): token-major flatten keeps each group contiguous
        return self.net(fused.reshape(fused.shape[0], -1, 1)).squeeze(-1)

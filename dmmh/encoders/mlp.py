"""``mlp``: an MLP over a pre-extracted feature vector, expanded to a token sequence."""

from __future__ import annotations

from torch import Tensor, nn

from dmmh.encoders.base import Encoder, TokenExpansion, mlp
from dmmh.registry import ENCODERS


@ENCODERS.register("mlp")
class MLPEncoder(Encoder):
    """``features → MLP(hidden) → dim → T tokens (+ positions)``.

    Args:
        in_dim: width of the input features.
        dim: token width.
        num_tokens: tokens produced (``T``); 1 gives a single vector token.
        hidden: widths of the hidden layers.
        dropout: dropout after each hidden layer.
    """

    def __init__(self, in_dim: int, dim: int = 128, num_tokens: int = 1, hidden: tuple[int, ...] = (512,), dropout: float = 0.1):
        super().__init__(in_dim, dim, num_tokens)
        self.net = nn.Sequential(mlp(in_dim, list(hidden), dim, dropout), nn.ReLU(inplace=True))
        self.expand = TokenExpansion(dim, num_tokens)

    def encode_tokens(self, x: Tensor) -> Tensor:
        return self.expand(self.net(x))

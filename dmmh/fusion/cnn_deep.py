"""``cnn_deep``: additive fusion followed by a deep grouped 1x1 CNN, one group per token (DMMH step 5)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dmmh.fusion.additive import add_tokens
from dmmh.fusion.base import Fusion
from dmmh.registry import FUSIONS


@FUSIONS.register("cnn_deep", aliases=("cnn",))
class CNNDeepFusion(Fusion):
    """``sum → Conv(T*d → T*h, groups=T) → BN → tanh → … → Conv(T*h → T*out_per_token, groups=T)``.

    Each token is convolved on its own (groups = tokens), so with ``num_tokens == n_bits`` and
    ``out_per_token == 1`` every bit gets its own small network, as in BSTH. The layers are
    ``nn.Conv1d``/``nn.BatchNorm1d`` modules (their state dict is BSTH's); a grouped 1x1 convolution is
    computed as one batched matrix product over tokens, several times faster on the CPU than the
    convolution kernels at these shapes.

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
        x = add_tokens(tokens)  # (B, T, d): token t is group t of the convolutions
        for layer in self.net:
            if isinstance(layer, nn.Conv1d):
                x = _grouped_1x1(x, layer)
            elif isinstance(layer, nn.BatchNorm1d):  # channels (t, h) flattened token-major, as in the convolution
                x = layer(x.reshape(x.shape[0], -1)).view(x.shape)
            else:
                x = layer(x)
        return x.reshape(x.shape[0], -1)


def _grouped_1x1(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv`` (kernel 1, ``groups = T``) applied to ``x (B, T, c_in)``: ``(B, T, c_out)``, as ``bias + W_t x_t`` per token."""
    t = x.shape[1]
    weight = conv.weight.view(t, conv.out_channels // t, -1)
    return torch.baddbmm(conv.bias.view(t, 1, -1), x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)

"""``transformer``: BSTH's encoder — feature vector → MLP → T tokens (+ positions) → Transformer layers.

BSTH (W. Tan, L. Zhu, W. Guan, J. Li, Z. Cheng, "Bit-aware Semantic Transformer Hashing for
Multi-modal Retrieval", SIGIR 2022), the Transformer predecessor DMMH is compared against,
encodes each modality in three steps, reproduced here with its published sizes as defaults:

1. an MLP whose every layer is ``Linear → BatchNorm1d → tanh``: image 4096 → 2048 → 128,
   text 1386 → 1024 → 128 (``hidden=(2048,)`` here; pass ``hidden=(1024,)`` for the text side,
   e.g. ``--model.text_encoder_kwargs '{"hidden": [1024]}'``);
2. ``Linear(d, d·T)`` reshaped to ``T`` tokens of width ``d = 128`` (``T = n_bits``, which the
   model passes by default), plus the sinusoidal positional table, then dropout;
3. ``torch.nn.TransformerEncoder``: 2 post-norm layers, 1 attention head, feed-forward width
   ``d``, GELU, dropout 0.5, and a final LayerNorm.

BSTH then adds the two modalities' tokens and hashes them with grouped 1x1 convolutions, which
is dmmh's ``cnn_deep`` fusion: ``--model.encoder transformer --model.fusion cnn_deep`` is BSTH's
network inside dmmh's pipeline. Its training differs: BSTH first learns label-prototype target
codes and regresses onto them; dmmh trains with its own losses (the same for every encoder, so
encoders are compared on equal terms).

Source of the sizes: BSTH's code (github.com/FutureTwT/BSTH; read from the copy
DandelionWow/BSTH, commit 8782107): ``model_transformer.py`` (class ``GMMH``: ``imageMLP`` /
``textMLP``, ``imageConcept = Linear(common_dim, common_dim * nbit)``,
``TransformerEncoderLayer(d_model=common_dim, nhead, dim_feedforward=common_dim, activation,
dropout)``, ``TransformerEncoder(num_layers, norm=LayerNorm(common_dim))``), ``layers.py``
(``MLP``: ``Linear, BatchNorm1d, act`` per layer, ``act=nn.Tanh()``; ``PositionalEncoding``:
sine/cosine table plus dropout) and ``train_transformer.py`` (``--nhead 1 --num_layer 2
--trans_act gelu --dropout 0.5 --img_hidden_dim [2048, 128] --txt_hidden_dim [1024, 128]``,
batch 1024, Adam lr 0.001).
"""

from __future__ import annotations

from torch import Tensor, nn

from dmmh.encoders.base import Encoder, TokenExpansion
from dmmh.registry import ENCODERS

__all__ = ["TransformerEncoder"]


@ENCODERS.register("transformer", aliases=("bsth",))
class TransformerEncoder(Encoder):
    """``features → [Linear → BatchNorm1d → tanh] per width of (*hidden, dim) → T tokens (+ positions)
    → dropout → depth × post-norm Transformer layer → LayerNorm`` (BSTH's encoder; see the module docs).

    Args:
        in_dim: width of the input features.
        dim: token width (BSTH: 128).
        num_tokens: tokens ``T`` (the model passes ``n_bits`` by default, as BSTH does).
        depth: Transformer encoder layers (BSTH: 2).
        heads: attention heads (BSTH: 1); must divide ``dim``.
        ff_dim: feed-forward width (default ``dim``, as in BSTH).
        hidden: hidden widths of the MLP (BSTH: 2048 for images, 1024 for text).
        dropout: dropout after the positions and inside the Transformer layers (BSTH: 0.5).
        activation: the feed-forward activation, ``"gelu"`` (BSTH) or ``"relu"``.

    Batch norm needs more than one item per training batch (the DataModules never make a
    training batch of one).
    """

    def __init__(
        self, in_dim: int, dim: int = 128, num_tokens: int = 16, depth: int = 2, heads: int = 1,
        ff_dim: int | None = None, hidden: tuple[int, ...] = (2048,), dropout: float = 0.5, activation: str = "gelu",
    ):
        super().__init__(in_dim, dim, num_tokens)
        if depth < 1 or heads < 1:
            raise ValueError(f"depth and heads must be >= 1, got {depth}, {heads}")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        if activation not in ("gelu", "relu"):
            raise ValueError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        widths = [in_dim, *hidden, dim]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.Tanh()]
        self.proj = nn.Sequential(*layers)
        self.expand = TokenExpansion(dim, num_tokens)
        self.drop = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff_dim or dim, dropout=dropout,
                                           activation=activation, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def encode_tokens(self, x: Tensor) -> Tensor:
        return self.layers(self.drop(self.expand(self.proj(x))))

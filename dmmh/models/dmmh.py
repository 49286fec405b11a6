"""The DMMH model composed from named parts: encoders → fusion → hash head."""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from dmmh._checks import check_same_batch
from dmmh._passes import encoder_in_passes, run_passes
from dmmh.registry import ENCODERS, FUSIONS, HASH_HEADS

__all__ = ["DMMH", "MODALITIES"]

MODALITIES = ("image", "text")


class DMMH(nn.Module):
    """Deep multi-modal hashing network.

    ``image`` and ``text`` feature vectors are each encoded into ``num_tokens`` tokens of width
    ``dim`` by a registered encoder, fused by a registered fusion operator, and mapped to
    ``n_bits`` relaxed codes by a registered hash head.

    Args:
        image_dim, text_dim: widths of the pre-extracted features.
        n_bits: code length, a positive multiple of 8 (codes are packed into whole bytes).
        encoder: encoder name for both modalities (``image_encoder`` / ``text_encoder`` override it).
        encoder_kwargs: kwargs for both encoders, merged under the per-modality ones.
        dim: token width. num_tokens: tokens per modality (default ``n_bits``, as in BSTH).
        fusion, fusion_kwargs: fusion operator and its kwargs.
        head, head_kwargs: hash head and its kwargs.
        modality_dropout: in training, the probability that an item loses one of its two
            modalities (chosen at random), so that the model learns to encode items from one
            modality alone (an extension of the paper, whose queries carry both).

    On the CPU a batch goes through the model in passes of at most :attr:`rows_per_pass` tokens, run
    on ``torch.get_num_threads()`` worker threads with one intra-op thread each (:mod:`dmmh._passes`:
    no OpenMP synchronisation, so more threads are never slower). Each pass's activations (a few MiB)
    stay in cache and reuse the memory of the previous pass, where one pass over hundreds of items has
    the OS supply fresh pages for every activation (page faults then cost about a fifth of the time)
    and its matrix products run at about 60 % of the machine's rate. In eval mode without gradients
    (``encode``) the passes go through the whole model: an item's code never depends on the rest of its
    batch. Otherwise only the encoders go in passes (their forward and backward), since the fusion's
    BatchNorm and the pairwise losses see the whole batch. Results change by float rounding only. An
    encoder must therefore treat the items of its batch independently (a training BatchNorm in it is
    detected and given the whole batch); ``model.rows_per_pass = None`` turns passes off (one pass,
    PyTorch's own intra-op parallelism).
    """

    #: tokens (items x ``num_tokens``) per pass on the CPU; ``None``: no passes
    rows_per_pass: int | None = 4096

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        n_bits: int = 64,
        encoder: str = "mamba",
        encoder_kwargs: Mapping[str, Any] | None = None,
        image_encoder: str | None = None,
        image_encoder_kwargs: Mapping[str, Any] | None = None,
        text_encoder: str | None = None,
        text_encoder_kwargs: Mapping[str, Any] | None = None,
        dim: int = 128,
        num_tokens: int | None = None,
        fusion: str = "cnn_deep",
        fusion_kwargs: Mapping[str, Any] | None = None,
        head: str = "tanh",
        head_kwargs: Mapping[str, Any] | None = None,
        modality_dropout: float = 0.0,
    ):
        super().__init__()
        if isinstance(n_bits, bool) or not isinstance(n_bits, numbers.Integral) or n_bits <= 0 or n_bits % 8:
            raise ValueError(f"n_bits must be a positive multiple of 8, got {n_bits!r}: codes are packed into whole "
                             f"bytes (n_bits // 8 per item), as dmmh's index files and faiss' binary indexes require")
        if not 0.0 <= modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {modality_dropout}")
        self.n_bits = int(n_bits)
        self.num_tokens = int(num_tokens or n_bits)
        self.dim = int(dim)
        self.modality_dropout = float(modality_dropout)
        shared = dict(encoder_kwargs or {})
        specs = {
            "image": (image_encoder or encoder, image_dim, {**shared, **(image_encoder_kwargs or {})}),
            "text": (text_encoder or encoder, text_dim, {**shared, **(text_encoder_kwargs or {})}),
        }
        self.encoders = nn.ModuleDict()
        for modality, (name, in_dim, kwargs) in specs.items():
            kwargs.setdefault("dim", self.dim)
            kwargs.setdefault("num_tokens", self.num_tokens)
            enc = ENCODERS.create(name, in_dim=in_dim, **kwargs)
            enc.name = f"{modality} encoder ({name})"
            if (enc.num_tokens, enc.dim) != (self.num_tokens, self.dim):
                raise ValueError(
                    f"{modality} encoder {name!r} makes tokens of shape ({enc.num_tokens}, {enc.dim}); "
                    f"the model expects ({self.num_tokens}, {self.dim})"
                )
            self.encoders[modality] = enc
        self.fusion = FUSIONS.create(fusion, num_tokens=self.num_tokens, dim=self.dim, **(fusion_kwargs or {}))
        self.head = HASH_HEADS.create(head, in_dim=self.fusion.out_dim, n_bits=self.n_bits, **(head_kwargs or {}))

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        """Relaxed codes ``(B, n_bits)`` from whichever modalities are given."""
        inputs = {m: x for m, x in (("image", image), ("text", text)) if x is not None}
        n = check_same_batch({"image": image, "text": text})
        if next(iter(inputs.values())).device.type != "cpu" or self.rows_per_pass is None:
            return self._codes(inputs, None)
        step = max(1, self.rows_per_pass // self.num_tokens)
        if self.training or torch.is_grad_enabled():
            return self._codes(inputs, step)
        return run_passes(lambda rows: self._codes({m: x[rows] for m, x in inputs.items()}, n), n, step)

    def _codes(self, inputs: dict[str, Tensor], step: int | None) -> Tensor:
        """Codes of a batch, its encoders taking ``step`` items at a time (all at once: ``None``)."""
        tokens = {m: self.encoders[m](x) if step is None else encoder_in_passes(self.encoders[m], x, step)
                  for m, x in inputs.items()}
        if self.training and self.modality_dropout > 0 and len(tokens) == 2:
            tokens = self._drop_modalities(tokens)
        return self.head(self.fusion(list(tokens.values())))

    def encode(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        """±1 retrieval codes ``(B, n_bits)``, computed under ``torch.inference_mode`` (call ``.eval()``
        first for deterministic codes)."""
        with torch.inference_mode():
            return self.head.binarize(self(image, text))

    def _drop_modalities(self, tokens: dict[str, Tensor]) -> dict[str, Tensor]:
        first = next(iter(tokens.values()))
        n = first.shape[0]
        dropped = torch.rand(n, device=first.device) < self.modality_dropout
        which = torch.rand(n, device=first.device) < 0.5  # True: drop image, False: drop text
        keep = {"image": ~(dropped & which), "text": ~(dropped & ~which)}
        return {m: t * keep[m].to(t.dtype)[:, None, None] for m, t in tokens.items()}

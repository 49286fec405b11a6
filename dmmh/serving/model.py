"""The trained model behind an index: loading, a content fingerprint, and what each modality takes."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from dmmh.models.dmmh import MODALITIES
from dmmh.models.lit import DMMHModule

__all__ = ["load_model", "model_fingerprint", "model_modalities"]

INPUTS = ("images", "captions", "features")


def load_model(ckpt: str | os.PathLike, device: str | torch.device = "cpu") -> DMMHModule:
    """A :class:`DMMHModule` from a Lightning checkpoint (``weights_only=True``: tensors and plain
    containers only, see docs/trust.md), in eval mode on ``device``."""
    if not os.path.isfile(ckpt):
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    try:
        module = DMMHModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{ckpt}: not a loadable DMMHModule checkpoint ({type(exc).__name__}: {exc})") from exc
    return module.to(device).eval()


@torch.no_grad()
def model_fingerprint(module: DMMHModule) -> str:
    """SHA-256 of every tensor of the network's state dict (names, dtypes, shapes, values).

    Equal fingerprints encode equally; it depends on the weights, not on the checkpoint's path,
    its optimizer state or its training counters.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_modalities(module: DMMHModule) -> dict[str, dict[str, Any]]:
    """Per modality: the encoder's name, what it takes (``images``, ``captions`` or ``features``)
    and its input width (feature width, image channels or the tokenizer's context length)."""
    from dmmh.encoders.clip import ClipImageEncoder, ClipTextEncoder

    h = module.hparams
    out = {}
    for m in MODALITIES:
        enc = module.model.encoders[m]
        takes = "images" if isinstance(enc, ClipImageEncoder) else "captions" if isinstance(enc, ClipTextEncoder) else "features"
        out[m] = {"encoder": h.get(f"{m}_encoder") or h["encoder"], "input": takes, "width": int(enc.in_dim)}
        if takes == "images":
            out[m]["image_size"] = list(enc.backbone.image_size)
    return out

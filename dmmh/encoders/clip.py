"""``clip_image`` / ``clip_text``: open_clip towers over raw images and token ids (extra ``[clip]``).

An open_clip model is named by architecture (``model="ViT-B-32"``, or any name plus an
architecture dict ``model_config`` in open_clip's JSON layout, registered with open_clip under
that name). ``pretrained`` is a local checkpoint path or an open_clip tag; tags are fetched from
the Hugging Face hub / open_clip URLs, which machines without internet cannot reach, so offline
pass a checkpoint file. ``None`` keeps open_clip's random initialisation.

The backbone's output becomes ``num_tokens`` tokens of width ``dim`` either from its pooled
embedding (``output="pooled"``: a registered feature encoder, ``"mlp"`` by default, maps it to
tokens, exactly as for pre-extracted features) or from its hidden-state sequence
(``output="tokens"``: ``Linear(width → dim)`` then average pooling of the sequence to
``num_tokens`` tokens, text padding left out, plus positions).

open_clip is imported only when a CLIP encoder or :class:`ClipBackbone` is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmmh._checks import check_finite
from dmmh._optional import require
from dmmh.encoders.base import Encoder, sinusoidal_positions
from dmmh.registry import ENCODERS

__all__ = ["ClipBackbone", "ClipImageEncoder", "ClipTextEncoder", "register_clip_config"]

OUTPUTS = ("pooled", "tokens")


def _open_clip():
    return require("open_clip", "the CLIP encoders (clip_image, clip_text)")


def register_clip_config(name: str, config: Mapping[str, Any]) -> None:
    """Register an architecture dict (open_clip's ``model_configs/*.json`` layout) under ``name``.

    Re-registering the same dict is a no-op; a different dict under a taken name is an error.
    """
    open_clip = _open_clip()
    config = json.loads(json.dumps(dict(config)))  # plain, JSON-able copy
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in config]
    if missing:
        raise ValueError(f"CLIP model_config for {name!r} lacks key(s) {missing} (open_clip's model config layout)")
    known = open_clip.get_model_config(name)
    if known is not None:
        if json.dumps(known, sort_keys=True) != json.dumps(config, sort_keys=True):
            raise ValueError(f"open_clip already has a different architecture named {name!r}; register yours under another name")
        return
    with tempfile.TemporaryDirectory() as tmp:  # open_clip reads config files when they are added
        path = os.path.join(tmp, f"{name}.json")
        with open(path, "w") as f:
            json.dump(config, f)
        open_clip.add_model_config(path)


class ClipBackbone(nn.Module):
    """An open_clip model with its evaluation image transform and its tokenizer.

    Args:
        model: open_clip architecture name.
        pretrained: local checkpoint path, open_clip tag (needs the hub), or ``None`` (random init).
        model_config: architecture dict registered under ``model`` first (see :func:`register_clip_config`).
        normalize: L2-normalise pooled embeddings (as CLIP features usually are).
    """

    def __init__(self, model: str = "ViT-B-32", pretrained: str | None = None,
                 model_config: Mapping[str, Any] | None = None, normalize: bool = True):
        super().__init__()
        open_clip = _open_clip()
        if model_config is not None:
            register_clip_config(model, model_config)
        config = open_clip.get_model_config(model)
        if config is None:
            import difflib

            close = difflib.get_close_matches(model, open_clip.list_models(), n=3, cutoff=0.5)
            raise ValueError(f"unknown open_clip architecture {model!r}" + (f"; did you mean {close}?" if close else "")
                             + " (or pass model_config, an architecture dict)")
        self.model_name, self.pretrained, self.normalize = model, pretrained, bool(normalize)
        self.config = config
        self.clip, self.transform = _create(open_clip, model, pretrained)
        self.tokenizer: Callable[..., Tensor] = open_clip.get_tokenizer(model)
        self.context_length = int(getattr(self.tokenizer, "context_length", config["text_cfg"].get("context_length", 77)))
        size = config["vision_cfg"].get("image_size", 224)
        self.image_size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))
        self.embed_dim = int(config["embed_dim"])

    def tokenize(self, texts: str | list[str]) -> Tensor:
        """Token ids ``(N, context_length)`` (int64)."""
        return self.tokenizer(texts).to(torch.int64)

    def encode_image(self, images: Tensor) -> Tensor:
        out = self.clip.encode_image(images)
        return F.normalize(out, dim=-1) if self.normalize else out

    def encode_text(self, tokens: Tensor) -> Tensor:
        out = self.clip.encode_text(tokens)
        return F.normalize(out, dim=-1) if self.normalize else out

    def spec(self) -> dict[str, Any]:
        """What determines the features this backbone computes (see :meth:`fingerprint`)."""
        return {"model": self.model_name, "config": self.config, "pretrained": self.pretrained,
                "normalize": self.normalize, "transform": repr(self.transform), "context_length": self.context_length}

    @torch.no_grad()
    def fingerprint(self) -> str:
        """SHA-256 of what the backbone is: :meth:`spec` less the ``pretrained`` path, and every
        weight's name, dtype, shape and bytes. Equal fingerprints compute equal features; a
        checkpoint named by another path (absolute, relative, a copy) gives the same one."""
        spec = {k: v for k, v in self.spec().items() if k != "pretrained"}
        h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
        for name, t in sorted(self.clip.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        return h.hexdigest()


def _create(open_clip, model: str, pretrained: str | None):
    if pretrained is None or os.path.isfile(pretrained):
        clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=pretrained)
        return clip, transform
    if not open_clip.get_pretrained_cfg(model, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an existing checkpoint file nor an open_clip tag of {model!r}"
            f" (tags: {tags or 'none'})")
    try:
        clip, _, transform = open_clip.create_model_and_transforms(model, pretrained=pretrained)
    except Exception as exc:
        raise RuntimeError(
            f"could not fetch open_clip weights {model!r}/{pretrained!r}: tags are downloaded from the Hugging Face "
            f"hub or open_clip's URLs, which this machine cannot reach (nothing is downloaded offline); pass "
            f"pretrained=<local checkpoint path> instead ({type(exc).__name__}: {exc})") from exc
    return clip, transform


class _ClipEncoder(Encoder):
    """Shared logic: build the backbone, freeze it, map its output to ``(B, num_tokens, dim)``."""

    tower = ""

    def __init__(self, in_dim: int | None = None, dim: int = 128, num_tokens: int = 1, model: str = "ViT-B-32",
                 pretrained: str | None = None, model_config: Mapping[str, Any] | None = None, freeze: bool = True,
                 train_last: int = 0, output: str = "pooled", head: str = "mlp", head_kwargs: Mapping[str, Any] | None = None,
                 normalize: bool = True):
        if output not in OUTPUTS:
            raise ValueError(f"{self.tower} CLIP encoder: output must be one of {OUTPUTS}, got {output!r}")
        if train_last < 0:
            raise ValueError(f"train_last must be >= 0, got {train_last}")
        if train_last and not freeze:
            raise ValueError(f"train_last={train_last} only applies with freeze=True (freeze=False trains the whole tower)")
        backbone = ClipBackbone(model, pretrained, model_config, normalize)
        natural = self._natural_in_dim(backbone)
        if in_dim is not None and int(in_dim) != natural:
            raise ValueError(f"{self.tower} CLIP encoder {model!r}: in_dim={in_dim} but its input has width {natural} "
                             f"({self._in_dim_meaning})")
        super().__init__(natural, dim, num_tokens)
        self.output, self.freeze = output, bool(freeze)
        self.backbone = backbone
        self._keep_tower(backbone.clip)
        for p in backbone.parameters():
            p.requires_grad = not self.freeze
        if self.freeze and train_last:
            self._unlock_last(backbone.clip, int(train_last))
        self.frozen = not any(p.requires_grad for p in backbone.parameters())
        if output == "pooled":
            self.head = ENCODERS.create(head, in_dim=backbone.embed_dim, dim=dim, num_tokens=num_tokens, **dict(head_kwargs or {}))
            self.head.name = f"{self.tower} CLIP head ({head})"
        else:
            self.proj = nn.Linear(self._token_width(backbone.clip), dim)
            self.register_buffer("pos", sinusoidal_positions(num_tokens, dim), persistent=False)

    # the backbone's tokenizer and image transform, for data pipelines
    @property
    def transform(self) -> Callable:
        return self.backbone.transform

    @property
    def tokenizer(self) -> Callable:
        return self.backbone.tokenize

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:  # a frozen backbone stays in eval mode (BatchNorm statistics, dropout)
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.encode_tokens(x)

    def encode_tokens(self, x: Tensor) -> Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            if self.output == "pooled":
                feats = self._pooled(x)
            else:
                seq, mask = self._sequence(x)
        if self.output == "pooled":
            return self.head(feats)
        return self._pool_tokens(self.proj(seq), mask) + self.pos.to(seq.dtype)

    def _pool_tokens(self, seq: Tensor, mask: Tensor) -> Tensor:
        """Masked average of ``(B, L, d)`` over ``num_tokens`` equal bins of ``L`` → ``(B, num_tokens, d)``."""
        m = mask.to(seq.dtype).unsqueeze(1)  # (B, 1, L)
        num = F.adaptive_avg_pool1d((seq * m.transpose(1, 2)).transpose(1, 2), self.num_tokens)
        den = F.adaptive_avg_pool1d(m, self.num_tokens).clamp_min(1e-6)
        return (num / den).transpose(1, 2)

    # -- per tower ---------------------------------------------------------------------------
    _in_dim_meaning = ""

    def _natural_in_dim(self, backbone: ClipBackbone) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _keep_tower(self, clip: nn.Module) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _unlock_last(self, clip: nn.Module, n: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _token_width(self, clip: nn.Module) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _pooled(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _sequence(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


@ENCODERS.register("clip_image")
class ClipImageEncoder(_ClipEncoder):
    """open_clip image tower over images ``(B, 3, H, W)`` prepared by :attr:`transform`.

    Args:
        in_dim: image channels (3); ``None`` accepts the default.
        dim, num_tokens: token shape produced.
        model, pretrained, model_config, normalize: see :class:`ClipBackbone`.
        freeze: freeze the backbone (the default: only ``head`` / ``proj`` learn).
        train_last: with ``freeze``, leave the last ``n`` groups of the tower trainable (open_clip's
            LiT locking: for a ViT, group 1 is the output projection, 2 adds the last block, ...).
        output: ``"pooled"`` or ``"tokens"`` (see the module docs).
        head, head_kwargs: feature encoder mapping the pooled embedding to tokens.
    """

    tower = "image"
    _in_dim_meaning = "in_dim of clip_image is the number of image channels"

    def _natural_in_dim(self, backbone):
        return 3

    def _keep_tower(self, clip):
        for name in [n for n, _ in clip.named_children() if n != "visual"]:
            delattr(clip, name)
        for name in [n for n, _ in clip.named_parameters(recurse=False)]:
            delattr(clip, name)

    def _unlock_last(self, clip, n):
        clip.visual.lock(unlocked_groups=n)

    def _token_width(self, clip):
        width = getattr(getattr(clip.visual, "transformer", None), "width", None)
        if width is None:
            raise ValueError(f"output='tokens' needs a ViT image tower; {self.backbone.model_name!r} has {type(clip.visual).__name__}")
        return int(width)

    def _check_input(self, x):
        if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.backbone.image_size:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name} input: expected images (batch, 3, {self.backbone.image_size[0]}, "
                             f"{self.backbone.image_size[1]}) from its transform, got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"{self.name} input: expected float images, got {x.dtype}")
        check_finite(x, f"{self.name} input")

    def _pooled(self, x):
        return self.backbone.encode_image(x)

    def _sequence(self, x):
        visual = self.backbone.clip.visual
        visual.output_tokens = True
        try:
            _, tokens = visual(x)
        finally:
            visual.output_tokens = False
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


@ENCODERS.register("clip_text")
class ClipTextEncoder(_ClipEncoder):
    """open_clip text tower over token ids ``(B, context_length)`` made by :attr:`tokenizer`.

    Args are those of :class:`ClipImageEncoder`, except ``in_dim`` (the context length) and
    ``train_last`` (open_clip's ``unlocked_layers``: the last ``n`` text blocks, plus the final
    LayerNorm and projection).
    """

    tower = "text"
    _in_dim_meaning = "in_dim of clip_text is the tokenizer's context length"

    def _natural_in_dim(self, backbone):
        return backbone.context_length

    def _keep_tower(self, clip):
        delattr(clip, "visual")
        for name in ("logit_scale", "logit_bias"):
            if getattr(clip, name, None) is not None:
                delattr(clip, name)

    def _unlock_last(self, clip, n):
        clip.lock_text_tower(unlocked_layers=n)

    def _token_width(self, clip):
        if hasattr(clip, "text") or not hasattr(clip, "token_embedding"):
            raise ValueError(f"output='tokens' needs open_clip's built-in text transformer; {self.backbone.model_name!r} has another")
        return int(clip.token_embedding.embedding_dim)

    def _check_input(self, x):
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.in_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{self.name} input: expected token ids (batch, {self.in_dim}) from its tokenizer, got {shape}")
        if x.is_floating_point() or x.dtype == torch.bool:
            raise TypeError(f"{self.name} input: expected integer token ids, got {x.dtype}")
        vocab = self.backbone.config["text_cfg"].get("vocab_size")
        if vocab is not None and x.numel() and (int(x.min()) < 0 or int(x.max()) >= vocab):
            bad = ((x < 0) | (x >= vocab)).nonzero()[0].tolist()
            raise ValueError(f"{self.name} input: token id {int(x[bad[0], bad[1]])} at {tuple(bad)} outside [0, {vocab})")

    def _pooled(self, x):
        return self.backbone.encode_text(x)

    def _sequence(self, x):
        clip = self.backbone.clip
        cast = clip.transformer.get_cast_dtype()
        h = clip.token_embedding(x).to(cast) + clip.positional_embedding.to(cast)
        h = clip.ln_final(clip.transformer(h, attn_mask=clip.attn_mask))
        return h, x != 0  # id 0 is the tokenizer's padding

"""Image feature backbones for ``dmmh prepare``: torchvision's VGG-19 fc7 and open_clip image towers.

``image_features(spec)`` builds one from its name:

- ``"vgg19"``: torchvision's ImageNet VGG-19, the 4096-D output of ``fc7`` after its ReLU (what
  Caffe's in-place ``relu7`` leaves in the ``fc7`` blob, the papers' standard feature), in eval
  mode, on images prepared by ``VGG19_Weights.IMAGENET1K_V1.transforms()`` (resize 256, centre
  crop 224, ImageNet mean / std). ``weights``: a local state-dict file, or ``None`` for
  torchvision's cache (``<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth``, which
  ``torchvision.models.vgg19(weights="IMAGENET1K_V1")`` downloads on a machine with internet);
  ``"random"`` is a seeded random initialisation, for tests and timing only.
- ``"clip:<model>[@<pretrained>]"``: the image tower of :class:`~dmmh.encoders.clip.ClipBackbone`
  (open_clip; L2-normalised embeddings), ``pretrained`` a local checkpoint or an open_clip tag;
  ``model_config`` registers an architecture dict under ``<model>`` first.

Every backbone describes itself for the manifest (:meth:`ImageFeatures.describe`), including the
SHA-256 of its weights' values, and runs frozen in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from dmmh._optional import require

__all__ = ["ImageFeatures", "VGG19Fc7", "ClipImageFeatures", "image_features", "state_sha256", "VGG19_FILE"]

VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's IMAGENET1K_V1 weights file
RANDOM = "random"


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's state (names and float32 values, in name order): equal hashes, equal weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy())  # buffer protocol: no copy
    return h.hexdigest()


class ImageFeatures(nn.Module):
    """A frozen image backbone: ``transform`` maps a PIL RGB image to a tensor, ``forward`` a batch
    of them to ``(B, dim)`` float32 features."""

    name: str
    dim: int
    transform: Callable

    def describe(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`describe`: equal fingerprints compute equal features."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()


class VGG19Fc7(ImageFeatures):
    """torchvision's VGG-19 up to ``fc7`` + ReLU (4096-D). See the module docs for ``weights``;
    ``image_size`` (default 224, resize to ``image_size * 256 // 224``) is for small tests."""

    dim = 4096

    def __init__(self, weights: str | os.PathLike | None = None, image_size: int = 224):
        super().__init__()
        tv = require("torchvision", "VGG-19 image features (--image-features vgg19)")
        if weights == RANDOM:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                net = tv.models.vgg19(weights=None)
            self.weights, self.weights_file_sha256 = "random initialisation (torch.manual_seed(0))", None
        else:
            path = Path(weights) if weights is not None else Path(torch.hub.get_dir()) / "checkpoints" / VGG19_FILE
            if not path.is_file():
                how = ("the file passed as weights" if weights is not None else
                       f"torchvision's cache; on a machine with internet run python -c \"import torchvision; "
                       f"torchvision.models.vgg19(weights='IMAGENET1K_V1')\" and copy {VGG19_FILE} here, "
                       f"or pass --weights FILE")
                raise FileNotFoundError(f"VGG-19 weights {path} not found ({how})")
            net = tv.models.vgg19(weights=None)
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except Exception as exc:
                raise ValueError(f"{path}: not a state dict of torchvision's vgg19 ({type(exc).__name__}: {exc})") from exc
            with open(path, "rb") as f:
                self.weights_file_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
            self.weights = path.name
        net.classifier = net.classifier[:5]  # Linear(25088, 4096), ReLU, Dropout, Linear(4096, 4096) = fc7, ReLU
        self.net = net.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.transform = tv.models.VGG19_Weights.IMAGENET1K_V1.transforms(
            crop_size=self.image_size, resize_size=self.image_size * 256 // 224)
        self.name = "vgg19"
        self.weights_sha256 = state_sha256(self.net)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout stays off

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).float()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "layer": "fc7 after ReLU (torchvision vgg19 classifier[:5])",
                "weights": self.weights, "weights_file_sha256": self.weights_file_sha256,
                "weights_sha256": self.weights_sha256, "transform": repr(self.transform)}


class ClipImageFeatures(ImageFeatures):
    """The image tower of an open_clip model (L2-normalised embeddings, ``embed_dim`` wide)."""

    def __init__(self, model: str, pretrained: str | None = None, model_config: Mapping[str, Any] | None = None):
        super().__init__()
        from dmmh.encoders.clip import ClipBackbone

        backbone = ClipBackbone(model, pretrained, model_config, normalize=True)
        self.visual = backbone.clip.visual.eval().requires_grad_(False)
        self.transform = backbone.transform
        self.dim = backbone.embed_dim
        self.config = backbone.config
        self.model_name = model
        self.pretrained = None if pretrained is None else (Path(pretrained).name if os.path.isfile(pretrained) else pretrained)
        self.name = f"clip:{model}" + (f"@{pretrained}" if pretrained else "")
        self.weights_sha256 = state_sha256(self.visual)

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        out = self.visual(images)
        out = out[0] if isinstance(out, tuple) else out
        return nn.functional.normalize(out.float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        return {"name": f"clip:{self.model_name}" + (f"@{self.pretrained}" if self.pretrained else ""), "dim": self.dim,
                "layer": "open_clip image embedding, L2-normalised", "model": self.model_name, "config": self.config,
                "weights": self.pretrained or "random initialisation (open_clip)", "weights_sha256": self.weights_sha256,
                "transform": repr(self.transform)}


def image_features(spec: str, weights: str | os.PathLike | None = None, model_config: Mapping[str, Any] | None = None,
                   image_size: int | None = None) -> ImageFeatures:
    """The backbone named ``spec`` (``"vgg19"`` or ``"clip:<model>[@<pretrained>]"``); see the module docs."""
    if spec == "vgg19":
        if model_config is not None:
            raise ValueError("model_config applies to clip:<model> image features, not vgg19")
        return VGG19Fc7(weights, image_size or 224)
    if spec.startswith("clip:") and len(spec) > 5:
        if weights is not None or image_size is not None:
            raise ValueError(f"{spec}: pass CLIP weights as clip:<model>@<checkpoint or tag>; weights and image_size "
                             f"apply to vgg19")
        model, _, pretrained = spec[5:].partition("@")
        return ClipImageFeatures(model, pretrained or None, model_config)
    raise ValueError(f"unknown image features {spec!r}; expected 'vgg19' or 'clip:<model>[@<pretrained>]' "
                     f"(e.g. clip:ViT-B-32@/path/to/open_clip_checkpoint.pt)")

"""Hashing losses, registered by name in :data:`dmmh.registry.LOSSES`, and their weighted sum.

Every loss is an ``nn.Module`` built as ``Loss(n_bits=..., n_classes=..., **kwargs)`` and
called as ``loss(codes, labels)`` with relaxed codes ``(B, n_bits)`` and multi-hot labels
``(B, n_classes)``. Defaults follow BSTH, DMMH's closest published code (DESIGN.md §1).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmmh.hashing.heads import binarize
from dmmh.registry import LOSSES

__all__ = ["HashLoss", "CombinedLoss", "hash_centers", "hadamard"]


class HashLoss(nn.Module):
    def __init__(self, n_bits: int, n_classes: int):
        super().__init__()
        self.n_bits, self.n_classes = int(n_bits), int(n_classes)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@LOSSES.register("classification", aliases=("cls",))
class ClassificationLoss(HashLoss):
    """``MSE(sigmoid(W h), y)``: a linear classifier on the codes predicts the labels."""

    def __init__(self, n_bits: int, n_classes: int):
        super().__init__(n_bits, n_classes)
        self.classifier = nn.Linear(n_bits, n_classes)

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(torch.sigmoid(self.classifier(codes)), labels.to(codes.dtype))


@LOSSES.register("pairwise_similarity", aliases=("pairwise",))
class PairwiseSimilarityLoss(HashLoss):
    """``MSE(h hᵀ / K, S)`` with ``S = +1`` where two items share a label, else ``-1``."""

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(codes.dtype)
        target = torch.where(y @ y.T > 0, 1.0, -1.0).to(codes.dtype)
        return F.mse_loss(codes @ codes.T / self.n_bits, target)


@LOSSES.register("quantization", aliases=("quant",))
class QuantizationLoss(HashLoss):
    """``MSE(h, sign(h))``: pulls relaxed codes towards ±1."""

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        return F.mse_loss(codes, binarize(codes).detach())


def hadamard(n: int) -> Tensor:
    """Sylvester Hadamard matrix of order ``n`` (a power of two), entries ±1."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard matrices are built for powers of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hash_centers(n_classes: int, n_bits: int, kind: str = "auto", seed: int = 0) -> Tensor:
    """``(n_classes, n_bits)`` ±1 hash centres far apart in Hamming space.

    ``"hadamard"``: rows of a Hadamard matrix and their negations (pairwise distance ≥ K/2);
    needs ``n_bits`` a power of two and ``n_classes <= 2 * n_bits``. ``"random"``: Bernoulli(0.5)
    bits from ``seed``. ``"auto"``: Hadamard when possible, else random.
    """
    can_hadamard = n_bits >= 1 and not n_bits & (n_bits - 1) and n_classes <= 2 * n_bits
    if kind == "auto":
        kind = "hadamard" if can_hadamard else "random"
    if kind == "hadamard":
        if not can_hadamard:
            raise ValueError(f"Hadamard centres need n_bits a power of two and n_classes <= 2*n_bits; got n_bits={n_bits}, n_classes={n_classes}")
        h = hadamard(n_bits)
        return torch.cat([h, -h], 0)[:n_classes].clone()
    if kind == "random":
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, (n_classes, n_bits), generator=g).float() * 2 - 1
    raise ValueError(f"centers must be 'auto', 'hadamard' or 'random', got {kind!r}")


@LOSSES.register("central_similarity", aliases=("csq",))
class CentralSimilarityLoss(HashLoss):
    """Central similarity (Yuan et al., CVPR 2020): BCE between codes and their hash centre.

    A multi-label item's centre is the sign of the mean of its labels' centres (ties → +1).
    Items without any label are left out of the mean.
    """

    def __init__(self, n_bits: int, n_classes: int, centers: str = "auto", seed: int = 0):
        super().__init__(n_bits, n_classes)
        self.register_buffer("centers", hash_centers(n_classes, n_bits, centers, seed))

    def forward(self, codes: Tensor, labels: Tensor) -> Tensor:
        y = labels.to(codes.dtype)
        has_label = y.sum(1) > 0
        if not bool(has_label.any()):
            return codes.sum() * 0.0
        center = binarize(y[has_label] @ self.centers.to(codes.dtype))
        prob = ((codes[has_label] + 1) / 2).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(prob, (center + 1) / 2)


class CombinedLoss(nn.Module):
    """Weighted sum of named losses.

    ``spec`` maps a loss name to its weight, or to a dict ``{"weight": w, **kwargs}``::

        CombinedLoss({"classification": 1.0, "pairwise_similarity": 1.0,
                      "quantization": {"weight": 0.1}}, n_bits=64, n_classes=24)

    Calling it returns ``(total, {name: value})``.
    """

    def __init__(self, spec: Mapping[str, float | Mapping[str, Any]], n_bits: int, n_classes: int):
        super().__init__()
        if not spec:
            raise ValueError("at least one loss is needed")
        self.weights: dict[str, float] = {}
        self.losses = nn.ModuleDict()
        for name, cfg in spec.items():
            cfg = dict(cfg) if isinstance(cfg, Mapping) else {"weight": cfg}
            weight = float(cfg.pop("weight", 1.0))
            if not math.isfinite(weight):
                raise ValueError(f"loss {name!r}: weight must be finite, got {weight}")
            self.losses[name] = LOSSES.create(name, n_bits=n_bits, n_classes=n_classes, **cfg)
            self.weights[name] = weight
        if all(w == 0 for w in self.weights.values()):
            warnings.warn("every loss weight is 0: the model will not learn", stacklevel=2)

    def forward(self, codes: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: loss(codes, labels) for name, loss in self.losses.items()}
        total = sum(self.weights[n] * v for n, v in parts.items())
        return total, parts

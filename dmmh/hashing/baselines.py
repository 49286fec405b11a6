"""Unsupervised hashing baselines on feature vectors: random-projection LSH and PCA-ITQ.

Both are fitted on training features and encode any features to ±1 codes ``(N, n_bits)``
(float32, ``x >= 0 → +1`` as everywhere in dmmh), ready for :func:`dmmh.metrics.mean_average_precision`.

- :class:`RandomProjectionLSH` (Charikar's SimHash): ``sign((x - mean) W)``, ``W`` Gaussian
  ``(dim, n_bits)`` drawn from ``seed``. Centring on the train mean balances the bits.
- :class:`PCAITQ` (Gong & Lazebnik, "Iterative Quantization", CVPR 2011): centre, project on the
  top ``n_bits`` principal directions, then learn an orthogonal rotation ``R`` that minimises the
  quantisation error ``||B - V R||_F`` by alternating ``B = sign(V R)`` and ``R = U Ŵᵀ`` from the
  SVD ``Vᵀ B = U S Ŵᵀ`` (orthogonal Procrustes), starting from a random orthogonal ``R``.

Arrays in and out are numpy; the fitting runs in torch float64.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["HashingBaseline", "RandomProjectionLSH", "PCAITQ", "sign_codes"]


def sign_codes(z: np.ndarray) -> np.ndarray:
    """±1 float32 codes with ``z >= 0 → +1``."""
    return np.where(z >= 0, 1.0, -1.0).astype(np.float32)


class HashingBaseline:
    """``fit(train)`` then ``encode(x)``; ``fit_encode`` does both on the same features."""

    def __init__(self, n_bits: int, seed: int = 0):
        if int(n_bits) < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        self.n_bits, self.seed = int(n_bits), int(seed)
        self.mean: np.ndarray | None = None

    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"{type(self).__name__}.{what}: expected features (items >= 1, dim), got shape {x.shape}")
        if not np.isfinite(x).all():
            r, c = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(f"{type(self).__name__}.{what}: features contain {x[r, c]} at row {r}, column {c}")
        if self.mean is not None and x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"{type(self).__name__}.{what}: features have {x.shape[1]} columns, fitted on {self.mean.shape[0]}")
        return x

    def fit(self, x: np.ndarray) -> "HashingBaseline":  # pragma: no cover - interface
        raise NotImplementedError

    def project(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - interface
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> np.ndarray:
        """±1 codes ``(N, n_bits)`` of features ``x``."""
        if self.mean is None:
            raise RuntimeError(f"{type(self).__name__}: call fit() before encode()")
        return sign_codes(self.project(self._check(x, "encode")))

    def fit_encode(self, x: np.ndarray) -> np.ndarray:
        return self.fit(x).encode(x)


class RandomProjectionLSH(HashingBaseline):
    """Random-projection LSH: ``sign((x - mean) W)``, ``W ~ N(0, 1)^(dim × n_bits)``."""

    def fit(self, x: np.ndarray) -> "RandomProjectionLSH":
        self.mean = None
        x = self._check(x, "fit")
        self.mean = x.mean(0)
        self.weight = np.random.default_rng(self.seed).standard_normal((x.shape[1], self.n_bits))
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.weight


class PCAITQ(HashingBaseline):
    """PCA to ``n_bits`` dimensions, then ITQ's learned rotation (``n_iter`` alternations).

    After :meth:`fit`: ``components (dim, n_bits)``, ``rotation (n_bits, n_bits)``, and
    ``quantization_loss``, the value of ``||B - V R||_F²`` after each iteration (non-increasing).
    """

    def __init__(self, n_bits: int, n_iter: int = 50, seed: int = 0):
        super().__init__(n_bits, seed)
        if int(n_iter) < 0:
            raise ValueError(f"n_iter must be >= 0, got {n_iter}")
        self.n_iter = int(n_iter)

    def fit(self, x: np.ndarray) -> "PCAITQ":
        self.mean = None
        x = self._check(x, "fit")
        if self.n_bits > min(x.shape):
            raise ValueError(
                f"PCAITQ: {self.n_bits} bits need at least {self.n_bits} items and {self.n_bits} feature columns "
                f"(PCA directions), got features of shape {x.shape}"
            )
        # linear algebra in torch (float64): it honours torch.set_num_threads, numpy's BLAS may not
        t = torch.from_numpy(x)
        mean = t.mean(0)
        centred = t - mean
        _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues: principal directions last
        components = vectors.flip(1)[:, : self.n_bits]
        v = centred @ components
        gen = torch.Generator().manual_seed(self.seed)
        rotation, _ = torch.linalg.qr(torch.randn(self.n_bits, self.n_bits, generator=gen, dtype=torch.float64))
        self.quantization_loss = []
        for _ in range(self.n_iter):
            b = torch.where(v @ rotation >= 0, 1.0, -1.0).to(torch.float64)
            u, _, wt = torch.linalg.svd(v.T @ b)
            rotation = u @ wt
            self.quantization_loss.append(float(((b - v @ rotation) ** 2).sum()))
        self.components, self.rotation, self.mean = components.numpy(), rotation.numpy(), mean.numpy()
        return self

    def project(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) @ self.components @ self.rotation

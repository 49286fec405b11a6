"""Input validation shared by every component: clear errors instead of silent wrong results."""

from __future__ import annotations

import torch
from torch import Tensor


def check_features(x: Tensor, expected_dim: int, what: str) -> None:
    """``x`` must be a finite float matrix ``(B, expected_dim)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{what}: expected shape (batch, {expected_dim}), got {tuple(x.shape)}")
    if x.shape[1] != expected_dim:
        raise ValueError(
            f"{what}: feature width {x.shape[1]} differs from the {expected_dim} the encoder was built for "
            f"(shape {tuple(x.shape)})"
        )
    check_finite(x, what)


def check_finite(x: Tensor, what: str) -> None:
    # a sum is one cheap pass (30x faster than isfinite().all()) and is finite whenever every value is,
    # unless finite values overflow it: then (and for NaN/inf) the elementwise check decides
    if x.is_floating_point() and not bool(torch.isfinite(x.detach().sum())) and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        raise ValueError(f"{what}: contains NaN or inf (first at index {tuple(bad)})")


NAN_POLICIES = ("error", "zero")


def check_codes(x: Tensor, what: str, nan: str = "error", packed_ok: bool = False) -> None:
    """The one rule for unpacked binary codes, used by ``pack_bits``, ``HammingIndex`` and the metrics.

    Accepted: floating codes (±1 or relaxed, ±inf included; bit = ``x >= 0``) and ``bool`` bits.
    Refused with a ``ValueError`` that says what to pass instead:

    * integer dtypes: are they 0/1 bits or ±1 signs? (``uint8`` is refused here too; callers that
      read it as packed codes handle it before calling, and say so with ``packed_ok``);
    * floats holding only 0 and 1 (both present): bits stored as numbers, which the sign rule would
      read as all ones;
    * NaN, unless ``nan="zero"``, which maps NaN to bit 0 (``NaN >= 0`` is false).

    Costs one min/max pass over floating input (a device sync on CUDA).
    """
    if nan not in NAN_POLICIES:
        raise ValueError(f"{what}: nan must be one of {NAN_POLICIES}, got {nan!r}")
    if x.dtype == torch.bool:
        return
    if x.is_complex():
        raise TypeError(f"{what}: complex codes are not supported ({x.dtype})")
    if not x.is_floating_point():
        packed = ", or packed uint8 (N, n_bits / 8)" if packed_ok else " (uint8 is read as packed codes elsewhere in dmmh)"
        raise ValueError(
            f"{what}: integer codes ({x.dtype}) are ambiguous (0/1 bits or ±1 signs?); pass bool bits "
            f"(e.g. codes > 0) or ±1 floats (e.g. codes.float()){packed}"
        )
    if x.numel() == 0:
        return
    x = x.detach()
    lo, hi = torch.aminmax(x)  # NaN propagates: one pass finds NaN and the 0/1 range
    if bool(torch.isnan(lo)):
        isnan = torch.isnan(x)
        if nan == "error":
            first = tuple(isnan.nonzero()[0].tolist())
            raise ValueError(
                f"{what}: contains NaN (first at index {first}); NaN has no sign. Fix the model's output, or map "
                f"NaN to bit 0 explicitly with pack_bits(codes, nan='zero') and pass the packed codes"
            )
        rest = x[~isnan]
        if rest.numel() == 0:
            return
        lo, hi = torch.aminmax(rest)
        x = rest
    if bool(lo == 0) and bool(hi == 1) and bool(((x == 0) | (x == 1)).all()):
        raise ValueError(
            f"{what}: values are all 0/1, which the sign rule (x >= 0 → 1) would read as all ones; "
            f"pass ±1 codes (2 * bits - 1), bool bits{', or packed uint8' if packed_ok else ''}"
        )


def check_labels(y: Tensor, what: str = "label", n_classes: int | None = None) -> None:
    """``y`` must be a multi-hot {0, 1} matrix ``(B, C)``."""
    if y.ndim != 2:
        raise ValueError(f"{what}: expected multi-hot shape (batch, classes), got {tuple(y.shape)}")
    if n_classes is not None and y.shape[1] != n_classes:
        raise ValueError(f"{what}: {y.shape[1]} classes, expected {n_classes} (shape {tuple(y.shape)})")
    bad = (y != 0) & (y != 1)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"{what}: labels must be 0/1 (multi-hot); found {y[row, col].item()!r} at row {row}, column {col}")


def check_same_batch(named: dict[str, Tensor | None]) -> int:
    """All present tensors share their first dimension; returns it."""
    sizes = {k: v.shape[0] for k, v in named.items() if v is not None}
    if not sizes:
        raise ValueError(f"expected at least one of {', '.join(named)}, got none")
    if len(set(sizes.values())) > 1:
        raise ValueError("batch sizes differ between modalities: " + ", ".join(f"{k}={n}" for k, n in sizes.items()))
    return next(iter(sizes.values()))

"""Causal depthwise convolution (the Mamba layer's ``conv1d``): a reference and a C++ CPU kernel.

Both paths take the signature of the causal-conv1d package's ``causal_conv1d_fn`` (what mamba-ssm
uses on GPUs)::

    out_t = act(bias + sum_k weight[:, k] * x_{t - width + 1 + k})     x_{<0} = 0,  act = silu or identity

with ``x (b, d, l)``, ``weight (d, width)``, ``bias (d,)`` optional and ``activation`` ``None`` or
``"silu"``. Backends (``backend=``): ``"ref"`` ``F.conv1d`` with left padding (any device; the tests'
oracle); ``"cpu"`` the C++ kernel (``mamba_cpu.cpp``): one pass over a channels-contiguous ``x`` (a
transposed view of a ``(b, l, d)`` activation is one; other layouts are copied) with the activation
fused, computing in float32 (float64 for float64 inputs), output in ``x``'s dtype; ``"auto"`` the
kernel for CPU tensors when it builds, else ``"ref"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dmmh.ops import _cpp

__all__ = ["causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_cpu", "CONV_BACKENDS"]

CONV_BACKENDS = ("auto", "ref", "cpu")


def causal_conv1d_fn(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
                     *, backend: str = "auto") -> Tensor:
    """The causal depthwise convolution on the chosen ``backend`` (see the module docstring)."""
    if backend not in CONV_BACKENDS:
        raise ValueError(f"causal conv1d backend must be one of {CONV_BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cpu" if x.device.type == "cpu" and _cpp.available() else "ref"
    return (causal_conv1d_cpu if backend == "cpu" else causal_conv1d_ref)(x, weight, bias, activation)


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    if x.ndim != 3:
        raise ValueError(f"causal conv1d: x must be (batch, channels, length), got shape {tuple(x.shape)}")
    if weight.ndim != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"causal conv1d: weight must be (channels, width) = ({x.shape[1]}, width), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (x.shape[1],):
        raise ValueError(f"causal conv1d: bias has shape {tuple(bias.shape)}, expected ({x.shape[1]},)")
    if activation not in (None, "silu"):
        raise ValueError(f"causal conv1d: activation must be None or 'silu', got {activation!r}")


def causal_conv1d_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``F.conv1d`` with ``width - 1`` zeros of left padding (autograd gives its gradients): the oracle."""
    _check(x, weight, bias, activation)
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[1] - 1, groups=x.shape[1])[..., : x.shape[2]]
    return F.silu(out) if activation == "silu" else out


class _CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        dtype = _cpp.compute_dtype(x, weight, bias)
        ins = (_cpp.channels_last(x, dtype), weight.to(dtype), None if bias is None else bias.to(dtype).contiguous())
        ctx.save_for_backward(*ins)
        ctx.meta = (silu, dtype, x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _cpp.load().causal_conv1d_fwd(*ins, silu).to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        silu, dtype, *dtypes = ctx.meta
        dx, dw, db = _cpp.load().causal_conv1d_bwd(*ctx.saved_tensors, silu, _cpp.channels_last(dout, dtype))
        return dx.to(dtypes[0]), dw.to(dtypes[1]), None if dtypes[2] is None else db.to(dtypes[2]), None


def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    """The C++ kernel (CPU tensors; see the module docstring)."""
    _check(x, weight, bias, activation)
    if x.device.type != "cpu":
        raise ValueError(f"causal conv1d backend 'cpu' needs CPU tensors; x is on {x.device} (use 'ref' or 'auto')")
    _cpp.load()  # raises KernelUnavailable with the compiler's message
    silu = activation == "silu"
    if _cpp.needs_grad(x, weight, bias):
        return _CausalConv1dCPU.apply(x, weight, bias, silu)
    dtype = _cpp.compute_dtype(x, weight, bias)
    b = None if bias is None else bias.to(dtype).contiguous()
    return _cpp.load().causal_conv1d_fwd(_cpp.channels_last(x, dtype), weight.to(dtype), b, silu).to(x.dtype)

"""Low-level operators of the Mamba layer, each path beside the reference it must equal: the selective
scan (reference loop, C++ CPU kernel, pure-PyTorch path, mamba-ssm's CUDA kernel) and the causal
depthwise convolution (reference, C++ CPU kernel)."""

from dmmh.ops.causal_conv1d import CONV_BACKENDS, causal_conv1d_cpu, causal_conv1d_fn, causal_conv1d_ref
from dmmh.ops.selective_scan import (
    BACKENDS, resolve_backend, selective_scan_cpu, selective_scan_fn, selective_scan_ref, selective_scan_torch,
)

__all__ = [
    "BACKENDS", "resolve_backend", "selective_scan_fn", "selective_scan_ref", "selective_scan_cpu", "selective_scan_torch",
    "CONV_BACKENDS", "causal_conv1d_fn", "causal_conv1d_ref", "causal_conv1d_cpu",
]

"""Low-level operators: the selective scan (reference loop, fast pure-PyTorch path, mamba-ssm's CUDA kernel)."""

from dmmh.ops.selective_scan import BACKENDS, resolve_backend, selective_scan_cpu, selective_scan_fn, selective_scan_ref

__all__ = ["BACKENDS", "resolve_backend", "selective_scan_fn", "selective_scan_ref", "selective_scan_cpu"]

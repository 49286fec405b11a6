"""Causal depthwise convolution: the C++ kernel against the reference, the reference against a plain loop."""

import numpy as np
import pytest
import torch

from dmmh.ops import causal_conv1d_fn, causal_conv1d_ref


@pytest.fixture(autouse=True)
def _fresh_inputs(rng):
    torch.manual_seed(int(rng.integers(2**63)))


def loop_conv(x, w, bias, silu):
    """out[b, c, t] = act(bias[c] + sum_k w[c, k] x[b, c, t - K + 1 + k]), one number at a time."""
    x, w = x.detach().double().numpy(), w.detach().double().numpy()
    b_, d, l = x.shape
    K = w.shape[1]
    out = np.zeros_like(x)
    for i in range(b_):
        for c in range(d):
            for t in range(l):
                v = bias[c].item() if bias is not None else 0.0
                for k in range(K):
                    s = t - K + 1 + k
                    v += w[c, k] * x[i, c, s] if s >= 0 else 0.0
                out[i, c, t] = v / (1 + np.exp(-v)) if silu else v
    return out


@pytest.mark.parametrize("silu", [False, True])
def test_reference_equals_loop(silu):
    x, w, bias = torch.randn(2, 5, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    got = causal_conv1d_ref(x, w, bias, "silu" if silu else None)
    np.testing.assert_allclose(got.numpy(), loop_conv(x, w, bias, silu), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("b,d,l,K", [(2, 5, 7, 4), (3, 40, 33, 3), (2, 20, 3, 4), (1, 17, 1, 1), (1, 16, 9, 6),
                                     (2, 24, 150, 4), (1, 1, 5, 4)])  # 150 steps: tasks of 64 steps
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_kernel_equals_reference(b, d, l, K, bias, activation, layout):
    x = torch.randn(b, d, l)
    if layout == "channels_last":  # what the Mamba layer passes: a transposed view of a (b, l, d) activation
        x = torch.randn(b, l, d).transpose(1, 2)
    x.requires_grad_()
    w = torch.randn(d, K, requires_grad=True)
    bb = torch.randn(d, requires_grad=True) if bias else None
    g = torch.randn(b, d, l)
    ins = [t for t in (x, w, bb) if t is not None]
    res = []
    for backend in ("ref", "cpu"):
        out = causal_conv1d_fn(x, w, bb, activation, backend=backend)
        res.append([out, *torch.autograd.grad((out * g).sum(), ins)])
    for got, want in zip(*res[::-1]):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_cpu_kernel_gradcheck_float64():
    x = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d_fn(*a, "silu", backend="cpu"), (x, w, b))


def test_bf16_input_keeps_its_dtype_and_no_grad_path_matches():
    x, w, b = torch.randn(2, 24, 10), torch.randn(24, 4), torch.randn(24)
    out = causal_conv1d_fn(x.bfloat16(), w, b, "silu", backend="cpu")
    ref = causal_conv1d_fn(x.bfloat16().float(), w, b, "silu", backend="ref")  # the kernel computes in float32
    assert out.dtype == torch.bfloat16 and (out.float() - ref.float()).abs().max() <= 2**-7 * ref.abs().max()
    with torch.inference_mode():
        assert torch.equal(causal_conv1d_fn(x, w, b, "silu", backend="cpu"), causal_conv1d_fn(x.requires_grad_(), w, b, "silu", backend="cpu"))


def test_errors_name_the_argument():
    x = torch.randn(2, 4, 5)
    with pytest.raises(ValueError, match=r"weight must be \(channels, width\) = \(4, width\)"):
        causal_conv1d_fn(x, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        causal_conv1d_fn(x, torch.randn(4, 2), torch.randn(3))
    with pytest.raises(ValueError, match="activation must be None or 'silu'"):
        causal_conv1d_fn(x, torch.randn(4, 2), activation="relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        causal_conv1d_fn(x, torch.randn(4, 2), backend="cuda")

"""Selective scan: every backend against the per-step loop and an independent numpy recurrence."""

import itertools

import numpy as np
import pytest
import torch

import dmmh.ops.selective_scan as ss
from dmmh._optional import MissingDependencyError, available
from dmmh.ops import selective_scan_fn, selective_scan_ref

RTOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the reference's largest magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def make(b=2, d=6, l=5, n=3, bc="shared", groups=2, dtype=torch.float32, device="cpu", requires_grad=True):
    """Fresh random inputs; ``bc``: "shared" (b, n, l), "constant" (d, n), "grouped" (b, g, n, l)."""
    shapes = {"shared": (b, n, l), "constant": (d, n), "grouped": (b, groups, n, l)}[bc]
    t = lambda *s, scale=1.0: (torch.randn(*s, dtype=dtype) * scale).to(device)  # noqa: E731
    ins = dict(u=t(b, d, l), delta=t(b, d, l, scale=0.5), A=-torch.rand(d, n, dtype=dtype).to(device) * 2 - 0.1,
               B=t(*shapes), C=t(*shapes), D=t(d), z=t(b, d, l), delta_bias=t(d, scale=0.5))
    return {k: v.requires_grad_(requires_grad) for k, v in ins.items()}


def numpy_scan(u, delta, A, B, C, D, z, delta_bias, softplus):
    """An independent float64 recurrence, one (batch, channel) at a time."""
    u, delta, A, B, C = (x.detach().double().numpy() for x in (u, delta, A, B, C))
    b, d, l = u.shape
    out, last = np.zeros((b, d, l)), np.zeros((b, d, A.shape[1]))
    for i, c in itertools.product(range(b), range(d)):
        dt = delta[i, c] + (delta_bias[c].item() if delta_bias is not None else 0.0)
        dt = np.log1p(np.exp(dt)) if softplus else dt
        x = np.zeros(A.shape[1])
        for t in range(l):
            Bt = B[c] if B.ndim == 2 else (B[i, :, t] if B.ndim == 3 else B[i, c // (d // B.shape[1]), :, t])
            Ct = C[c] if C.ndim == 2 else (C[i, :, t] if C.ndim == 3 else C[i, c // (d // C.shape[1]), :, t])
            x = np.exp(dt[t] * A[c]) * x + dt[t] * u[i, c, t] * Bt
            y = x @ Ct + (D[c].item() * u[i, c, t] if D is not None else 0.0)
            out[i, c, t] = y * (z[i, c, t].item() / (1 + np.exp(-z[i, c, t].item())) if z is not None else 1.0)
        last[i, c] = x
    return out, last


@pytest.mark.parametrize("bc", ["shared", "constant", "grouped"])
def test_reference_equals_numpy_recurrence(bc):
    ins = make(bc=bc, dtype=torch.float64, requires_grad=False)
    out, last = selective_scan_ref(**ins, delta_softplus=True, return_last_state=True)
    want_out, want_last = numpy_scan(**ins, softplus=True)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(last.numpy(), want_last, rtol=1e-10, atol=1e-12)


CASES = [
    # (bc, with D, with z, with delta_bias, softplus, return_last_state)
    ("shared", True, True, True, True, True),
    ("shared", False, False, False, False, False),
    ("shared", True, False, True, False, True),
    ("shared", False, True, False, True, False),
    ("constant", True, True, True, True, True),
    ("grouped", True, True, False, True, True),
]


@pytest.mark.parametrize("bc,use_D,use_z,use_bias,softplus,last", CASES)
def test_fast_path_equals_reference_forward_and_gradients(bc, use_D, use_z, use_bias, softplus, last):
    ins = make(b=3, d=8, l=9, n=4, bc=bc)
    if not use_D:
        ins["D"] = None
    if not use_z:
        ins["z"] = None
    if not use_bias:
        ins["delta_bias"] = None
    present = {k: v for k, v in ins.items() if v is not None}
    g_out = torch.randn(3, 8, 9)  # a random cotangent: every output element matters
    results = []
    for backend in ("ref", "cpu"):
        res = selective_scan_fn(**ins, delta_softplus=softplus, return_last_state=last, backend=backend)
        out, state = res if last else (res, None)
        loss = (out * g_out).sum() + ((state * state).sum() if last else 0)
        results.append((out, state, torch.autograd.grad(loss, list(present.values()))))
    (o_ref, s_ref, g_ref), (o_cpu, s_cpu, g_cpu) = results
    assert o_cpu.shape == o_ref.shape == ins["u"].shape and o_cpu.dtype == torch.float32
    assert rel_err(o_cpu, o_ref) <= RTOL
    if last:
        assert s_cpu.shape == (3, 8, 4) and rel_err(s_cpu, s_ref) <= RTOL
    for name, a, b in zip(present, g_cpu, g_ref):
        assert a.shape == present[name].shape, name
        assert rel_err(a, b) <= RTOL, f"gradient of {name}: relative error {rel_err(a, b):.2e}"


def test_fast_path_gradcheck_float64():
    ins = make(b=2, d=4, l=4, n=2, bc="grouped", dtype=torch.float64)
    fn = lambda *xs: ss.selective_scan_cpu(*xs, delta_softplus=True, return_last_state=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ins.values()))


def test_fast_path_blocks_and_edge_lengths(monkeypatch):
    """Several batch blocks (uneven last block), one step, one item: still the reference."""
    monkeypatch.setattr(ss, "_BLOCK_ELEMENTS", 2 * 7 * 4 * 3)  # two items per block
    for b, l in ((5, 7), (1, 1), (3, 1), (1, 6)):
        ins = make(b=b, d=4, l=l, n=3)
        outs = [selective_scan_fn(**ins, delta_softplus=True, return_last_state=True, backend=k) for k in ("ref", "cpu")]
        assert rel_err(outs[1][0], outs[0][0]) <= RTOL and rel_err(outs[1][1], outs[0][1]) <= RTOL
        grads = [torch.autograd.grad(o.sum() + s.sum(), list(ins.values())) for o, s in outs]
        for a, r in zip(*grads):
            assert rel_err(a, r) <= RTOL


def test_half_precision_inputs_keep_their_dtype():
    ins = make(b=2, d=4, l=5, n=3, requires_grad=False)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v for k, v in ins.items()}
    out = selective_scan_fn(**half, delta_softplus=True, backend="cpu")
    ref = selective_scan_fn(**half, delta_softplus=True, backend="ref")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)  # bf16 tolerances: two float32 paths may round to neighbouring bf16 values


def test_shape_errors_name_the_argument():
    ins = make(requires_grad=False)
    with pytest.raises(ValueError, match=r"delta has shape \(2, 6, 4\), expected \(2, 6, 5\)"):
        selective_scan_fn(**{**ins, "delta": ins["delta"][..., :4]})
    with pytest.raises(ValueError, match=r"B has shape \(2, 4, 3, 5\).*g dividing 6"):
        selective_scan_fn(**{**ins, "B": torch.randn(2, 4, 3, 5)})
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_fn(**{**ins, "A": torch.randn(5, 3)})
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan_fn(**ins, backend="gpu")


def test_auto_uses_the_fast_path_on_cpu_and_cuda_backend_needs_mamba_ssm():
    ins = make(requires_grad=False)
    assert ss.resolve_backend("auto", ins["u"]) == "cpu"
    if available("selective_scan_cuda"):
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            selective_scan_fn(**ins, backend="cuda")
    else:
        with pytest.raises(MissingDependencyError, match=r"mamba-ssm.*dmmh\[gpu\]"):
            selective_scan_fn(**ins, backend="cuda")


def test_auto_falls_back_for_dtypes_the_cuda_kernel_rejects(monkeypatch):
    """mamba-ssm's kernel takes fp32/fp16/bf16 only; 'auto' must not send it float64 (checked with a stand-in tensor)."""
    from types import SimpleNamespace

    monkeypatch.setattr(ss, "_cuda_kernel_available", lambda: True)
    assert ss.resolve_backend("auto", SimpleNamespace(is_cuda=True, dtype=torch.float32)) == "cuda"
    assert ss.resolve_backend("auto", SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "cpu"


def test_import_dmmh_does_not_import_mamba_ssm():
    import subprocess
    import sys

    code = "import sys, dmmh, dmmh.ops; print(any(m.split('.')[0] in ('mamba_ssm', 'selective_scan_cuda') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.cuda
@pytest.mark.parametrize("bc", ["shared", "grouped"])
def test_cuda_path_equals_mamba_ssm_kernel_and_reference(bc):
    pytest.importorskip("selective_scan_cuda")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as mamba_fn

    ins = make(b=4, d=64, l=128, n=16, bc=bc, device="cuda")
    res = {}
    for name, fn in {
        "dmmh_cuda": lambda **kw: selective_scan_fn(**kw, backend="cuda"),
        "mamba": lambda **kw: mamba_fn(**kw),
        "dmmh_cpu_path": lambda **kw: selective_scan_fn(**kw, backend="cpu"),
        "ref": lambda **kw: selective_scan_fn(**kw, backend="ref"),
    }.items():
        out, last = fn(**ins, delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad(out.sum(), list(ins.values()))
        res[name] = (out, last, grads)
    assert torch.equal(res["dmmh_cuda"][0], res["mamba"][0])  # the same kernel on the same inputs
    for a, r in zip(res["dmmh_cuda"][2], res["mamba"][2]):
        assert rel_err(a, r) <= 1e-6  # its backward may accumulate with atomics, in any order
    for name in ("dmmh_cuda", "dmmh_cpu_path"):
        out, last, grads = res[name]
        assert rel_err(out, res["ref"][0]) <= RTOL and rel_err(last, res["ref"][1]) <= RTOL
        for a, r in zip(grads, res["ref"][2]):
            assert rel_err(a, r) <= RTOL, name

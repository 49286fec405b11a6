"""Selective scan: every backend against the per-step loop and an independent numpy recurrence."""

import itertools
import os
import warnings

import numpy as np
import pytest
import torch

import dmmh.ops.selective_scan as ss
from dmmh._optional import MissingDependencyError, available
from dmmh.ops import _cpp, selective_scan_fn, selective_scan_ref

RTOL = 1e-5
FAST = ("cpu", "torch")  # the C++ kernel and the pure-PyTorch path


@pytest.fixture(autouse=True)
def _fresh_inputs(rng):
    """torch's generator seeded from the printed ``rng`` seed: fresh inputs every run, reproducible from the log."""
    torch.manual_seed(int(rng.integers(2**63)))


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


def channels_last(t):
    """The same values with contiguous channels, as the Mamba layer passes them (a transposed (b, l, d) tensor)."""
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


def scan_and_grads(backend, ins, softplus=True, last=True, g_out=None):
    """Output, last state and the gradients of every present input under a random cotangent."""
    present = {k: v for k, v in ins.items() if v is not None}
    res = selective_scan_fn(**ins, delta_softplus=softplus, return_last_state=last, backend=backend)
    out, state = res if last else (res, None)
    g_out = torch.randn(out.shape, dtype=out.dtype) if g_out is None else g_out
    loss = (out * g_out).sum() + ((state * state).sum() if last else 0)
    return out, state, dict(zip(present, torch.autograd.grad(loss, list(present.values()))))


def assert_same(got, want, rtol=RTOL, what=""):
    (o, s, g), (o_ref, s_ref, g_ref) = got, want
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype
    assert rel_err(o, o_ref) <= rtol, f"{what} output: {rel_err(o, o_ref):.2e}"
    if s_ref is not None:
        assert s.shape == s_ref.shape and rel_err(s, s_ref) <= rtol, f"{what} last state"
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        assert g[name].shape == g_ref[name].shape and g[name].dtype == g_ref[name].dtype, f"{what} gradient of {name}"
        assert rel_err(g[name], g_ref[name]) <= rtol, f"{what} gradient of {name}: relative error {rel_err(g[name], g_ref[name]):.2e}"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bc,use_D,use_z,use_bias,softplus,last", CASES)
def test_fast_path_equals_reference_forward_and_gradients(backend, bc, use_D, use_z, use_bias, softplus, last):
    ins = make(b=3, d=8, l=9, n=4, bc=bc)
    if not use_D:
        ins["D"] = None
    if not use_z:
        ins["z"] = None
    if not use_bias:
        ins["delta_bias"] = None
    g_out = torch.randn(3, 8, 9)  # a random cotangent: every output element matters
    want = scan_and_grads("ref", ins, softplus, last, g_out)
    assert_same(scan_and_grads(backend, ins, softplus, last, g_out), want, what=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("b,d,l,n,bc,groups", [
    (2, 40, 70, 5, "shared", 1),      # two 16-channel blocks and a partial one; two 64-step chunks in the backward
    (1, 20, 130, 16, "grouped", 2),   # groups of 10 channels (partial blocks); three chunks
    (3, 33, 64, 3, "constant", 1),    # exactly one chunk
    (2, 24, 65, 4, "grouped", 3),     # one step past a chunk
])
def test_fast_paths_across_blocks_and_chunks(backend, b, d, l, n, bc, groups):
    ins = make(b=b, d=d, l=l, n=n, bc=bc, groups=groups)
    g_out = torch.randn(b, d, l)
    assert_same(scan_and_grads(backend, ins, g_out=g_out), scan_and_grads("ref", ins, g_out=g_out), what=backend)


@pytest.mark.parametrize("backend", FAST)
def test_layer_layout_inputs(backend):
    """What the Mamba layer passes: channels-contiguous u/delta/z and strided (b, n, l) views of one (b, l, r + 2n) tensor."""
    b, d, l, n = 3, 20, 11, 4
    ins = make(b=b, d=d, l=l, n=n, requires_grad=False)
    proj = torch.randn(b, l, 2 + 2 * n)
    ins.update(u=channels_last(ins["u"]), delta=channels_last(ins["delta"]), z=channels_last(ins["z"]),
               B=proj[..., 2 : 2 + n].transpose(1, 2), C=proj[..., 2 + n :].transpose(1, 2))
    assert ins["B"].stride() == (l * (2 + 2 * n), 1, 2 + 2 * n) and ins["u"].stride(1) == 1
    for t in ins.values():
        t.requires_grad_()
    g_out = torch.randn(b, d, l)
    assert_same(scan_and_grads(backend, ins, g_out=g_out), scan_and_grads("ref", ins, g_out=g_out), what=backend)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bc", ["shared", "constant"])
def test_fast_path_gradcheck_float64(backend, bc):
    ins = make(b=2, d=4, l=4, n=2, bc=bc, dtype=torch.float64)
    fn = lambda *xs: selective_scan_fn(*xs, delta_softplus=True, return_last_state=True, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(ins.values()))
    grouped = make(b=2, d=4, l=70, n=2, bc="grouped", dtype=torch.float64)  # and across a saved state (64 steps)
    assert torch.autograd.gradcheck(fn, tuple(grouped.values()), fast_mode=True)


def test_torch_path_blocks_and_edge_lengths(monkeypatch):
    """Several batch blocks (uneven last block), several chunks of steps, one step, one item: still the reference."""
    monkeypatch.setattr(ss, "_BLOCK_ELEMENTS", 2 * 4 * 3)  # blocks of two items, chunks of four steps
    for b, l in ((5, 7), (1, 1), (3, 1), (1, 6)):
        ins = make(b=b, d=4, l=l, n=3)
        g_out = torch.randn(b, 4, l)
        assert_same(scan_and_grads("torch", ins, g_out=g_out), scan_and_grads("ref", ins, g_out=g_out), what=f"{(b, l)}")


@pytest.mark.parametrize("backend", FAST)
def test_edge_shapes(backend):
    """One item, one step, one channel, one state, no steps at all (float64: a one-channel gradient is a sum of
    a few terms whose cancellation float32 rounding can make differ by 1e-4 between two summation orders)."""
    for b, d, l, n in ((1, 1, 1, 1), (1, 17, 1, 2), (2, 3, 0, 2), (1, 1, 5, 1)):
        ins = make(b=b, d=d, l=l, n=n, groups=1, dtype=torch.float64)
        g_out = torch.randn(b, d, l, dtype=torch.float64)
        got = scan_and_grads(backend, ins, g_out=g_out)
        if l == 0:  # the reference cannot stack zero steps' gradients; the answer is known
            assert got[0].shape == (b, d, 0) and torch.equal(got[1], torch.zeros(b, d, n, dtype=torch.float64))
            continue
        assert_same(got, scan_and_grads("ref", ins, g_out=g_out), rtol=1e-9, what=f"{backend} {(b, d, l, n)}")


@pytest.mark.parametrize("backend", FAST)
def test_extreme_values(backend):
    """Softplus past its threshold (|delta| > 20), saturated gates, decays that underflow to 0; NaN propagates."""
    ins = make(b=2, d=20, l=12, n=4, requires_grad=False)
    ins["delta"] = ins["delta"] * 60  # softplus(x) = x past 20, ~e^x far below
    ins["z"] = ins["z"] * 40
    ins["A"] = ins["A"] * 50  # exp(dt A) down to 0
    for t in ins.values():
        t.requires_grad_()
    g_out = torch.randn(2, 20, 12)
    assert_same(scan_and_grads(backend, ins, g_out=g_out), scan_and_grads("ref", ins, g_out=g_out), what=backend)
    with torch.no_grad():
        u = ins["u"].detach().clone()
        u[1, 3, 5] = float("nan")
        out = selective_scan_fn(**{**ins, "u": u}, delta_softplus=True, backend=backend)
    assert torch.isnan(out[1, 3, 5:]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[1, 3, :5]).all()


def low_rank(ins, r, wide=3):
    """``ins`` with delta in low rank: a strided (b, r, l) view (as the Mamba layer's x_proj output gives it) and
    the (d, r) projection; and the full delta the test computes from them by a plain einsum."""
    b, d, l = ins["u"].shape
    rows = torch.randn(b, l, r + wide)  # r columns of a wider row, like dt next to B and C
    low = rows[..., :r].transpose(1, 2).requires_grad_(ins["delta"].requires_grad)
    proj = (torch.randn(d, r) * r**-0.5).requires_grad_(ins["delta"].requires_grad)
    return low, proj, torch.einsum("dr,brl->bdl", proj, low)


@pytest.mark.parametrize("backend", ["ref", *FAST])
@pytest.mark.parametrize("d,r,bc", [(20, 1, "shared"), (33, 8, "grouped"), (16, 3, "constant")])
def test_low_rank_delta_equals_the_projected_delta(backend, d, r, bc):
    """``delta_proj``: outputs, last state and gradients (of the low-rank delta and of the projection too) as
    the scan of the delta the test projects itself; the kernel's fused inference path likewise."""
    ins = make(b=3, d=d, l=70, n=4, bc=bc, groups=3 if d == 33 else 2)
    low, proj, full = low_rank(ins, r)
    g_out = torch.randn(3, d, 70)
    want = scan_and_grads("ref", {**ins, "delta": full}, g_out=g_out)
    got = selective_scan_fn(**{**ins, "delta": low}, delta_softplus=True, return_last_state=True, backend=backend, delta_proj=proj)
    g_low, g_proj = torch.autograd.grad(((got[0] * g_out).sum() + (got[1] ** 2).sum()), [low, proj])
    ref_g_delta = want[2]["delta"]  # the chain rule through the test's own einsum gives the other two
    assert rel_err(got[0], want[0]) <= RTOL and rel_err(got[1], want[1]) <= RTOL
    assert rel_err(g_low, torch.einsum("dr,bdl->brl", proj, ref_g_delta)) <= RTOL
    assert rel_err(g_proj, torch.einsum("bdl,brl->dr", ref_g_delta, low)) <= RTOL
    with torch.inference_mode():  # the kernel's fused path, no gradients
        out, last = selective_scan_fn(**{**ins, "delta": low}, delta_softplus=True, return_last_state=True,
                                      backend=backend, delta_proj=proj)
    assert rel_err(out, want[0]) <= RTOL and rel_err(last, want[1]) <= RTOL


def test_low_rank_delta_errors_and_flop_count():
    ins = make(b=2, d=8, l=5, n=3, requires_grad=False)
    low, proj, _ = low_rank(ins, 2)
    for bad_low, bad_proj in ((low, proj[:5]), (low[:, :1], proj), (low[..., :4], proj)):
        for backend in ("cpu", "torch"):
            with pytest.raises(ValueError, match="delta_proj"):
                selective_scan_fn(**{**ins, "delta": bad_low}, backend=backend, delta_proj=bad_proj)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():  # the fused kernel counts what the product and the scan count apart
        with FlopCounterMode(display=False) as fused:
            selective_scan_fn(**{**ins, "delta": low}, delta_softplus=True, backend="cpu", delta_proj=proj)
        with FlopCounterMode(display=False) as apart:
            selective_scan_fn(**{**ins, "delta": (low.transpose(1, 2) @ proj.t()).transpose(1, 2)}, delta_softplus=True, backend="cpu")
    assert fused.get_total_flops() == apart.get_total_flops() == 2 * 2 * 8 * 5 * (3 + 2)  # n = 3 and r = 2


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("n", [1, 16])
def test_non_finite_steps_and_decays_give_the_references_values(backend, n):
    """dt = +inf (the kernel's clamped exponentials), dt = 0 (softplus(-inf)), a NaN in A, decays that overflow
    to inf (A > 0) or underflow far below float32's range: NaN, inf and finite values where the reference has
    them (with one state, an infinite state stays infinite instead of meeting another of the opposite sign)."""
    ins = make(b=2, d=20, l=19, n=n, requires_grad=False)
    ins["delta"][0, 2, 3], ins["delta"][1, 5, 9], ins["delta"][1, 6, 0] = float("inf"), float("-inf"), float("inf")
    ins["A"][7, -1] = float("nan")
    ins["A"][9, 0] = 40.0  # exp(40 dt) > 1: one state overflows to inf within a few steps, y with it
    ins["A"][11] = -500.0  # exp(dt A) down to e^-500 and below (subnormal, then 0)
    for c in (9, 11):  # dt > 0 there with or without softplus: the kernel flushes decays below 2^-126 to 0,
        ins["delta"][:, c], ins["delta_bias"][c] = ins["delta"][:, c].abs(), 0.0  # which times an inf state is NaN
    for softplus in (True, False):
        with torch.no_grad():
            got = selective_scan_fn(**ins, delta_softplus=softplus, backend=backend)
            want = selective_scan_ref(**ins, delta_softplus=softplus)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
        assert torch.equal(got[got.isinf()], want[want.isinf()])  # the same signs
        finite = want.isfinite()
        assert want.isnan().any() and finite.float().mean() > 0.5 and (want.isinf().any() or not softplus)
        assert rel_err(got[finite], want[finite]) <= RTOL


@pytest.mark.parametrize("backend", FAST)
def test_half_precision_inputs_keep_their_dtype(backend):
    ins = make(b=2, d=4, l=5, n=3, requires_grad=False)
    half = {k: v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v for k, v in ins.items()}
    out = selective_scan_fn(**half, delta_softplus=True, backend=backend)
    ref = selective_scan_fn(**half, delta_softplus=True, backend="ref")
    assert out.dtype == torch.bfloat16 and (out.float() - ref.float()).abs().max() <= 2 ** -7 * ref.float().abs().max()
    for t in half.values():
        t.requires_grad_()
    out, _, grads = scan_and_grads(backend, half, last=False)
    assert all(grads[k].dtype == half[k].dtype for k in grads)


def test_cpu_kernel_without_gradients_equals_its_training_forward():
    """The no-grad path (no saved states) and the autograd path run the same arithmetic."""
    ins = make(b=2, d=24, l=150, n=5)
    with_grad = selective_scan_fn(**ins, delta_softplus=True, return_last_state=True, backend="cpu")
    with torch.inference_mode():
        without = selective_scan_fn(**ins, delta_softplus=True, return_last_state=True, backend="cpu")
    assert torch.equal(with_grad[0], without[0]) and torch.equal(with_grad[1], without[1])


@pytest.mark.skipif("avx512f" not in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else True,
                    reason="without AVX-512 the default build already runs the portable loops")
def test_cpu_kernel_portable_loops_equal_the_reference():
    """The kernel's portable lane loops (what a CPU without AVX-512 runs) pass the exactness tests above: a
    build with -mno-avx512f, in a subprocess (a process holds one build)."""
    import subprocess
    import sys

    tests = "cpu and (equals_reference or blocks_and_chunks or layer_layout or extreme or non_finite or edge_shapes or without_gradients or low_rank)"
    env = {**os.environ, "DMMH_CPU_KERNEL_FLAGS": "-mno-avx512f"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0 and " passed" in run.stdout and "failed" not in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def test_cpu_kernel_leaves_subnormal_arithmetic_to_its_caller():
    """The scan flushes subnormals to zero while it runs (FTZ/DAZ) and restores the caller's setting: on the
    calling thread and on torch's intra-op threads (a tensor large enough to be split between them),
    arithmetic after it still produces and reads subnormals."""
    ins = make(b=8, d=64, l=70, n=16, requires_grad=False)
    tiny = torch.full((1 << 18,), 1e-39)  # subnormal in float32
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                selective_scan_fn(**ins, delta_softplus=True, backend="cpu")
            scan_and_grads("cpu", {k: v.clone().requires_grad_() for k, v in ins.items()})
            assert (tiny * 1.0 == tiny).all() and (tiny * 0.5).min() > 0
    finally:
        torch.set_num_threads(before)


def test_cpu_kernel_results_do_not_depend_on_the_thread_count():
    ins = make(b=8, d=64, l=70, n=16)
    g_out = torch.randn(8, 64, 70)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(scan_and_grads("cpu", ins, g_out=g_out))
    finally:
        torch.set_num_threads(before)
    (o1, s1, g1), (o2, s2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and all(torch.equal(g1[k], g2[k]) for k in g1)


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


def test_auto_uses_the_cpu_kernel_on_cpu_and_cuda_backend_needs_mamba_ssm():
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
    assert ss.resolve_backend("auto", SimpleNamespace(is_cuda=True, dtype=torch.float64)) == "torch"


def test_without_a_compiler_auto_falls_back_with_a_warning_and_cpu_says_why(monkeypatch):
    broken = (None, _cpp.KernelUnavailable("dmmh's C++ kernels are unavailable: no compiler"))
    monkeypatch.setattr(_cpp, "_load", lambda: broken)
    _cpp.available.cache_clear()
    try:
        ins = make(requires_grad=False)
        with pytest.warns(RuntimeWarning, match="no compiler.*slower pure-PyTorch"):
            assert ss.resolve_backend("auto", ins["u"]) == "torch"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process
            out = selective_scan_fn(**ins, delta_softplus=True)
        assert rel_err(out, selective_scan_ref(**ins, delta_softplus=True)) <= RTOL
        with pytest.raises(_cpp.KernelUnavailable, match="no compiler"):
            selective_scan_fn(**ins, backend="cpu")
    finally:
        _cpp.available.cache_clear()


def test_kernel_build_is_cached_per_source_flags_and_cpu(tmp_path):
    """A second process loads the cached build (no 'building' message); another source means another build."""
    import subprocess
    import sys

    _cpp.load()  # built (once) by this process if no earlier test did
    code = "import logging, torch; logging.basicConfig(); from dmmh.ops import _cpp; _cpp.load(); print(torch.ops.dmmh.selective_scan_fwd)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "building" not in run.stderr and "dmmh.selective_scan_fwd" in run.stdout
    flags = _cpp._flags()
    assert _cpp._name(flags) != _cpp._name(flags + ["-DOTHER"]) and _cpp._name(flags).startswith("dmmh_cpu_")


def test_kernel_build_clears_a_killed_builds_lock(tmp_path, monkeypatch):
    """Torch < 2.13 waits while its builder's "lock" file exists (found on the GPU machine: a build killed
    by a timeout hung every later one). dmmh's own lock must not be that file, and a stale one is removed."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    build = tmp_path / _cpp._name(_cpp._flags())
    build.mkdir()
    (build / "lock").touch()  # left by a killed build
    seen = []

    def fake_load(name, sources, build_directory, **kw):  # torch's FileBaton would wait forever on an existing file
        seen.append(os.path.exists(os.path.join(build_directory, "lock")))
        raise OSError("stop before compiling")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    ops, error = _cpp._load.__wrapped__()
    assert ops is None and "stop before compiling" in str(error) and seen == [False]
    ops, error = _cpp._load.__wrapped__()  # dmmh's own lock, left behind, does not block torch either
    assert seen == [False, False]
    library = build / f"{build.name}.so"
    library.write_bytes(b"half a library")  # a build killed while linking
    ops, error = _cpp._load.__wrapped__()
    assert seen == [False, False, False] and not library.exists()  # removed and built again


def test_cpu_backend_rejects_other_devices_and_bad_layouts():
    ins = make(requires_grad=False)
    with pytest.raises(ValueError, match="needs CPU tensors"):
        ss.resolve_backend("cpu", torch.empty(2, 3, 4, device="meta"))
    with pytest.raises(RuntimeError, match="contiguous channels"):  # the kernel checks what the wrapper guarantees
        _cpp.load().selective_scan_fwd(ins["u"], ins["delta"], ins["A"], ins["B"][:, None], ins["C"][:, None],
                                       None, None, None, True, False, False)


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
        "dmmh_torch_path": lambda **kw: selective_scan_fn(**kw, backend="torch"),
        "ref": lambda **kw: selective_scan_fn(**kw, backend="ref"),
    }.items():
        out, last = fn(**ins, delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad(out.sum(), list(ins.values()))
        res[name] = (out, last, grads)
    assert torch.equal(res["dmmh_cuda"][0], res["mamba"][0])  # the same kernel on the same inputs
    for a, r in zip(res["dmmh_cuda"][2], res["mamba"][2]):
        assert rel_err(a, r) <= 1e-6  # its backward may accumulate with atomics, in any order
    for name in ("dmmh_cuda", "dmmh_torch_path"):
        out, last, grads = res[name]
        assert rel_err(out, res["ref"][0]) <= RTOL and rel_err(last, res["ref"][1]) <= RTOL
        for a, r in zip(grads, res["ref"][2]):
            assert rel_err(a, r) <= RTOL, name


def test_kernel_build_finds_the_ninja_package_when_path_has_none(tmp_path, monkeypatch):
    """Torch's builder needs ``ninja`` on PATH; a non-activated virtual environment has the package's
    binary off PATH: it is put on PATH, and found there."""
    import shutil

    ninja = pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    assert shutil.which("ninja") is None
    _cpp._ninja_on_path()
    assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
    before = os.environ["PATH"]
    _cpp._ninja_on_path()  # once found, PATH is left as it is
    assert os.environ["PATH"] == before

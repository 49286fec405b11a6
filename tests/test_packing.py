"""pack_bits / unpack_bits against np.packbits (LSB-first), torch path and Triton kernel."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dmmh._optional import available
from dmmh.hashing import pack_bits, unpack_bits
from dmmh.hashing.packing import pack_bits_ref, pack_bits_triton

SHAPES = [(1, 8), (3, 16), (17, 24), (64, 64), (5, 128), (9, 1000 // 8 * 8), (0, 32)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def numpy_pack(x: torch.Tensor) -> np.ndarray:
    return np.packbits((x.float() >= 0).numpy(), axis=1, bitorder="little")


def random_codes(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g)
    if n * k:  # exact zeros and negative zeros must give bit 1
        x.view(-1)[:: max(1, n * k // 7)] = 0.0
        x.view(-1)[1 :: max(1, n * k // 5)] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("backend", ["torch", "numpy", "auto", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_paths_match_numpy_packbits(shape, dtype, backend):
    x = random_codes(*shape, dtype, seed=sum(shape) + DTYPES.index(dtype))
    packed = pack_bits_ref(x) if backend == "ref" else pack_bits(x, backend=backend)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 8)
    np.testing.assert_array_equal(packed.numpy(), numpy_pack(x))


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_lsb_first_layout_by_hand(backend):
    x = -torch.ones(2, 16)
    x[0, 0] = 1  # bit 0 → byte 0 value 1
    x[1, 15] = 0.0  # bit 15 → byte 1 value 128 (zero counts as 1)
    assert pack_bits(x, backend).tolist() == [[1, 0], [0, 128]]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_bool_grad_and_noncontiguous_inputs(backend):
    g = torch.Generator().manual_seed(1)
    bits = torch.rand(6, 32, generator=g) > 0.5
    np.testing.assert_array_equal(pack_bits(bits, backend).numpy(), np.packbits(bits.numpy(), axis=1, bitorder="little"))
    xt = torch.randn(16, 6, generator=g).T  # (6, 16), not contiguous
    assert not xt.is_contiguous()
    np.testing.assert_array_equal(pack_bits(xt, backend).numpy(), numpy_pack(xt))
    h = torch.randn(5, 24, generator=g, requires_grad=True)  # codes straight from a model
    np.testing.assert_array_equal(pack_bits(h, backend).numpy(), numpy_pack(h.detach()))


@pytest.mark.parametrize("backend", ["torch", "numpy", "auto", "ref"])
def test_nan_is_an_error_or_bit_zero_on_request(backend):
    x = torch.tensor([[float("nan"), 1, -1, float("inf"), float("-inf"), 0, -0.0, 2]])
    pack = (lambda x, **kw: pack_bits_ref(x, **kw)) if backend == "ref" else (lambda x, **kw: pack_bits(x, backend, **kw))
    with pytest.raises(ValueError, match=r"NaN \(first at index \(0, 0\)\).*nan='zero'"):
        pack(x)
    np.testing.assert_array_equal(pack(x, nan="zero").numpy(), np.packbits(x.numpy() >= 0, axis=1, bitorder="little"))
    # 1, -1, inf, -inf, 0, -0.0, 2, 1 → bits 1,0,1,0,1,1,1,1 (LSB first): ±inf take their sign, ±0 is 1
    assert pack(x[:, [1, 2, 3, 4, 5, 6, 7, 1]]).tolist() == [[1 + 4 + 16 + 32 + 64 + 128]]
    with pytest.raises(ValueError, match="nan must be one of"):
        pack(x, nan="ignore")


def _consumers():
    """Every public entry that takes unpacked codes: each must apply the same rule."""
    from dmmh.hashing import HammingIndex
    from dmmh.metrics import RetrievalMAP
    from dmmh.metrics import functional as F

    ref = torch.ones(3, 16)
    labels = torch.ones(3, 1)
    return {
        "pack_bits": lambda c: pack_bits(c),
        "pack_bits torch": lambda c: pack_bits(c, "torch"),
        "pack_bits_ref": lambda c: pack_bits_ref(c),
        "HammingIndex.add": lambda c: HammingIndex(16).add(c),
        "HammingIndex.search": lambda c: HammingIndex(16).add(ref).search(c, 2),
        "HammingIndex.range_search": lambda c: HammingIndex(16).add(ref).range_search(c, 2),
        "mean_average_precision": lambda c: F.mean_average_precision(c, ref, labels, labels),
        "retrieval_metrics (database)": lambda c: F.retrieval_metrics(ref, c, labels, labels),
        "hamming_distance": lambda c: F.hamming_distance(c, ref),
        "RetrievalMAP.update": lambda c: RetrievalMAP().update(c, labels, torch.arange(3), "query"),
    }


@pytest.mark.parametrize("consumer", list(_consumers()))
def test_one_rule_for_codes_everywhere(consumer, rng):
    """Integer codes, 0/1 floats and NaN are refused by every consumer with the same advice; ±1, relaxed,
    ±inf, all-zero floats and bool bits are accepted and mean the same bits."""
    use = _consumers()[consumer]
    signs = rng.choice([-1.0, 1.0], (3, 16))
    bits01 = (signs > 0).astype(np.int64)
    bits01[0, :2] = [0, 1]  # both values present
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        for values in (bits01, signs):  # 0/1 bits (pack_bits once packed these as all ones) and ±1 signs
            with pytest.raises(ValueError, match=r"integer codes .*ambiguous.*bool bits.*±1 floats"):
                use(torch.from_numpy(values).to(dtype))
    if consumer.startswith("pack_bits"):
        with pytest.raises(ValueError, match="uint8 is read as packed codes"):
            use(torch.from_numpy(bits01).to(torch.uint8))
    with pytest.raises(ValueError, match="all 0/1"):
        use(torch.from_numpy(bits01).float())
    nan = torch.from_numpy(signs).float()
    nan[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(first at index \(2, 5\)\)"):
        use(nan)
    with pytest.raises(TypeError, match="complex"):
        use(torch.from_numpy(signs).to(torch.complex64))
    relaxed = torch.from_numpy(signs * rng.uniform(1e-3, 5, signs.shape))
    relaxed[0, 0], relaxed[1, 1] = float("inf") * relaxed[0, 0].sign(), 0.0 * relaxed[1, 1].sign()
    for accepted in (torch.from_numpy(signs).float(), relaxed, torch.from_numpy(signs > 0), torch.zeros(3, 16)):
        use(accepted)


def test_one_rule_means_the_same_bits(rng):
    """Relaxed codes (with ±0 and ±inf) give the same bits through pack_bits, the index and the metrics."""
    from dmmh.hashing import HammingIndex
    from dmmh.metrics.functional import as_bits

    x = torch.from_numpy(rng.standard_normal((20, 24)))
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = 0.0, -0.0, float("inf"), float("-inf")
    bits = np.asarray(x.numpy() >= 0)
    expect = np.packbits(bits, axis=1, bitorder="little")
    np.testing.assert_array_equal(pack_bits(x).numpy(), expect)
    np.testing.assert_array_equal(HammingIndex(24).add(x).codes.numpy(), expect)
    np.testing.assert_array_equal(as_bits(x).numpy(), bits)
    x[4, 4] = float("nan")
    bits[4, 4] = False
    np.testing.assert_array_equal(pack_bits(x, nan="zero").numpy(), np.packbits(bits, axis=1, bitorder="little"))
    np.testing.assert_array_equal(as_bits(x, nan="zero").numpy(), bits)


@pytest.mark.parametrize("shape", [(4, 8), (33, 64), (7, 136), (0, 16)])
def test_round_trip(shape):
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(shape, generator=g)
    codes = unpack_bits(pack_bits(x))
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, torch.where(x >= 0, 1.0, -1.0), rtol=0, atol=0)
    raw = torch.randint(0, 256, (shape[0], shape[1] // 8), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_bits(unpack_bits(raw)), raw)
    assert torch.equal(pack_bits(unpack_bits(raw, dtype=torch.bool)), raw)
    assert torch.equal(unpack_bits(raw, dtype=torch.bfloat16).float(), unpack_bits(raw))


def test_errors():
    for backend in ("auto", "torch", "numpy", "triton"):
        with pytest.raises(ValueError, match="multiple of 8.*12"):
            pack_bits(torch.randn(3, 12), backend)
    with pytest.raises(ValueError, match=r"shape \(N, n_bits\)"):
        pack_bits(torch.randn(16))
    with pytest.raises(ValueError, match="backend"):
        pack_bits(torch.randn(2, 8), backend="cuda")
    with pytest.raises(TypeError, match="torch.Tensor"):
        pack_bits(np.zeros((2, 8)))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="16 bits, not 24"):
        unpack_bits(torch.zeros(2, 2, dtype=torch.uint8), n_bits=24)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="CUDA tensor"):
            pack_bits_triton(torch.randn(2, 8))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        pack_bits_triton(torch.randn(2, 8, dtype=torch.float64))


_INTERPRETER_CHECK = textwrap.dedent(
    """
    import numpy as np, torch
    from dmmh.hashing.packing import pack_bits, pack_bits_triton
    cases = [(1, 8), (5, 24), (37, 64), (130, 128), (3, 256), (2, 1032), (0, 16)]
    for seed, (n, k) in enumerate(cases):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
            if n * k:
                x.view(-1)[::3] = 0.0
                x.view(-1)[1::4] = -0.0
            ref = np.packbits((x.float() >= 0).numpy(), axis=1, bitorder="little")
            got = pack_bits(x, backend="triton")
            assert got.dtype == torch.uint8 and got.shape == ref.shape, (n, k, dtype)
            assert (got.numpy() == ref).all(), (n, k, dtype)
            assert torch.equal(got, pack_bits(x, backend="torch")), (n, k, dtype)
    xt = torch.randn(64, 5).T  # strided rows
    assert (pack_bits_triton(xt).numpy() == np.packbits(xt.numpy() >= 0, axis=1, bitorder="little")).all()
    print("TRITON-INTERPRETER-OK")
    """
)


@pytest.mark.skipif(not available("triton"), reason="triton not installed")
def test_triton_kernel_in_interpreter():
    """The fused kernel, run by Triton's CPU interpreter in a subprocess (the env var must precede import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "TRITON-INTERPRETER-OK" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8), (1000, 64), (4097, 128), (3, 1024), (100_000, 64)])
def test_triton_kernel_on_cuda(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    x.view(-1)[::11] = 0
    got = pack_bits(x)  # auto → Triton on CUDA
    assert got.is_cuda
    np.testing.assert_array_equal(got.cpu().numpy(), numpy_pack(x.cpu()))
    assert torch.equal(got, pack_bits(x, backend="torch"))
    assert torch.equal(pack_bits(x[:, ::1].T.contiguous().T), got)

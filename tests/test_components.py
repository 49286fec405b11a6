"""Encoders, fusion, heads and losses against references written here."""

import re

import numpy as np
import pytest
import torch

import dmmh
from dmmh.hashing.losses import hadamard, hash_centers


def test_mlp_encoder_shapes_and_positions():
    enc = dmmh.ENCODERS.create("mlp", in_dim=10, dim=8, num_tokens=4, hidden=(16,), dropout=0.0)
    x = torch.randn(3, 10)
    out = enc(x)
    assert out.shape == (3, 4, 8)
    # tokens differ by position even for identical projections: the positional table is added
    assert not torch.allclose(out[:, 0], out[:, 1])


@pytest.mark.parametrize("num_tokens,bias", [(6, True), (6, False), (1, True)])
def test_token_expansion_is_a_linear_layer_plus_the_sinusoidal_table(num_tokens, bias):
    """Linear(dim, dim T) reshaped to T tokens plus sin/cos positions (written out here with numpy)."""
    from dmmh.encoders import TokenExpansion

    dim = 8
    te = TokenExpansion(dim, num_tokens)
    if num_tokens > 1 and not bias:
        te.proj.bias = None
    x = torch.randn(5, dim)
    pos = np.zeros((num_tokens, dim))
    for p in range(num_tokens):
        for i in range(0, dim, 2):
            pos[p, i], pos[p, i + 1] = np.sin(p / 10000 ** (i / dim)), np.cos(p / 10000 ** (i / dim))
    lin = x.numpy() if num_tokens == 1 else x.numpy() @ te.proj.weight.detach().numpy().T + (
        te.proj.bias.detach().numpy() if bias else 0.0)
    want = lin.reshape(5, num_tokens, dim) + pos
    assert np.allclose(te(x).detach().numpy(), want, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert te(x).dtype == (torch.bfloat16 if num_tokens > 1 else torch.float32)


def test_encoder_rejects_wrong_width_and_nan():
    enc = dmmh.ENCODERS.create("mlp", in_dim=10, dim=8, num_tokens=2)
    with pytest.raises(ValueError, match="feature width 7 differs from the 10"):
        enc(torch.randn(3, 7))
    x = torch.randn(3, 10)
    x[1, 4] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf \(first at index \(1, 4\)\)"):
        enc(x)
    with pytest.raises(ValueError, match="expected shape"):
        enc(torch.randn(3, 2, 10))
    for value, index in ((float("inf"), (0, 9)), (float("-inf"), (2, 0))):
        y = torch.randn(3, 10)
        y[index] = value
        with pytest.raises(ValueError, match=re.escape(f"NaN or inf (first at index {index})")):
            enc(y)
    # finite values whose sum overflows float32 (the check's fast path) and half precision are accepted
    big = torch.full((3, 10), 3e38)
    assert torch.isinf(big.sum()) and enc(big).shape == (3, 2, 8)


def test_additive_fusion_is_sum():
    f = dmmh.FUSIONS.create("additive", num_tokens=3, dim=4)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert torch.equal(f([a, b]), (a + b).reshape(2, 12))
    assert torch.equal(f([a]), a.reshape(2, 12))
    assert f.out_dim == 12
    with pytest.raises(ValueError, match=r"expected \(batch, 3, 4\)"):
        f([torch.randn(2, 3, 5)])


def test_cnn_deep_is_one_network_per_token():
    """Grouped convs: output t depends only on token t; compare to per-token plain MLPs."""
    torch.manual_seed(0)
    T, d, h = 5, 6, 3
    f = dmmh.FUSIONS.create("cnn_deep", num_tokens=T, dim=d, hidden=(h,)).eval()
    a, b = torch.randn(4, T, d), torch.randn(4, T, d)
    out = f([a, b])
    assert out.shape == (4, T) and f.out_dim == T
    conv1, bn, _, conv2 = f.net
    x = a + b
    for t in range(T):
        w1 = conv1.weight[t * h : (t + 1) * h, :, 0]
        z = x[:, t] @ w1.T + conv1.bias[t * h : (t + 1) * h]
        sl = slice(t * h, (t + 1) * h)
        z = (z - bn.running_mean[sl]) / torch.sqrt(bn.running_var[sl] + bn.eps) * bn.weight[sl] + bn.bias[sl]
        ref = torch.tanh(z) @ conv2.weight[t, :, 0] + conv2.bias[t]
        torch.testing.assert_close(out[:, t], ref, rtol=1e-5, atol=1e-6)
    # perturbing token 2 of one modality only changes output 2
    a2 = a.clone()
    a2[:, 2] += 1.0
    changed = (f([a2, b]) - out).abs().amax(0) > 0
    assert changed.tolist() == [t == 2 for t in range(T)]


@pytest.mark.parametrize("train", [True, False])
def test_cnn_deep_equals_its_convolution_modules(train):
    """The batched-matmul forward equals the layers' own Conv1d/BatchNorm1d forward, batch statistics and gradients included."""
    torch.manual_seed(0)
    f = dmmh.FUSIONS.create("cnn_deep", num_tokens=5, dim=6, hidden=(4, 3), out_per_token=2).train(train)
    a, b = torch.randn(7, 5, 6, requires_grad=True), torch.randn(7, 5, 6)
    g = torch.randn(7, 10)
    out = f([a, b])
    ref = f.net((a + b).reshape(7, -1, 1)).squeeze(-1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad((o * g).sum(), [a, *f.parameters()]) for o in (out, ref)]
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_heads_codes_and_gradients():
    x = torch.randn(16, 12, requires_grad=True)
    tanh = dmmh.HASH_HEADS.create("tanh", in_dim=12, n_bits=8)
    h = tanh(x)
    assert h.shape == (16, 8) and h.abs().max() < 1
    codes = tanh.encode(x)
    assert set(codes.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(codes, torch.where(h >= 0, 1.0, -1.0))

    ste = dmmh.HASH_HEADS.create("straight_through", in_dim=12, n_bits=8)
    out = ste(x)
    assert set(out.unique().tolist()) <= {-1.0, 1.0}
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_head_identity_projection_and_zero_is_plus_one():
    head = dmmh.HASH_HEADS.create("tanh", in_dim=4, n_bits=4)
    assert isinstance(head.proj, torch.nn.Identity)
    assert head.encode(torch.zeros(2, 4)).eq(1).all()
    with pytest.raises(ValueError, match="in_dim == n_bits"):
        dmmh.HASH_HEADS.create("tanh", in_dim=5, n_bits=4, projection="identity")


def test_binarize_zero_maps_to_plus_one():
    x = torch.tensor([[-0.0, 0.0, -1e-9, 3.0]])
    assert dmmh.binarize(x).tolist() == [[1.0, 1.0, -1.0, 1.0]]


def _np_losses(h, y, W, b):
    K = h.shape[1]
    sig = 1 / (1 + np.exp(-(h @ W.T + b)))
    cls = np.mean((sig - y) ** 2)
    S = np.where(y @ y.T > 0, 1.0, -1.0)
    pair = np.mean((h @ h.T / K - S) ** 2)
    quant = np.mean((h - np.where(h >= 0, 1.0, -1.0)) ** 2)
    return cls, pair, quant


def test_losses_match_numpy(rng):
    n, K, C = int(rng.integers(2, 20)), 16, 5
    h = np.tanh(rng.standard_normal((n, K)))
    y = (rng.random((n, C)) < 0.3).astype(np.float64)
    loss = dmmh.CombinedLoss({"classification": 2.0, "pairwise_similarity": 1.0, "quantization": {"weight": 0.5}}, n_bits=K, n_classes=C).double()
    W = loss.losses["classification"].classifier.weight.detach().numpy()
    b = loss.losses["classification"].classifier.bias.detach().numpy()
    total, parts = loss(torch.from_numpy(h), torch.from_numpy(y))
    cls, pair, quant = _np_losses(h, y, W, b)
    np.testing.assert_allclose(parts["classification"].item(), cls, rtol=1e-12)
    np.testing.assert_allclose(parts["pairwise_similarity"].item(), pair, rtol=1e-12)
    np.testing.assert_allclose(parts["quantization"].item(), quant, rtol=1e-12)
    np.testing.assert_allclose(total.item(), 2 * cls + pair + 0.5 * quant, rtol=1e-12)


def test_hadamard_and_centers():
    for n in (1, 2, 8, 32):
        H = hadamard(n)
        assert torch.equal(H @ H.T, n * torch.eye(n))
    c = hash_centers(24, 16)  # 24 classes <= 2 * 16: Hadamard rows and negations
    dist = (16 - c @ c.T) / 2
    off = dist[~torch.eye(24, dtype=torch.bool)]
    assert off.min() >= 8  # pairwise Hamming distance >= K/2
    r = hash_centers(80, 24)  # not a power of two → random
    assert r.shape == (80, 24) and set(r.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(r, hash_centers(80, 24, "random", seed=0))
    with pytest.raises(ValueError, match="power of two"):
        hash_centers(80, 24, "hadamard")


def test_central_similarity_reference(rng):
    K, C, n = 16, 6, 10
    loss = dmmh.LOSSES.create("central_similarity", n_bits=K, n_classes=C)
    h = np.tanh(rng.standard_normal((n, K)))
    y = (rng.random((n, C)) < 0.4).astype(np.float64)
    y[0] = 0  # an item without labels is left out
    centers = loss.centers.numpy().astype(np.float64)
    terms = []
    for i in range(n):
        if y[i].sum() == 0:
            continue
        c = np.where(y[i] @ centers >= 0, 1.0, 0.0)
        p = np.clip((h[i] + 1) / 2, 1e-6, 1 - 1e-6)
        terms.append(-(c * np.log(p) + (1 - c) * np.log(1 - p)).mean())
    got = loss(torch.from_numpy(h), torch.from_numpy(y)).item()
    np.testing.assert_allclose(got, np.mean(terms), rtol=1e-10)


def test_combined_loss_errors():
    with pytest.raises(ValueError, match="at least one loss"):
        dmmh.CombinedLoss({}, n_bits=8, n_classes=3)
    with pytest.raises(KeyError, match="pairwise_similarity"):
        dmmh.CombinedLoss({"pairwise_simlarity": 1.0}, n_bits=8, n_classes=3)


FEATURE_ENCODERS = [name for name in dmmh.list_encoders() if not name.startswith("clip_")]  # clip_*: tests/test_clip.py


@pytest.mark.parametrize("name", FEATURE_ENCODERS)
def test_every_registered_encoder_forward_backward_and_model(name, rng):
    torch.manual_seed(int(rng.integers(1 << 31)))
    enc = dmmh.ENCODERS.create(name, in_dim=10, dim=8, num_tokens=4)
    x = torch.from_numpy(rng.standard_normal((5, 10)).astype(np.float32))
    out = enc(x)
    assert out.shape == (5, 4, 8) and torch.isfinite(out).all()
    out.square().sum().backward()
    silent = [n for n, p in enc.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not silent, f"{name}: no gradient reaches {silent}"
    enc.eval()
    assert torch.equal(enc(x), enc(x))  # deterministic at evaluation
    assert torch.allclose(enc(x[:2]), enc(x)[:2], atol=1e-5)  # items are encoded independently
    model = dmmh.create_model(image_dim=10, text_dim=6, n_bits=8, dim=8, encoder=name).eval()
    codes = model.encode(x, torch.from_numpy(rng.standard_normal((5, 6)).astype(np.float32)))
    assert codes.shape == (5, 8) and set(codes.unique().tolist()) <= {-1.0, 1.0}


def test_every_encoder_is_covered():
    assert {"mlp", "mamba", "transformer"} <= set(FEATURE_ENCODERS)

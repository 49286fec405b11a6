"""The ``transformer`` encoder (BSTH's) against a forward pass written here from plain tensor ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dmmh
from dmmh.encoders.transformer import TransformerEncoder


def _positions(T: int, d: int) -> np.ndarray:
    table = np.zeros((T, d))
    for t in range(T):
        for i in range(0, d, 2):
            angle = t / 10000 ** (i / d)
            table[t, i] = math.sin(angle)
            if i + 1 < d:
                table[t, i + 1] = math.cos(angle)
    return table


def _layer_norm(x, ln):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _np(t):
    return t.detach().double().numpy()


def reference(enc: TransformerEncoder, x: np.ndarray, heads: int) -> np.ndarray:
    """Eval-mode forward: MLP (Linear, BatchNorm with running statistics, tanh), token expansion,
    sinusoidal positions, post-norm layers (self-attention, GELU feed-forward), final LayerNorm."""
    h = x
    mods = list(enc.proj)
    for lin, bn in zip(mods[0::3], mods[1::3]):
        z = h @ _np(lin.weight).T + _np(lin.bias)
        z = (z - _np(bn.running_mean)) / np.sqrt(_np(bn.running_var) + bn.eps) * _np(bn.weight) + _np(bn.bias)
        h = np.tanh(z)
    T, d = enc.num_tokens, enc.dim
    lin = enc.expand.proj  # a single token is the MLP's output itself
    z = h if T == 1 else h @ _np(lin.weight).T + _np(lin.bias)
    tokens = z.reshape(len(x), T, d) + _positions(T, d)
    dh = d // heads
    for layer in enc.layers.layers:
        att = layer.self_attn
        w, b = _np(att.in_proj_weight), _np(att.in_proj_bias)
        q, k, v = (tokens @ w[i * d:(i + 1) * d].T + b[i * d:(i + 1) * d] for i in range(3))
        out = np.zeros_like(tokens)
        for n in range(len(x)):
            for hd in range(heads):
                s = slice(hd * dh, (hd + 1) * dh)
                scores = q[n, :, s] @ k[n, :, s].T / math.sqrt(dh)
                p = np.exp(scores - scores.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                out[n, :, s] = p @ v[n, :, s]
        attn = out @ _np(att.out_proj.weight).T + _np(att.out_proj.bias)
        tokens = _layer_norm(tokens + attn, layer.norm1)
        ff = _gelu(tokens @ _np(layer.linear1.weight).T + _np(layer.linear1.bias)) @ _np(layer.linear2.weight).T + _np(layer.linear2.bias)
        tokens = _layer_norm(tokens + ff, layer.norm2)
    return _layer_norm(tokens, enc.layers.norm)


@pytest.mark.parametrize(("heads", "depth", "hidden", "T"), [(1, 2, (24,), 4), (2, 1, (), 3), (4, 3, (16, 12), 1)])
@pytest.mark.parametrize("grad", [False, True])  # no_grad takes torch's fused Transformer fast path
def test_matches_the_reference(rng, heads, depth, hidden, T, grad):
    torch.manual_seed(int(rng.integers(1 << 31)))
    enc = TransformerEncoder(in_dim=10, dim=8, num_tokens=T, depth=depth, heads=heads, hidden=hidden)
    enc.train()
    enc(torch.from_numpy(rng.standard_normal((32, 10)).astype(np.float32)))  # move the batch-norm statistics
    enc.eval()
    x = rng.standard_normal((int(rng.integers(1, 6)), 10)).astype(np.float32)
    with torch.set_grad_enabled(grad):
        got = enc(torch.from_numpy(x)).detach().double().numpy()
    np.testing.assert_allclose(got, reference(enc, x.astype(np.float64), heads), rtol=1e-4, atol=2e-5)


def test_bsth_defaults_and_registry():
    assert dmmh.ENCODERS.get("transformer") is TransformerEncoder and dmmh.ENCODERS.get("bsth") is TransformerEncoder
    enc = dmmh.ENCODERS.create("transformer", in_dim=4096, num_tokens=64)
    assert enc.dim == 128 and len(enc.layers.layers) == 2
    layer = enc.layers.layers[0]
    assert layer.self_attn.num_heads == 1 and layer.linear1.out_features == 128 and layer.dropout.p == 0.5
    assert not layer.norm_first and layer.activation is torch.nn.functional.gelu
    assert [m.out_features for m in enc.proj if isinstance(m, torch.nn.Linear)] == [2048, 128]
    assert enc.expand.proj.out_features == 128 * 64
    # BSTH's network: image and text encoders, summed, grouped-conv hashing
    model = dmmh.create_model(image_dim=4096, text_dim=1386, n_bits=16, encoder="transformer",
                              text_encoder_kwargs={"hidden": [1024]}, fusion="cnn_deep").eval()
    assert [m.out_features for m in model.encoders["text"].proj if isinstance(m, torch.nn.Linear)] == [1024, 128]
    assert model.encode(torch.randn(3, 4096), torch.randn(3, 1386)).shape == (3, 16)


def test_dropout_only_in_training_and_bad_arguments():
    torch.manual_seed(0)
    enc = TransformerEncoder(in_dim=6, dim=8, num_tokens=3)
    x = torch.randn(5, 6)
    enc.train()
    assert not torch.equal(enc(x), enc(x))
    enc.eval()
    assert torch.equal(enc(x), enc(x))
    with pytest.raises(ValueError, match=r"heads \(3\) must divide dim \(8\)"):
        TransformerEncoder(in_dim=6, dim=8, heads=3)
    with pytest.raises(ValueError, match="activation must be"):
        TransformerEncoder(in_dim=6, dim=8, activation="swish")

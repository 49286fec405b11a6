"""``clip_image`` / ``clip_text``: shapes, freezing, pretrained handling, input checks, lazy import."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("open_clip")
from test_pairs import TINY_CLIP, TINY_NAME  # noqa: E402

import dmmh  # noqa: E402
from dmmh.encoders.clip import ClipBackbone, ClipImageEncoder, ClipTextEncoder  # noqa: E402


def tiny(cls, **kw):
    return cls(model=TINY_NAME, model_config=TINY_CLIP, dim=8, num_tokens=4, **kw)


@pytest.mark.parametrize("output", ["pooled", "tokens"])
def test_shapes_and_frozen_backbone(output):
    torch.manual_seed(0)
    ie, te = tiny(ClipImageEncoder, output=output), tiny(ClipTextEncoder, output=output)
    images = torch.randn(3, 3, 32, 32)
    ids = te.tokenizer(["a cat", "a dog on a mat", "x"])
    assert ids.shape == (3, 16) and ids.dtype == torch.int64
    ti, tt = ie(images), te(ids)
    assert ti.shape == tt.shape == (3, 4, 8)
    assert not any(p.requires_grad for p in ie.backbone.parameters())
    (ti.sum() + tt.sum()).backward()
    assert all(p.grad is None for p in list(ie.backbone.parameters()) + list(te.backbone.parameters()))
    trainable = [p for p in ie.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    ie.train()
    assert not ie.backbone.training  # a frozen backbone stays in eval mode


def test_pooled_head_sees_backbone_embedding():
    """The pooled path equals the registered head applied to the (normalised) CLIP embedding."""
    torch.manual_seed(1)
    ie = tiny(ClipImageEncoder).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = ie.backbone.clip.visual(images)
        ref = ref / ref.norm(dim=-1, keepdim=True)
        assert torch.allclose(ie(images), ie.head(ref), atol=1e-6)


def test_text_tokens_ignore_padding():
    """Token output = masked mean of the projected hidden states over equal bins (padding left out)."""
    torch.manual_seed(2)
    te = tiny(ClipTextEncoder, output="tokens").eval()
    ids = te.tokenizer(["a cat"])
    seq, mask = te._sequence(ids)
    assert mask.sum() == (ids != 0).sum()
    proj = te.proj(seq)[0]
    # reference: plain loop over the 4 equal bins of the 16 positions, masked mean
    want = torch.stack([
        (proj[b * 4:(b + 1) * 4] * mask[0, b * 4:(b + 1) * 4, None]).sum(0) / max(int(mask[0, b * 4:(b + 1) * 4].sum()), 1e-6)
        for b in range(4)])
    with torch.no_grad():
        assert torch.allclose(te(ids)[0] - te.pos, want, atol=1e-5)


def test_train_last_unlocks_only_the_end():
    ie = tiny(ClipImageEncoder, train_last=2)
    names = [n for n, p in ie.backbone.named_parameters() if p.requires_grad]
    assert names and all(("resblocks.1" in n) or ("ln_post" in n) or n.endswith("visual.proj") for n in names)
    assert any("resblocks.1" in n for n in names)
    te = tiny(ClipTextEncoder, train_last=3)
    assert any(p.requires_grad for p in te.backbone.parameters())
    assert not te.backbone.clip.token_embedding.weight.requires_grad
    unfrozen = tiny(ClipImageEncoder, freeze=False)
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())
    with pytest.raises(ValueError, match="train_last"):
        tiny(ClipImageEncoder, freeze=False, train_last=1)


def test_bad_inputs_are_named():
    ie, te = tiny(ClipImageEncoder), tiny(ClipTextEncoder)
    with pytest.raises(ValueError, match=r"\(batch, 3, 32, 32\)"):
        ie(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        ie(torch.full((1, 3, 32, 32), float("nan")))
    with pytest.raises(TypeError, match="integer token ids"):
        te(torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"\(batch, 16\)"):
        te(torch.zeros(2, 77, dtype=torch.int64))
    with pytest.raises(ValueError, match="outside"):
        te(torch.full((1, 16), 10**6, dtype=torch.int64))
    with pytest.raises(ValueError, match="in_dim=5"):
        tiny(ClipImageEncoder, in_dim=5)
    with pytest.raises(ValueError, match="output must be"):
        tiny(ClipImageEncoder, output="cls")
    with pytest.raises(ValueError, match="unknown open_clip architecture 'ViT-B-33'.*ViT-B-32"):
        ClipBackbone("ViT-B-33")
    other = {**TINY_CLIP, "embed_dim": 16}
    with pytest.raises(ValueError, match="different architecture"):
        ClipBackbone(TINY_NAME, model_config=other)


def test_pretrained_checkpoint_and_tag(tmp_path, monkeypatch):
    torch.manual_seed(3)
    a = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)
    path = tmp_path / "tiny.pt"
    torch.save(a.clip.state_dict(), path)
    torch.manual_seed(4)
    b = ClipBackbone(TINY_NAME, pretrained=str(path))
    assert a.fingerprint() != ClipBackbone(TINY_NAME).fingerprint()  # random init differs
    for (k, v), (k2, v2) in zip(a.clip.state_dict().items(), b.clip.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint file nor an open_clip tag"):
        ClipBackbone(TINY_NAME, pretrained=str(tmp_path / "missing.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="hub.*cannot reach.*local checkpoint"):
        ClipBackbone("ViT-B-32", pretrained="openai")


def test_in_dmmh_model_with_missing_modality():
    torch.manual_seed(5)
    m = dmmh.create_model(image_dim=3, text_dim=16, n_bits=8, dim=8, image_encoder="clip_image", text_encoder="clip_text",
                          encoder_kwargs={"model": TINY_NAME, "model_config": TINY_CLIP}).eval()
    images, ids = torch.randn(2, 3, 32, 32), m.encoders["text"].tokenizer(["a", "b c"])
    assert m(images, ids).shape == m(image=images).shape == m(text=ids).shape == (2, 8)
    assert set(dmmh.list_encoders("clip_*")) == {"clip_image", "clip_text"}


def test_without_open_clip_import_works_and_use_names_the_extra():
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "import dmmh\n"
        "assert 'open_clip' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "try:\n"
        "    dmmh.ENCODERS.create('clip_image')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "dmmh[clip]" in out.stdout and "open_clip_torch" in out.stdout

"""Feature extraction: benchmark array format, resumption without recomputation, no mixing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
from test_pairs import TINY_CLIP, TINY_NAME, make_pairs_folder  # noqa: E402

from dmmh.data.pairs import PairsDataModule  # noqa: E402
from dmmh.data.readers import SPLIT_KEYS, read_feature_file, validate_feature_file  # noqa: E402
from dmmh.encoders.clip import ClipBackbone  # noqa: E402
from dmmh.commands.extract import main  # noqa: E402
from dmmh.extract import extract_features, read_extraction_meta  # noqa: E402


def setup(tmp_path, seed=0, n=5):
    make_pairs_folder(tmp_path, n, "jsonl")
    torch.manual_seed(seed)
    bb = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)
    dm = PairsDataModule(str(tmp_path), transform=bb.transform, tokenizer=bb.tokenize, num_query=2, seed=1,
                         cache_dir=str(tmp_path / ".hf"))
    return bb, dm


class Interrupt(Exception):
    pass


def count_calls(bb, fail_after=None):
    calls = []
    image_fn = bb.encode_image

    def counted(x):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupt
        calls.append(len(x))
        return image_fn(x)

    bb.encode_image = counted
    return calls


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_writes_benchmark_arrays(tmp_path, suffix):
    bb, dm = setup(tmp_path)
    out = extract_features(dm, bb, tmp_path / f"f{suffix}", batch_size=2, chunk_size=3, progress=False)
    ff = read_feature_file(out)
    validate_feature_file(ff, num_classes=dm.num_classes)
    # independent reference: one backbone call per item
    rows = {"tr": dm.splits["train"], "db": dm.splits["database"], "te": dm.splits["query"]}
    with torch.no_grad():
        for key, idx in rows.items():
            imgs = torch.stack([dm.all_items()[int(i)]["image"] for i in idx])
            np.testing.assert_allclose(ff.arrays[f"I_{key}"], bb.encode_image(imgs).numpy(), atol=1e-5)
            np.testing.assert_allclose(ff.arrays[f"T_{key}"], bb.encode_text(dm.tokens[idx]).numpy(), atol=1e-5)
            assert np.array_equal(ff.arrays[f"L_{key}"], dm.label_array[idx])
    assert len(ff.arrays["I_te"]) == 2 and len(ff.arrays["I_db"]) == 3
    assert read_extraction_meta(out)["backbone"] == bb.fingerprint()
    assert not (tmp_path / f"f{suffix}.parts").exists()


def interrupt_then_resume(bb, dm, out, first_batch, then_batch):
    """Run until chunk 0 (items 0, 1) is finished and the run dies in chunk 1, then resume."""
    calls = count_calls(bb, fail_after=2 // first_batch)
    with pytest.raises(Interrupt):
        extract_features(dm, bb, out, batch_size=first_batch, chunk_size=2, progress=False)
    parts = out.with_name(out.name + ".parts")
    assert not out.exists() and (parts / "chunk_000000.npz").exists() and not (parts / "chunk_000001.npz").exists()
    bb.encode_image = type(bb).encode_image.__get__(bb)
    calls = count_calls(bb)
    extract_features(dm, bb, out, batch_size=then_batch, chunk_size=2, progress=False)
    assert sum(calls) == 3  # items 2, 3, 4 only: chunk 0 was not recomputed
    bb.encode_image = type(bb).encode_image.__get__(bb)
    return out


def test_interrupted_run_resumes_to_the_same_file(tmp_path):
    """Same settings: the resumed file has the bytes of an uninterrupted run (this is the only
    byte-equality claim: float results may differ in the last bit between batch sizes)."""
    bb, dm = setup(tmp_path)
    whole = extract_features(dm, bb, tmp_path / "whole.npz", batch_size=2, chunk_size=2, progress=False)
    resumed = interrupt_then_resume(bb, dm, tmp_path / "resumed.npz", 2, 2)
    assert resumed.read_bytes() == whole.read_bytes()
    calls = count_calls(bb)
    extract_features(dm, bb, resumed, batch_size=1, chunk_size=2, progress=False)
    assert calls == []  # finished file: nothing to do, whatever the batch size


def test_resuming_with_another_batch_size_is_equal_within_rounding(tmp_path):
    bb, dm = setup(tmp_path)
    whole = read_feature_file(extract_features(dm, bb, tmp_path / "whole.npz", batch_size=2, chunk_size=2, progress=False))
    mixed = read_feature_file(interrupt_then_resume(bb, dm, tmp_path / "mixed.npz", 2, 1))
    for key in [k for keys in SPLIT_KEYS.values() for k in keys]:
        a = whole.arrays[key]
        assert mixed.arrays[key].dtype == a.dtype and mixed.arrays[key].shape == a.shape, key
        np.testing.assert_allclose(mixed.arrays[key], a, rtol=1e-5, atol=1e-6, err_msg=key)


def test_refuses_to_mix_backbones(tmp_path):
    bb, dm = setup(tmp_path)
    count_calls(bb, fail_after=1)
    with pytest.raises(Interrupt):
        extract_features(dm, bb, tmp_path / "f.npz", batch_size=1, chunk_size=1, progress=False)
    torch.manual_seed(99)
    other = ClipBackbone(TINY_NAME)
    with pytest.raises(ValueError, match="another backbone.*refusing to mix"):
        extract_features(dm, other, tmp_path / "f.npz", batch_size=1, chunk_size=1, progress=False)
    (tmp_path / "x").mkdir()
    bb2, dm2 = setup(tmp_path / "x")  # same seed: same backbone as bb, other data
    done = extract_features(dm2, bb2, tmp_path / "g.npz", progress=False)
    with pytest.raises(ValueError, match="another backbone"):
        extract_features(dm2, other, done, progress=False)
    with pytest.raises(ValueError, match="other data"):
        extract_features(dm, bb2, done, progress=False)


def test_cli(tmp_path, capsys):
    import json

    make_pairs_folder(tmp_path, 3, "csv")
    (tmp_path / "arch.json").write_text(json.dumps(TINY_CLIP))
    from dmmh.cli import main as dmmh_main

    dmmh_main(["extract", "--root", str(tmp_path), "--out", str(tmp_path / "f.safetensors"), "--model", TINY_NAME,
               "--model-config", str(tmp_path / "arch.json"), "--no-progress", "--batch-size", "2"])
    assert "wrote" in capsys.readouterr().out
    ff = read_feature_file(tmp_path / "f.safetensors")
    validate_feature_file(ff)
    assert ff.arrays["I_tr"].shape == (3, 32) and ff.arrays["L_tr"].shape[0] == 3
    with pytest.raises(SystemExit):
        main(["--root", str(tmp_path)])  # --out missing

"""Feature extraction: benchmark array format, resumption without recomputation, no mixing."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
from test_pairs import TINY_CLIP, TINY_NAME, make_pairs_folder  # noqa: E402

from dmmh.data.pairs import PairsDataModule  # noqa: E402
from dmmh.data.readers import SPLIT_KEYS, read_feature_file, validate_feature_file  # noqa: E402
from dmmh.encoders.clip import ClipBackbone  # noqa: E402
from dmmh.commands.extract import main  # noqa: E402
from dmmh.extract import _data_fingerprint, extract_features, read_extraction_meta  # noqa: E402
from dmmh.chunks import ChunkStore, ChunkStoreBusy  # noqa: E402


def setup(tmp_path, seed=0, n=5):
    make_pairs_folder(tmp_path, n, "jsonl")
    torch.manual_seed(seed)
    bb = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)
    dm = PairsDataModule(str(tmp_path), transform=bb.transform, tokenizer=bb.tokenize, num_query=2, seed=1)
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
    assert read_extraction_meta(tmp_path / "whole.npz")["computed_with"] == [{"batch_size": 2, "device": "cpu"}]
    with pytest.warns(UserWarning, match=r"mixed.npz.parts: finished chunks were computed with \[\{'batch_size': 2.*"
                      r"this run uses \{'batch_size': 1.*within float rounding, not byte for byte"):
        mixed = read_feature_file(interrupt_then_resume(bb, dm, tmp_path / "mixed.npz", 2, 1))
    assert read_extraction_meta(tmp_path / "mixed.npz")["computed_with"] == [{"batch_size": 1, "device": "cpu"},
                                                                           {"batch_size": 2, "device": "cpu"}]
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
    parts = tmp_path / "f.npz.parts"
    with pytest.raises(ValueError, match=rf"{parts} was made by another run: record\['backbone'\].*refusing to mix"):
        extract_features(dm, other, tmp_path / "f.npz", batch_size=1, chunk_size=1, progress=False)
    assert (parts / "chunk_000000.npz").exists()  # the other run's chunk is kept, not adopted
    (tmp_path / "x").mkdir()
    bb2, dm2 = setup(tmp_path / "x", n=4)  # same seed: same backbone as bb, other data
    done = extract_features(dm2, bb2, tmp_path / "g.npz", progress=False)
    with pytest.raises(ValueError, match="another backbone"):
        extract_features(dm2, other, done, progress=False)
    with pytest.raises(ValueError, match="other data"):
        extract_features(dm, bb2, done, progress=False)


def test_cli(tmp_path, capsys):
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


def test_cli_busy_output_is_a_clear_exit(tmp_path, monkeypatch):
    import dmmh.commands.extract as command

    make_pairs_folder(tmp_path, 3, "csv")
    (tmp_path / "arch.json").write_text(json.dumps(TINY_CLIP))

    def busy(*a, **k):
        raise ChunkStoreBusy(f"{tmp_path}/f.npz.parts is in use: another run ...")

    monkeypatch.setattr(command, "extract_features", busy)
    with pytest.raises(SystemExit, match=r"dmmh extract: .*f.npz.parts is in use"):
        main(["--root", str(tmp_path), "--out", str(tmp_path / "f.npz"), "--model", TINY_NAME,
              "--model-config", str(tmp_path / "arch.json")])


def block_in_encode(bb, started, release):
    image_fn = bb.encode_image

    def blocked(x):
        started.set()
        assert release.wait(60)
        return image_fn(x)

    bb.encode_image = blocked


def test_two_runs_into_one_output(tmp_path):
    """The second run is refused with a clear message while the first writes; after it, it reuses the file."""
    bb, dm = setup(tmp_path)
    out = tmp_path / "f.npz"
    started, release = threading.Event(), threading.Event()
    block_in_encode(bb, started, release)
    first = threading.Thread(target=extract_features, args=(dm, bb, out, 2, 2), kwargs={"progress": False})
    first.start()
    torch.manual_seed(0)
    same = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)  # the same weights, not blocked
    try:
        assert started.wait(60)
        with pytest.raises(ChunkStoreBusy, match=rf"{out}.parts is in use: another run"):
            extract_features(dm, same, out, batch_size=2, chunk_size=2, progress=False)
    finally:
        release.set()
        first.join(60)
    assert out.exists() and not (tmp_path / "f.npz.parts").exists()
    calls = count_calls(bb)
    assert extract_features(dm, bb, out, batch_size=2, chunk_size=2, progress=False) == out and calls == []
    validate_feature_file(read_feature_file(out), num_classes=dm.num_classes)


def edit_values(chunk, other_parts):
    with np.load(chunk, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["image"][1] = arrays["image"][0]  # a duplicated row: item 1 would get item 0's features
    from dmmh._io import write_npz

    write_npz(chunk, arrays)


def copy_from_another_run(chunk, other_parts):
    shutil.copy(other_parts / chunk.name, chunk)


@pytest.mark.parametrize("tamper,reason", [(edit_values, "does not match its checksum"),
                                           (copy_from_another_run, "written by another run")])
def test_bad_chunk_is_recomputed_not_trusted(tmp_path, tamper, reason):
    bb, dm = setup(tmp_path)
    whole = extract_features(dm, bb, tmp_path / "whole.npz", batch_size=2, chunk_size=2, progress=False)
    torch.manual_seed(99)
    other = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)  # another backbone's features, same data
    count_calls(other, fail_after=1)
    with pytest.raises(Interrupt):
        extract_features(dm, other, tmp_path / "other.npz", batch_size=2, chunk_size=2, progress=False)
    count_calls(bb, fail_after=1)
    with pytest.raises(Interrupt):
        extract_features(dm, bb, tmp_path / "f.npz", batch_size=2, chunk_size=2, progress=False)
    chunk = tmp_path / "f.npz.parts" / "chunk_000000.npz"
    tamper(chunk, tmp_path / "other.npz.parts")
    bb.encode_image = type(bb).encode_image.__get__(bb)
    calls = count_calls(bb)
    with pytest.warns(UserWarning, match=f"{chunk}: .*{reason}.*recomputing it"):
        out = extract_features(dm, bb, tmp_path / "f.npz", batch_size=2, chunk_size=2, progress=False)
    assert sum(calls) == 5  # chunk 0 recomputed with the others
    assert out.read_bytes() == whole.read_bytes()


def test_parts_folder_without_metadata_is_refused(tmp_path):
    bb, dm = setup(tmp_path)
    parts = tmp_path / "f.npz.parts"
    parts.mkdir()
    np.savez(parts / "chunk_000000.npz", image=np.zeros((2, 32), np.float32), text=np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError, match=f"{parts} has no meta.json.*refusing to adopt"):
        extract_features(dm, bb, tmp_path / "f.npz", batch_size=2, chunk_size=2, progress=False)
    assert sorted(p.name for p in parts.iterdir()) == ["chunk_000000.npz"]


def test_parts_folder_left_by_a_killed_run_goes_on_the_next_call(tmp_path, monkeypatch):
    bb, dm = setup(tmp_path)
    out = tmp_path / "f.npz"

    def killed(self):
        raise Interrupt  # killed after writing the output, before removing the chunk folder

    with monkeypatch.context() as m:
        m.setattr(ChunkStore, "remove", killed)
        with pytest.raises(Interrupt):
            extract_features(dm, bb, out, batch_size=2, chunk_size=2, progress=False)
    assert out.exists() and (tmp_path / "f.npz.parts" / "meta.json").exists()
    calls = count_calls(bb)
    assert extract_features(dm, bb, out, batch_size=2, chunk_size=2, progress=False) == out and calls == []
    assert sorted(p.name for p in tmp_path.iterdir() if "f.npz" in p.name) == ["f.npz"]


def test_fingerprints_do_not_depend_on_how_paths_are_typed(tmp_path, monkeypatch):
    torch.manual_seed(3)
    a = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)
    (tmp_path / "ckpt").mkdir()
    torch.save(a.clip.state_dict(), tmp_path / "ckpt" / "tiny.pt")
    shutil.copy(tmp_path / "ckpt" / "tiny.pt", tmp_path / "ckpt" / "copy.pt")
    monkeypatch.chdir(tmp_path)
    prints = {p: ClipBackbone(TINY_NAME, pretrained=p).fingerprint()
              for p in (str(tmp_path / "ckpt" / "tiny.pt"), "ckpt/tiny.pt", "./ckpt/../ckpt/tiny.pt", "ckpt/copy.pt")}
    assert len(set(prints.values())) == 1, prints
    assert a.fingerprint() == prints["ckpt/tiny.pt"]  # the weights, not where they came from
    sd = a.clip.state_dict()
    sd["logit_scale"] = sd["logit_scale"] + 1e-6  # one weight changed
    torch.save(sd, tmp_path / "ckpt" / "edited.pt")
    assert ClipBackbone(TINY_NAME, pretrained="ckpt/edited.pt").fingerprint() not in prints.values()

    data = tmp_path / "data"
    data.mkdir()
    make_pairs_folder(data, 5, "jsonl")
    os.symlink(data, tmp_path / "link")
    kw = dict(transform=a.transform, tokenizer=a.tokenize, num_query=2, seed=1)
    roots = [str(data), "data", "./data/", str(tmp_path / "link"), "link"]
    modules = [PairsDataModule(root, **kw) for root in roots]
    for m in modules:
        m.splits  # noqa: B018
    assert len({_data_fingerprint(m) for m in modules}) == 1
    # so an extraction started through one spelling of the paths resumes through another
    count_calls(a, fail_after=1)
    with pytest.raises(Interrupt):
        extract_features(modules[0], a, tmp_path / "f.npz", batch_size=2, chunk_size=2, progress=False)
    b = ClipBackbone(TINY_NAME, pretrained="ckpt/tiny.pt")
    calls = count_calls(b)
    extract_features(modules[-1], b, "f.npz", batch_size=2, chunk_size=2, progress=False)
    assert sum(calls) == 3


def test_unreadable_existing_output_is_named(tmp_path):
    bb, dm = setup(tmp_path)
    for name, content in (("f.npz", b"PK\x03\x04 truncated"), ("f.safetensors", b"\x08\x00"), ("g.npz", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{tmp_path / name}: unreadable"):
            extract_features(dm, bb, tmp_path / name, progress=False)
    np.savez(tmp_path / "plain.npz", I_tr=np.zeros(2))
    with pytest.raises(ValueError, match="plain.npz: not written by dmmh extract"):
        extract_features(dm, bb, tmp_path / "plain.npz", progress=False)

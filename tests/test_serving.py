"""Serving: ``dmmh encode`` (sharded, resumable, manifest) and ``dmmh search`` (every query kind).

Feature-model tests use synthetic data and a briefly trained model; the search must-show runs on a
tiny open_clip model trained (fixed seed) until every item of a pairs folder is found at rank 1 by
its own caption and by its own image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import dmmh
from dmmh.commands import encode as encode_cmd
from dmmh.commands import search as search_cmd
from dmmh.serving import Collection, ManifestError, Searcher, encode_index, manifest_path, read_manifest
from dmmh.serving.shards import ShardError, ShardStore, shard_ranges

SYNTH = dict(num_train=64, num_query=24, num_database=203, image_dim=24, text_dim=12, num_classes=5, batch_size=32,
             eval_batch_size=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny ops lose more to thread hand-offs than they gain on a shared 2-core machine; one setting
    # for the whole module also keeps float results comparable between its runs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_checkpoint(path, seed=0, n_bits=16, epochs=2, **model_kw) -> Path:
    L.seed_everything(seed, verbose=False)
    data = dmmh.SyntheticMultiLabel(**SYNTH)
    module = dmmh.DMMHModule(image_dim=24, text_dim=12, n_classes=5, n_bits=n_bits, encoder="mlp", dim=16, **model_kw)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    trainer.save_checkpoint(path)
    return Path(path)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {"a": train_checkpoint(d / "a.ckpt"), "b": train_checkpoint(d / "b.ckpt", seed=1),
            "bits32": train_checkpoint(d / "c.ckpt", n_bits=32)}


def synthetic(split="database", **kw) -> Collection:
    return Collection.resolve("synthetic", {**SYNTH, **kw}, split)


def encode(ckpt, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return encode_index(ckpt, kw.pop("collection", synthetic()), out, **kw)


def reference_codes(ckpt, split: str, batch_size: int) -> np.ndarray:
    """Packed codes of ``split``, encoded batch by batch in position order (an independent loop)."""
    module = dmmh.DMMHModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
    s = dmmh.SyntheticMultiLabel(**SYNTH).splits[split]
    parts = []
    for a in range(0, len(s), batch_size):
        codes = module.encode(torch.from_numpy(s.image[a:a + batch_size]), torch.from_numpy(s.text[a:a + batch_size]))
        parts.append(np.packbits(codes.numpy() >= 0, axis=1, bitorder="little"))
    return np.concatenate(parts)


def brute_force(query_codes, packed, radius=None, k=None):
    """Per query: [(distance, id)] sorted by (distance, id) — a plain popcount reference."""
    bits = np.unpackbits(np.asarray(packed), axis=1, bitorder="little").astype(bool)
    out = []
    for q in np.asarray(query_codes) >= 0:
        d = (bits != q).sum(1)
        order = sorted(range(len(d)), key=lambda i: (d[i], i))
        if radius is not None:
            order = [i for i in order if d[i] <= radius]
        out.append([(int(d[i]), i) for i in order[:k]])
    return out


class StopAfter(L.Callback):
    """Interrupts predict once ``n`` shard files exist (the writer runs before this callback)."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def on_predict_batch_end(self, *args, **kwargs):
        if len(list(self.folder.glob("shard-*.dmmh"))) >= self.n:
            raise RuntimeError("stopped by the test")


# --------------------------------------------------------------------------------------- encode

def test_shard_ranges_cover_every_position_once(rng):
    for _ in range(20):
        n, size = int(rng.integers(1, 200)), int(rng.integers(1, 50))
        ranges = shard_ranges(n, size)
        assert [p for r in ranges for p in r] == list(range(n))
        assert all(len(r) == size for r in ranges[:-1]) and 1 <= len(ranges[-1]) <= size
    assert shard_ranges(0, 4) == []
    with pytest.raises(ValueError, match="shard_size"):
        shard_ranges(5, 0)


def test_encode_equals_batchwise_reference_and_writes_manifest(ckpts, tmp_path, rng):
    batch = int(rng.choice([8, 16, 32]))
    shard = batch * int(rng.integers(1, 4))
    res = encode(ckpts["a"], tmp_path / "idx.dmmh", batch_size=batch, shard_size=shard)
    index = dmmh.hashing.HammingIndex.load(tmp_path / "idx.dmmh")
    assert np.array_equal(index.codes.numpy(), reference_codes(ckpts["a"], "database", batch))  # same batches, same threads
    assert index.ids.tolist() == list(range(203))
    m = read_manifest(tmp_path / "idx.dmmh")
    assert m["index"]["n_items"] == 203 and m["index"]["n_bits"] == 16
    assert m["collection"]["class_path"] == "dmmh.data.synthetic.SyntheticMultiLabel" and m["collection"]["split"] == "database"
    assert m["encoding"] == {"batch_size": batch, "shard_size": shard, "precision": "32-true", "world_size": 1}
    assert m["model"]["modalities"] == {"image": {"encoder": "mlp", "input": "features", "width": 24},
                                        "text": {"encoder": "mlp", "input": "features", "width": 12}}
    assert "items" not in m  # not a pairs collection
    assert res.shards == -(-203 // shard) and res.shards_reused == 0 and res.items_encoded == 203 and not res.up_to_date
    assert not Path(f"{tmp_path}/idx.dmmh.parts").exists()  # removed once merged
    again = encode(ckpts["a"], tmp_path / "idx.dmmh", batch_size=batch, shard_size=shard)
    assert again.up_to_date and again.manifest == m and again.items_encoded == 0


def test_encode_resumes_from_verified_shards(ckpts, tmp_path):
    fresh = encode(ckpts["a"], tmp_path / "fresh.dmmh", batch_size=16, shard_size=32)
    out, parts = tmp_path / "idx.dmmh", tmp_path / "idx.dmmh.parts"
    with pytest.raises(RuntimeError, match="stopped by the test"):
        encode(ckpts["a"], out, batch_size=16, shard_size=32, callbacks=[StopAfter(parts, 3)])
    shards = sorted(parts.glob("shard-*.dmmh"))
    assert len(shards) == 3 and not out.exists() and (parts / "meta.json").is_file()
    # a corrupted finished shard is encoded again, with a warning naming the file
    data = bytearray(shards[1].read_bytes())
    data[60] ^= 0xFF
    shards[1].write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"{shards[1].name}.*checksum"):
        res = encode(ckpts["a"], out, batch_size=16, shard_size=32)
    assert res.shards == 7 and res.shards_reused == 2 and res.items_encoded == 203 - 64
    assert out.read_bytes() == Path(fresh.path).read_bytes()  # identical settings: identical file


def test_encode_refuses_work_of_another_encoding(ckpts, tmp_path):
    out, parts = tmp_path / "idx.dmmh", tmp_path / "idx.dmmh.parts"
    with pytest.raises(RuntimeError, match="stopped"):
        encode(ckpts["a"], out, batch_size=16, shard_size=32, callbacks=[StopAfter(parts, 1)])
    with pytest.raises(ShardError, match=r"encoding\.batch_size: 16 != 8"):
        encode(ckpts["a"], out, batch_size=8, shard_size=32)
    with pytest.raises(ShardError, match=r"model\.fingerprint"):
        encode(ckpts["b"], out, batch_size=16, shard_size=32)
    res = encode(ckpts["b"], out, batch_size=16, shard_size=32, overwrite=True)  # discards the other shards
    assert res.shards_reused == 0
    with pytest.raises(FileExistsError, match=r"model\.fingerprint"):
        encode(ckpts["a"], out, batch_size=16, shard_size=32)
    with pytest.raises(FileExistsError, match=r"collection\.init_args\.noise: None != 2\.0"):
        encode(ckpts["b"], out, batch_size=16, shard_size=32, collection=synthetic(noise=2.0))
    (tmp_path / "foreign.dmmh").write_bytes(b"something else")
    with pytest.raises(FileExistsError, match="no manifest"):
        encode(ckpts["a"], tmp_path / "foreign.dmmh")
    with pytest.raises(ValueError, match="multiple of batch_size"):
        encode(ckpts["a"], tmp_path / "x.dmmh", batch_size=16, shard_size=40)


def test_shard_store_verifies_what_it_reuses(tmp_path):
    record = {"model": {"fingerprint": "f", "n_bits": 16}}
    store = ShardStore(tmp_path / "p", record, n_items=10, shard_size=4, n_bits=16)
    store.open()
    codes = torch.randint(0, 256, (10, 2), dtype=torch.uint8)
    for i, r in enumerate(store.ranges):
        store.write(i, codes[r.start:r.stop], torch.arange(r.start, r.stop))
    with pytest.raises(RuntimeError, match="expected positions 4..7"):
        store.write(1, codes[:4], torch.arange(4))
    again = ShardStore(tmp_path / "p", record, 10, 4, 16)
    again.open()
    assert again.run_id == store.run_id and again.pending() == []
    merged = dmmh.hashing.HammingIndex.load(again.merge(tmp_path / "merged.dmmh"))
    assert torch.equal(merged.codes, codes) and merged.ids.tolist() == list(range(10))
    # a shard that goes bad after pending() verified it is refused by the merge, naming it; no index is written
    good = store.path(2).read_bytes()
    store.path(2).write_bytes(good[:40] + bytes([good[40] ^ 1]) + good[41:])
    with pytest.raises(ShardError, match=f"{store.path(2).name}: checksum mismatch"):
        again.merge(tmp_path / "bad.dmmh")
    dmmh.hashing.HammingIndex(16).add(codes[8:], torch.tensor([8, 10])).save(store.path(2))
    with pytest.raises(ShardError, match=r"ids are not the positions 8..9 of shard 2"):
        again.merge(tmp_path / "bad.dmmh")
    assert not (tmp_path / "bad.dmmh").exists()
    store.path(2).write_bytes(good)
    # ids that are not the shard's positions (e.g. a shard of another layout renamed into place)
    dmmh.hashing.HammingIndex(16).add(codes[:4], torch.arange(1, 5)).save(store.path(0))
    dmmh.hashing.HammingIndex(8).add(codes[4:8, :1], torch.arange(4, 8)).save(store.path(1))
    with pytest.warns(UserWarning) as caught:
        assert again.pending() == [0, 1]
    reasons = [str(w.message) for w in caught]
    assert any("ids are not the positions 0..3" in r for r in reasons) and any("8-bit codes" in r for r in reasons)
    with pytest.raises(ShardError, match="missing.*shared filesystem"):
        again.merge(tmp_path / "bad.dmmh")
    # a shard of another run (another run id) is never picked up
    other = ShardStore(tmp_path / "q", record, 10, 4, 16)
    other.open()
    shutil.copy(store.path(2), other.folder / store.path(2).name)
    assert other.pending() == [0, 1, 2]
    (other.folder / "meta.json").write_text("{not json")
    with pytest.raises(ShardError, match="meta.json: unreadable"):
        other.check()
    # a folder (or file) of that name not made by dmmh encode is left alone unless overwrite
    for n, make in enumerate((lambda p: p.mkdir(), lambda p: p.write_text("x"))):
        mine = ShardStore(tmp_path / f"r{n}", record, 10, 4, 16)
        make(mine.folder)
        with pytest.raises(ShardError, match="not a parts folder of dmmh encode"):
            mine.open()
        mine.open(overwrite=True)
        assert mine.pending() == [0, 1, 2]


# ------------------------------------------------------------------------------------ collection

def test_collection_resolves_folders_names_and_class_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs").mkdir()
    c = Collection.resolve("pairs", {"metadata": "pairs/meta.csv"})
    assert c.class_path == "dmmh.data.pairs.PairsDataModule"
    assert c.init_args == {"root": str(tmp_path / "pairs"), "metadata": str(tmp_path / "pairs/meta.csv")}  # absolute
    assert Collection.resolve("mir", {"root": "x.mat"}).class_path == "dmmh.data.benchmarks.MIRFlickr25K"
    c = Collection.resolve("dmmh.data.SyntheticMultiLabel", {"noise": 0.5}, "query")
    assert (c.class_path, c.init_args, c.split) == ("dmmh.data.synthetic.SyntheticMultiLabel", {"noise": 0.5}, "query")
    assert Collection.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(KeyError, match="did you mean 'synthetic'"):
        Collection.resolve("synthetc")
    with pytest.raises(ValueError, match="cannot be imported"):
        Collection.resolve("no.such.Module")
    with pytest.raises(TypeError, match="not a dmmh FeatureDataModule"):
        Collection.resolve("dmmh.DMMHModule")
    with pytest.raises(ValueError, match="split must be one of"):
        Collection.resolve("synthetic", split="val")


# --------------------------------------------------------------------------- search, feature model

@pytest.fixture(scope="module")
def feature_index(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("fidx") / "idx.dmmh"
    encode(ckpts["a"], out, batch_size=16, shard_size=64)
    return out


def test_search_by_features_and_items_equals_brute_force(feature_index, tmp_path, rng, capsys):
    s = dmmh.SyntheticMultiLabel(**SYNTH).splits["query"]
    rows = sorted(rng.choice(len(s), size=4, replace=False).tolist())
    np.savez(tmp_path / "q.npz", image=s.image[rows], text=s.text[rows])
    search_cmd.main(["--index", str(feature_index), "--features", str(tmp_path / "q.npz"), "--k", "7", "--json"])
    by_features = json.loads(capsys.readouterr().out)["results"]
    argv = ["--index", str(feature_index), "--split", "query", "--k", "7", "--json"]
    search_cmd.main(argv + [a for r in rows for a in ("--item", str(r))])
    by_items = json.loads(capsys.readouterr().out)["results"]
    assert [r["hits"] for r in by_features] == [r["hits"] for r in by_items]
    assert by_items[0]["query"] == {"item": rows[0], "split": "query", "modalities": ["image", "text"]}
    module = dmmh.DMMHModule.load_from_checkpoint(str(read_manifest(feature_index)["model"]["checkpoint"])).eval()
    q = module.encode(torch.from_numpy(s.image[rows]), torch.from_numpy(s.text[rows]))
    packed = dmmh.hashing.HammingIndex.load(feature_index).codes.numpy()
    want = brute_force(q.numpy(), packed, k=7)
    assert [[(h["distance"], h["id"]) for h in r["hits"]] for r in by_features] == want
    # one modality, from a safetensors file, within a radius (every hit, no cap without --k)
    from safetensors.numpy import save_file

    save_file({"text": s.text[rows[:1]]}, str(tmp_path / "q.safetensors"))
    search_cmd.main(["--index", str(feature_index), "--features", str(tmp_path / "q.safetensors"), "--radius", "3", "--json"])
    got = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    q1 = module.encode(None, torch.from_numpy(s.text[rows[:1]]))
    assert [(h["distance"], h["id"]) for h in got] == brute_force(q1.numpy(), packed, radius=3)[0]


def test_search_refuses_what_it_cannot_answer(feature_index, ckpts, tmp_path):
    s = Searcher(feature_index)
    np.savez(tmp_path / "wide.npz", image=np.zeros((2, 25), np.float32))
    with pytest.raises(ValueError, match=r"wide.npz: 'image' has shape \(2, 25\); the model's image encoder takes width 24"):
        s.features(tmp_path / "wide.npz")
    np.savez(tmp_path / "other.npz", img=np.zeros(24, np.float32))
    with pytest.raises(ValueError, match=r"neither an 'image' nor a 'text' array \(keys: \['img'\]\)"):
        s.features(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="reads text as features .* --features FILE holding 'text' features of width 12"):
        s.captions(["a cat"])
    with pytest.raises(ValueError, match="--features FILE holding 'image' features of width 24"):
        s.images(["cat.png"])
    with pytest.raises(IndexError, match=r"item 203 is not in split 'database' .* \(203 items"):
        s.items([203])
    # a checkpoint of another bit length, or of other weights
    with pytest.raises(ValueError, match="makes 32-bit codes but index .* holds 16-bit codes"):
        Searcher(feature_index, ckpts["bits32"])
    with pytest.raises(ValueError, match="other weights than the model that encoded"):
        Searcher(feature_index, ckpts["b"])
    # no manifest; a manifest without the modality information; an index replaced after its manifest
    bare = tmp_path / "bare.dmmh"
    shutil.copy(feature_index, bare)
    with pytest.raises(ManifestError, match="bare.dmmh has no manifest .*bare.dmmh.json"):
        Searcher(bare)
    m = json.loads(manifest_path(feature_index).read_text())
    del m["model"]["modalities"]
    manifest_path(bare).write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="lacks model.modalities.image"):
        Searcher(bare).features({"image": np.zeros(24, np.float32)})
    dmmh.hashing.HammingIndex(16).add(torch.zeros(3, 2, dtype=torch.uint8)).save(bare)
    with pytest.raises(ManifestError, match="checksum differs"):
        Searcher(bare)
    with pytest.raises(ValueError, match="needs an image and/or a text"):
        s.search(k=3)
    for argv in (["--item", "1", "--caption", "x"], ["--caption", "a", "--caption", "b", "--image", "x.png"], []):
        with pytest.raises(SystemExit):
            search_cmd.main(["--index", str(feature_index), *argv])


def data_argv(args: dict) -> list[str]:
    return [x for k, v in args.items() for x in (f"--data.{k}", json.dumps(v))]


def test_encode_command_takes_fit_data_settings(ckpts, tmp_path, capsys):
    base = ["--ckpt", str(ckpts["a"]), "--out", str(tmp_path / "i.dmmh"), "--no-progress", "--accelerator", "cpu"]
    for bad in ([], ["--data", "synthetic", "--bogus", "1"], ["--data", "synthetic", "--data.num_qeury", "3"]):
        with pytest.raises(SystemExit):
            encode_cmd.main(base + bad)
    # a fit config's data: section (its other sections are ignored), then --data.ARG over it
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"model": {"n_bits": 64}, "data": {"class_path": "dmmh.data.SyntheticMultiLabel",
                                                                  "init_args": SYNTH}}))  # YAML ⊃ JSON
    encode_cmd.main(base + ["-c", str(cfg), "--split", "query", "--data.noise", "0.5"])
    assert "24 items, 16 bits, 1 shard(s), 0 reused, 1 process(es) writing 1," in capsys.readouterr().out
    m = read_manifest(tmp_path / "i.dmmh")
    assert m["collection"]["class_path"] == "dmmh.data.synthetic.SyntheticMultiLabel"
    assert m["collection"]["split"] == "query" and m["collection"]["init_args"]["noise"] == 0.5
    assert {k: m["collection"]["init_args"][k] for k in SYNTH} == SYNTH
    encode_cmd.main(base + ["--data", "synthetic", "--split", "query", "--data.noise", "0.5", *data_argv(SYNTH)])
    assert "is up to date (24 items, 16 bits)" in capsys.readouterr().out  # the same collection, named otherwise


# ------------------------------------------------------------------------ search, pairs (CLIP) model

@pytest.fixture(scope="module")
def pairs_index(tmp_path_factory):
    """A tiny open_clip DMMH trained on 8 photos until each is found by its caption and by its image."""
    pytest.importorskip("open_clip")
    from test_pairs import TINY_CLIP, TINY_NAME, make_pairs_folder, tiny_datamodule

    root = tmp_path_factory.mktemp("pairs")
    folder = root / "photos"
    folder.mkdir()
    make_pairs_folder(folder, 8, "jsonl")
    L.seed_everything(0, verbose=False)
    # instance labels (each caption its own class); val_split=0: every item is trained on, none held out
    dm = tiny_datamodule(folder, tags_column=None, batch_size=8, val_split=0)
    clip = {"model": TINY_NAME, "model_config": TINY_CLIP, "freeze": True, "head": "mlp"}
    module = dmmh.DMMHModule(image_dim=dm.image_dim, text_dim=dm.text_dim, n_classes=dm.num_classes, n_bits=16, dim=16,
                             image_encoder="clip_image", text_encoder="clip_text", encoder_kwargs=clip, fusion="cnn_deep",
                             modality_dropout=0.6, lr=1e-2, losses={"central_similarity": 1.0, "quantization": 0.1})
    trainer = L.Trainer(max_epochs=150, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    trainer.save_checkpoint(root / "model.ckpt")
    out = root / "index.dmmh"
    encode_cmd.main(["--ckpt", str(root / "model.ckpt"), "--data", str(folder), "--out", str(out), "--no-progress",
                     "--accelerator", "cpu", "--data.tags_column", "null"])
    return out, [dm.table.paths[i] for i in range(8)], [dm.table.captions[i] for i in range(8)]


def _search(capsys, index, *args):
    search_cmd.main(["--index", str(index), "--json", *args])
    return json.loads(capsys.readouterr().out)["results"]


def _assert_each_found_first(results, paths, captions):
    assert len(results) == len(paths)
    for i, r in enumerate(results):
        first, second = r["hits"][0], r["hits"][1]
        assert first["id"] == i, (i, r)
        assert first["distance"] < second["distance"], (i, r)  # rank 1 without a tie
        assert (first["image"], first["caption"]) == (paths[i], captions[i])


@pytest.mark.parametrize("kind", ["caption", "image", "caption+image"])
def test_search_finds_each_item_first_by_its_own_caption_and_image(pairs_index, capsys, kind):
    index, paths, captions = pairs_index
    args = []
    for i in range(8):
        args += ["--caption", captions[i]] * ("caption" in kind) + ["--image", paths[i]] * ("image" in kind)
    results = _search(capsys, index, *args, "--k", "3")
    _assert_each_found_first(results, paths, captions)
    assert [len(r["hits"]) for r in results] == [3] * 8


def test_search_by_item_in_each_modality(pairs_index, capsys):
    index, paths, captions = pairs_index
    items = [a for i in range(8) for a in ("--item", str(i))]
    both = _search(capsys, index, *items)
    _assert_each_found_first(both, paths, captions)
    # the same 8 items in one batch, as encode saw them: each item's code is its stored code
    assert all(r["hits"][0]["distance"] == 0 for r in both)
    for modality in ("image", "text"):
        _assert_each_found_first(_search(capsys, index, *items, "--modalities", modality), paths, captions)


def test_search_text_output_and_radius(pairs_index, capsys):
    index, paths, captions = pairs_index
    search_cmd.main(["--index", str(index), "--caption", captions[2], "--k", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"query 1: caption {captions[2]!r}"
    assert lines[1].split()[:3] == ["1", "d=0", "id=2"] and lines[1].endswith(f"{paths[2]}  {captions[2]}")
    assert len(lines) == 3
    s = Searcher(index)
    codes = s.encode(**s.captions(captions))
    want = brute_force(codes.numpy(), s.index.codes.numpy(), radius=6)
    got = s.search(**s.captions(captions), radius=6, k=None)
    assert [[(h["distance"], h["id"]) for h in hits] for hits in got] == want
    with pytest.raises(ValueError, match="reads image as images .*not features.*--image PATH"):
        s.features({"image": np.zeros(3, np.float32)})


def test_checkpoints_load_weights_only(feature_index, tmp_path, monkeypatch):
    from test_trust import planted_checkpoint

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # Lightning's default load would run the pickle
    ckpt, marker = planted_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        encode(ckpt, tmp_path / "x.dmmh")
    with pytest.raises(Exception, match="Weights only load failed"):
        Searcher(feature_index, ckpt)
    assert not marker.exists()

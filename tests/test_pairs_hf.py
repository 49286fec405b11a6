"""Pairs from Hugging Face ``datasets``: the same items, labels and splits as the equivalent
metadata folder, DatasetDict splits, bad rows, lazy image decoding, extraction and encoding."""

from __future__ import annotations

import io
import json
import os
import pickle
import weakref

import numpy as np
import pytest
import torch

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value  # noqa: E402

from dmmh.data.pairs import BadRowsError, PairsDataModule  # noqa: E402

VOCAB = ["car", "cat", "dog", "sky", "tree"]
WORDS = ["a", "red", "small", "photo", "of", "the", "near", "big"]
# split values and the dmmh split each means, written out here (the test's own reference)
SPLIT_OF = {"train": "train", "database": "database", "db": "database", "query": "query", "test": "query",
            "validation": "database", "val": "database"}


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """load_dataset's Arrow cache goes to the test's folder, not ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def make_items(rng, n: int) -> list[dict]:
    """``n`` items with random pixels, captions, tags and split values (every dmmh split used, two
    training items at least)."""
    values = list(SPLIT_OF)
    items = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(3, 12, size=2))
        split = ["train", "train", "database", "query"][i] if i < 4 else values[int(rng.integers(len(values)))]
        items.append({"name": f"img{i}.png", "pixels": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
                      "caption": " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))) + f" {i}",
                      "tags": sorted(set(rng.choice(VOCAB, int(rng.integers(1, 4))).tolist())), "split": split})
    return items


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_folder(folder, items, image_key="image") -> str:
    """A pairs folder (images + metadata.jsonl) of ``items``; with ``image_key="file_name"`` it is
    also an HF imagefolder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for it in items:
            (folder / it["name"]).write_bytes(png(it["pixels"]))
            f.write(json.dumps({image_key: it["name"], "caption": it["caption"], "tags": it["tags"],
                                "split": it["split"]}) + "\n")
    return str(folder)


def hf_dataset(items, split=True) -> Dataset:
    """``items`` as a Dataset whose image column is an Image() feature of generated PIL images."""
    columns = {"image": [PIL.fromarray(it["pixels"]) for it in items], "caption": [it["caption"] for it in items],
               "tags": [it["tags"] for it in items]}
    features = {"image": Image(), "caption": Value("string"), "tags": List(Value("string"))}
    if split:
        columns["split"], features["split"] = [it["split"] for it in items], Value("string")
    return Dataset.from_dict(columns, features=Features(features))


def transform(im) -> torch.Tensor:
    return torch.as_tensor(np.asarray(im.resize((6, 6)), dtype=np.float32)).permute(2, 0, 1)


def tokenize(texts) -> torch.Tensor:
    out = torch.zeros(len(texts), 24, dtype=torch.int64)
    for i, t in enumerate(texts):
        codes = [ord(c) for c in t[:24]]
        out[i, : len(codes)] = torch.tensor(codes)
    return out


def folder_dm(folder, **kw) -> PairsDataModule:
    return PairsDataModule(str(folder), transform=transform, tokenizer=tokenize, **kw)


def hf_dm(source, **kw) -> PairsDataModule:
    return PairsDataModule.from_hf(source, transform=transform, tokenizer=tokenize, **kw)


def expected_splits(split_values) -> dict[str, list[int]]:
    dmmh_split = [SPLIT_OF[s] for s in split_values]
    return {"train": [i for i, s in enumerate(dmmh_split) if s == "train"],
            "database": [i for i, s in enumerate(dmmh_split) if s != "query"],
            "query": [i for i, s in enumerate(dmmh_split) if s == "query"]}


def assert_same_as_items(dm: PairsDataModule, items) -> None:
    """Captions, pixels, multi-hot labels and splits of ``dm`` against the generated items."""
    dm.splits  # noqa: B018  (loads)
    assert dm.table.captions == [it["caption"] for it in items]
    vocab = sorted({t for it in items for t in it["tags"]})
    assert dm.classes == vocab
    want = np.zeros((len(items), len(vocab)), dtype=np.float32)
    for i, it in enumerate(items):
        for t in it["tags"]:
            want[i, vocab.index(t)] = 1
    assert np.array_equal(dm.label_array, want)
    assert {k: v.tolist() for k, v in dm.splits.items()} == expected_splits([it["split"] for it in items])
    for i, it in enumerate(items):
        assert np.array_equal(np.asarray(dm.table.image(i)), it["pixels"]), i


def assert_same_datamodules(a: PairsDataModule, b: PairsDataModule) -> None:
    a.splits, b.splits  # noqa: B018  (load)
    assert a.table.captions == b.table.captions and a.table.tags == b.table.tags and a.table.splits == b.table.splits
    assert a.classes == b.classes and np.array_equal(a.label_array, b.label_array) and torch.equal(a.tokens, b.tokens)
    assert {k: v.tolist() for k, v in a.splits.items()} == {k: v.tolist() for k, v in b.splits.items()}
    for role in ("fit", "val_query", "query", "database"):
        da, db = a.dataset(role), b.dataset(role)
        assert len(da) == len(db)
        for i in range(len(da)):
            x, y = da[i], db[i]
            assert all(torch.equal(x[k], y[k]) for k in ("image", "text", "label", "index")), (role, i)


@pytest.mark.parametrize("source", ["object", "save_to_disk", "imagefolder", "datasetdict_of_one"])
def test_same_items_labels_splits_as_the_metadata_folder(tmp_path, rng, source):
    items = make_items(rng, 14)
    reference = folder_dm(write_folder(tmp_path / "folder", items))
    assert_same_as_items(reference, items)
    if source == "imagefolder":  # load_dataset reads it: an Image() column of paths into the folder
        hf = write_folder(tmp_path / "imf", items, image_key="file_name")
    elif source == "save_to_disk":
        hf_dataset(items).save_to_disk(tmp_path / "saved")
        hf = str(tmp_path / "saved")
    elif source == "datasetdict_of_one":  # one split: a plain dataset (its split column decides)
        hf = DatasetDict({"train": hf_dataset(items)})
    else:
        hf = hf_dataset(items)
    dm = hf_dm(hf)
    assert_same_as_items(dm, items)
    assert_same_datamodules(dm, reference)
    assert dm.table.rows == list(range(14))  # 0-based dataset indices
    assert ("hf" in dm.hparams) == isinstance(hf, str)  # a Dataset object stays out of checkpoints


def test_classlabel_tags_and_split_columns_are_read_by_name(tmp_path, rng):
    items = make_items(rng, 10)
    split_names = sorted(SPLIT_OF)
    ds = Dataset.from_dict(
        {"image": [PIL.fromarray(it["pixels"]) for it in items], "caption": [it["caption"] for it in items],
         "tags": [[VOCAB.index(t) for t in it["tags"]] for it in items],
         "split": [split_names.index(it["split"]) for it in items],
         "label": [VOCAB.index(it["tags"][0]) if i % 4 else -1 for i, it in enumerate(items)]},  # -1: HF's no label
        features=Features({"image": Image(), "caption": Value("string"), "tags": List(ClassLabel(names=VOCAB)),
                           "split": ClassLabel(names=split_names), "label": ClassLabel(names=VOCAB)}))
    dm = hf_dm(ds)
    assert_same_as_items(dm, items)
    single = hf_dm(ds, tags_column="label")
    single.splits  # noqa: B018
    assert single.table.tags == [[] if i % 4 == 0 else [it["tags"][0]] for i, it in enumerate(items)]


def test_datasetdict_splits_map_onto_train_database_query(rng):
    parts = {"train": make_items(rng, 5), "validation": make_items(rng, 3), "test": make_items(rng, 4)}
    dd = DatasetDict({name: hf_dataset(its, split=False) for name, its in parts.items()})
    order = [(name, i) for name in parts for i in range(len(parts[name]))]

    def want(mapping):  # the reference: a loop over the rows kept, in split order
        kept = [(name, i) for name, i in order if mapping[name] is not None]
        s = [mapping[name] for name, _ in kept]
        return kept, {"train": [p for p, x in enumerate(s) if x == "train"],
                      "database": [p for p, x in enumerate(s) if x != "query"],
                      "query": [p for p, x in enumerate(s) if x == "query"]}

    for split_map, mapping in [(None, {"train": "train", "validation": "database", "test": "query"}),
                               ({"validation": "query"}, {"train": "train", "validation": "query", "test": "query"}),
                               ({"validation": None}, {"train": "train", "validation": None, "test": "query"})]:
        dm = hf_dm(dd, split_map=split_map)
        kept, splits = want(mapping)
        assert {k: v.tolist() for k, v in dm.splits.items()} == splits, split_map
        assert dm.table.captions == [parts[name][i]["caption"] for name, i in kept]
        assert [dm.table.where(p) for p in range(len(kept))] == [f"datasets.DatasetDict {n}[{i}]" for n, i in kept]
        for p, (name, i) in enumerate(kept):
            assert np.array_equal(np.asarray(dm.table.image(p)), parts[name][i]["pixels"])
    with pytest.raises(ValueError, match=r"split 'extra' is not a dmmh split name.*split_map=\{'extra': 'database'\}"):
        hf_dm(DatasetDict({**dd, "extra": dd["test"]})).splits
    assert hf_dm(DatasetDict({**dd, "extra": dd["test"]}), split_map={"extra": "db"}).splits["database"].size == 12
    with_column = DatasetDict({name: hf_dataset(its) for name, its in parts.items()})
    with pytest.raises(ValueError, match=r"a 'split' column and DatasetDict splits.*split_column=None"):
        hf_dm(with_column).splits
    assert hf_dm(with_column, split_column=None).splits["query"].size == 4
    with pytest.raises(ValueError, match="leaves out every split"):
        hf_dm(dd, split_map={"train": None, "validation": None, "test": None}).splits
    with pytest.raises(ValueError, match="split_map\\['x'\\] = 'holdout' is not a split"):
        hf_dm(dd, split_map={"x": "holdout"})


def test_split_map_is_one_mechanism_for_folders_and_datasets(tmp_path, rng):
    items = make_items(rng, 9)
    for i, v in enumerate(["holdout", "extra", "val"]):
        items[3 + i]["split"] = v
    split_map = {"holdout": "query", "extra": None}
    ref = folder_dm(write_folder(tmp_path / "f", items), split_map=split_map)
    dm = hf_dm(hf_dataset(items), split_map=split_map)
    assert_same_datamodules(dm, ref)
    mapped = [split_map.get(it["split"], SPLIT_OF.get(it["split"])) for it in items]
    kept = [i for i, s in enumerate(mapped) if s is not None]
    assert dm.table.rows == kept and ref.table.rows == [i + 1 for i in kept]  # 0-based indices, 1-based file rows
    assert dm.splits["query"].tolist() == [p for p, i in enumerate(kept) if mapped[i] == "query"]


def bad_rows_dataset(rng):
    good = [png(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)) for _ in range(3)]
    images = [{"bytes": good[0], "path": "a.png"}, {"bytes": b"not an image", "path": None},
              {"bytes": good[1][: len(good[1]) // 2], "path": "cut.png"}, {"bytes": good[1], "path": None},
              {"bytes": good[2], "path": None}, None, {"bytes": good[2], "path": None}]
    captions = ["one", "garbage bytes", "truncated", "   ", "malformed tags", "no image", "seven"]
    tags = [["x"], ["x"], ["x"], ["x"], ["x", None], ["x"], ["y"]]
    return Dataset.from_dict({"image": images, "caption": captions, "tags": tags},
                             features=Features({"image": Image(), "caption": Value("string"),
                                                "tags": List(Value("string"))}))


def test_bad_rows_are_named_by_index_and_skippable(rng):
    ds = bad_rows_dataset(rng)
    with pytest.raises(BadRowsError) as err:
        hf_dm(ds).splits
    assert [r for r, _ in err.value.rows] == [1, 2, 3, 4, 5]
    msg = str(err.value)
    assert msg.startswith("datasets.Dataset: 5 bad row(s)")
    assert "[1]: image (12 bytes) is unreadable" in msg and "[2]: image (" in msg
    assert "[3]: empty caption in column 'caption'" in msg
    assert "[4]: tags must be a list of strings" in msg
    assert "[5]: no image in column 'image'" in msg
    with pytest.warns(UserWarning, match=r"5 bad row\(s\) skipped"):
        dm = hf_dm(ds, on_bad_row="skip")
        dm.splits  # noqa: B018
    assert dm.table.rows == [0, 6] and dm.table.captions == ["one", "seven"]
    assert dm.table.paths == ["[0] a.png", "[6]"]
    # the same rows in a DatasetDict split are named by split and index
    with pytest.raises(BadRowsError, match=r"test\[1\]: image \(12 bytes\) is unreadable"):
        hf_dm(DatasetDict({"train": ds.select([0, 6]), "test": ds})).splits
    # without the image check, undecodable bytes fail when the item is read, naming its row
    lazy = hf_dm(ds.select([0, 1, 6]), check_images=False)
    lazy.splits  # noqa: B018
    assert lazy.table.rows == [0, 1, 2]
    with pytest.raises(ValueError, match=r"datasets.Dataset \[1\]: cannot read image \(12 bytes\)"):
        lazy.dataset("database")[1]
    assert lazy.dataset("database")[2]["image"].shape == (3, 6, 6)


def test_image_paths_stay_inside_root(tmp_path, rng):
    items = make_items(rng, 4)
    folder = write_folder(tmp_path / "imgs", items)
    (tmp_path / "secret.png").write_bytes(png(items[0]["pixels"]))
    names = [it["name"] for it in items] + ["../secret.png"]
    columns = {"image": names, "caption": [f"c{i}" for i in range(5)]}
    as_paths = Dataset.from_dict(columns)  # a string column of file paths
    with pytest.raises(BadRowsError, match=r"\[0\]: image path 'img0.png' is a file path, and there is no root folder"):
        hf_dm(as_paths).splits  # a Dataset object has no folder of its own
    with pytest.raises(BadRowsError) as err:
        hf_dm(as_paths, root=folder).splits
    assert [r for r, _ in err.value.rows] == [4] and "outside the root folder" in str(err.value)
    dm = hf_dm(as_paths, root=folder, allow_outside_root=True)
    dm.splits  # noqa: B018
    for i in range(4):
        assert np.array_equal(np.asarray(dm.table.image(i)), items[i]["pixels"])
    assert np.array_equal(np.asarray(dm.table.image(4)), items[0]["pixels"])
    # an Image() value that holds only a path is checked the same way
    as_images = Dataset.from_dict({"image": [{"bytes": None, "path": str(tmp_path / "secret.png")}], "caption": ["c"]},
                                  features=Features({"image": Image(), "caption": Value("string")}))
    with pytest.raises(BadRowsError, match="outside the root folder"):
        hf_dm(as_images, root=folder).splits
    dm = hf_dm(as_images, root=str(tmp_path))
    dm.splits  # noqa: B018
    assert dm.table.paths == [str(tmp_path / "secret.png")]
    # a JSON Lines file load_dataset reads: its paths are relative to the file's folder
    dm = hf_dm(os.path.join(folder, "metadata.jsonl"))
    assert_same_as_items(dm, items)


def test_bad_sources_and_arguments_are_named(tmp_path, rng):
    ds = hf_dataset(make_items(rng, 4))
    with pytest.raises(FileNotFoundError, match="no such local folder or file.*nothing is downloaded"):
        hf_dm(str(tmp_path / "nowhere")).splits
    with pytest.raises(ValueError, match="no column 'text'"):
        hf_dm(ds, caption_column="text").splits
    with pytest.raises(TypeError, match=r"column 'tags' is List\(Value\('string'\)\); dmmh reads an Image\(\) feature"):
        hf_dm(ds, image_column="tags").splits
    ints = Dataset.from_dict({"image": [1, 2], "caption": ["a", "b"]})
    with pytest.raises(TypeError, match=r"cast_column\('image', datasets.Image\(\)\)"):
        hf_dm(ints).splits
    with pytest.raises(TypeError, match="streaming IterableDataset"):
        hf_dm(ds.to_iterable_dataset()).splits
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a folder or a"):
        hf_dm(str(tmp_path / "x.txt")).splits
    with pytest.raises(ValueError, match="root= .* or hf="):
        PairsDataModule(transform=transform, tokenizer=tokenize)
    with pytest.raises(ValueError, match="with hf= the dataset holds the metadata"):
        PairsDataModule(hf=ds, metadata="m.jsonl")
    with pytest.raises(ValueError, match="cache_dir= is not used with hf="):
        PairsDataModule(hf=ds, cache_dir=str(tmp_path))


class DecodeCounter:
    """Counts images PIL opens and how many are alive at once; counts datasets' own decoding."""

    def __init__(self, monkeypatch):
        self.opened = self.alive = self.most_alive = self.hf_decoded = 0
        real_open, real_decode = PIL.open, datasets.features.Image.decode_example

        def open_(*a, **kw):
            im = real_open(*a, **kw)
            self.opened += 1
            self.alive += 1
            self.most_alive = max(self.most_alive, self.alive)
            weakref.finalize(im, self._gone)
            return im

        def decode(*a, **kw):
            self.hf_decoded += 1
            return real_decode(*a, **kw)

        monkeypatch.setattr(PIL, "open", open_)
        monkeypatch.setattr(datasets.features.Image, "decode_example", decode)

    def _gone(self):
        self.alive -= 1


def test_images_are_decoded_one_at_a_time_not_on_load(tmp_path, rng, monkeypatch):
    n = 300  # more rows than one read batch; ~12 kB of image bytes each
    pixels = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    ds = Dataset.from_dict({"image": [{"bytes": png(p), "path": None} for p in pixels],
                            "caption": [f"item {i}" for i in range(n)]},
                           features=Features({"image": Image(), "caption": Value("string")}))
    ds.save_to_disk(tmp_path / "big")
    image_bytes = sum(len(v["bytes"]) for v in ds.with_format("arrow")["image"].to_pylist())
    counter = DecodeCounter(monkeypatch)
    dm = hf_dm(str(tmp_path / "big"), check_images=False)
    dm.splits  # noqa: B018
    assert counter.opened == 0 and counter.hf_decoded == 0  # loading decodes nothing
    item = dm.dataset("database")[123]
    assert counter.opened == 1 and torch.equal(item["image"], transform(PIL.fromarray(pixels[123])))
    # the data a DataLoader worker receives holds the dataset by reference, not its image bytes
    assert len(pickle.dumps(dm.dataset("database"))) < image_bytes / 20
    # checking every image on load opens each (twice: verify, then decode), one at a time
    counter.opened = counter.most_alive = 0
    checked = hf_dm(str(tmp_path / "big"))
    checked.splits  # noqa: B018
    assert counter.opened == 2 * n and counter.most_alive <= 2 and counter.hf_decoded == 0


# -- extraction and encoding over an HF source (a tiny open_clip model) --------------------------------


@pytest.fixture
def clip_setup(tmp_path, rng):
    pytest.importorskip("open_clip")
    from test_pairs import TINY_CLIP, TINY_NAME

    from dmmh.encoders.clip import ClipBackbone

    items = make_items(rng, 9)
    folder = write_folder(tmp_path / "folder", items)
    hf_dataset(items).save_to_disk(tmp_path / "saved")
    torch.manual_seed(0)
    bb = ClipBackbone(TINY_NAME, model_config=TINY_CLIP)
    (tmp_path / "arch.json").write_text(json.dumps(TINY_CLIP))
    return items, folder, str(tmp_path / "saved"), bb


def test_extraction_over_an_hf_source_equals_the_folder_source(tmp_path, clip_setup):
    from test_pairs import TINY_NAME

    from dmmh.commands.extract import main
    from dmmh.data.readers import SPLIT_KEYS
    from dmmh.extract import _data_fingerprint, extract_features

    items, folder, saved, bb = clip_setup
    kw = dict(transform=bb.transform, tokenizer=bb.tokenize)
    settings = dict(batch_size=4, chunk_size=5, progress=False)
    a = extract_features(PairsDataModule(folder, **kw), bb, tmp_path / "a.npz", **settings)
    hf = PairsDataModule(hf=saved, **kw)
    b = extract_features(hf, bb, tmp_path / "b.npz", **settings)
    with np.load(a) as za, np.load(b) as zb:
        for key in (k for keys in SPLIT_KEYS.values() for k in keys):
            assert np.array_equal(za[key], zb[key]), key
    # the data fingerprint is the content: the same for the Dataset the folder was saved from and for
    # a fresh load; another image's bytes change it
    def fingerprint(source):
        dm = PairsDataModule.from_hf(source, **kw)
        dm.splits  # noqa: B018
        return _data_fingerprint(dm)

    fp = _data_fingerprint(hf)
    assert fingerprint(saved) == fp and fingerprint(hf_dataset(items)) == fp
    items[4]["pixels"] = items[4]["pixels"] ^ 1
    assert fingerprint(hf_dataset(items)) != fp
    # the command line: --hf; a second run finds its output up to date
    args = ["--out", str(tmp_path / "c.npz"), "--model", TINY_NAME, "--model-config", str(tmp_path / "arch.json"),
            "--no-progress", "--batch-size", "4", "--chunk-size", "5"]
    torch.manual_seed(0)
    main(["--hf", saved, *args])
    with np.load(b) as zb, np.load(tmp_path / "c.npz") as zc:
        assert all(np.array_equal(zb[k], zc[k]) for k in ("I_tr", "T_db", "L_te"))
    stamp = os.stat(tmp_path / "c.npz").st_mtime_ns
    torch.manual_seed(0)
    main(["--hf", saved, *args])
    assert os.stat(tmp_path / "c.npz").st_mtime_ns == stamp
    with pytest.raises(SystemExit):
        main(args)  # neither --root nor --hf


def test_encode_and_search_take_an_hf_dataset(tmp_path, clip_setup, capsys):
    import lightning as L
    from test_pairs import TINY_CLIP, TINY_NAME

    import dmmh
    from dmmh.commands import encode as encode_cmd
    from dmmh.commands import search as search_cmd
    from dmmh.hashing import HammingIndex

    items, folder, saved, _ = clip_setup
    dm = PairsDataModule(folder, clip_model=TINY_NAME, clip_config=TINY_CLIP, batch_size=8, val_split=0)
    clip = {"model": TINY_NAME, "model_config": TINY_CLIP, "freeze": True, "head": "mlp"}
    module = dmmh.DMMHModule(image_dim=dm.image_dim, text_dim=dm.text_dim, n_classes=dm.num_classes, n_bits=16, dim=16,
                             image_encoder="clip_image", text_encoder="clip_text", encoder_kwargs=clip)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    base = ["--ckpt", str(tmp_path / "m.ckpt"), "--no-progress", "--accelerator", "cpu"]
    encode_cmd.main([*base, "--data", folder, "--out", str(tmp_path / "folder.dmmh")])
    encode_cmd.main([*base, "--data", "pairs", "--data.hf", os.path.relpath(saved), "--out", str(tmp_path / "hf.dmmh")])
    capsys.readouterr()
    a, b = HammingIndex.load(tmp_path / "folder.dmmh"), HammingIndex.load(tmp_path / "hf.dmmh")
    assert len(b) == len(expected_splits([it["split"] for it in items])["database"])
    assert torch.equal(a.codes, b.codes)
    search_cmd.main(["--index", str(tmp_path / "hf.dmmh"), "--item", "1", "--json"])
    hits = json.loads(capsys.readouterr().out)["results"][0]["hits"]
    hit = next(h for h in hits if h["id"] == 1)  # an untrained model: other items may share its code
    db = expected_splits([it["split"] for it in items])["database"]
    assert (hit["distance"], hit["caption"], hit["image"]) == (0, items[db[1]]["caption"], f"[{db[1]}]")

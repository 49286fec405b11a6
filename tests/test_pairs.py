"""The ``pairs`` DataModule: metadata formats, labels, splits, bad rows. Also holds the tiny
image–caption set and tiny open_clip architecture that the other CLIP tests import."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("datasets")
skdata = pytest.importorskip("skimage.data")

from dmmh.data.pairs import BadRowsError, PairsDataModule, read_pairs  # noqa: E402

# a random-init ViT small enough to build in ~30 ms and run 8 images in ~10 ms
TINY_CLIP = {
    "embed_dim": 32,
    # average pooling: a random-init ViT's class token barely depends on the image
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16, "pool_type": "avg"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_NAME = "dmmh-test-tiny"

# real photos that ship with scikit-image, captions and tags written here
PHOTOS = [
    ("astronaut", "an astronaut in a white space suit with a flag", "person,space"),
    ("coffee", "a cup of coffee on a saucer", "drink,food"),
    ("chelsea", "a ginger cat looking to the side", "animal,cat"),
    ("rocket", "a rocket on the launch pad", "space,vehicle"),
    ("camera", "a man with a camera on a tripod", "person"),
    ("coins", "old coins on a dark table", "money"),
    ("moon", "the surface of the moon with craters", "space"),
    ("colorwheel", "a colour wheel of many hues", "colour"),
]


def write_image(path: str, name: str) -> None:
    from PIL import Image

    a = getattr(skdata, name)()
    Image.fromarray(a).convert("RGB").resize((48, 48)).save(path)


def make_pairs_folder(folder, n: int = len(PHOTOS), fmt: str = "jsonl", image_key: str = "image", extra=()) -> str:
    """Write ``n`` photos and a metadata file (``fmt`` csv | jsonl); returns the metadata path.
    ``extra`` rows (dicts) are appended as given (for bad-row tests)."""
    folder = str(folder)
    rows = []
    for name, caption, tags in PHOTOS[:n]:
        write_image(os.path.join(folder, f"{name}.png"), name)
        rows.append({image_key: f"{name}.png", "caption": caption, "tags": tags})
    rows += list(extra)
    path = os.path.join(folder, f"metadata.{fmt}")
    if fmt == "csv":
        cols = sorted({k for r in rows for k in r}, key=lambda k: (k != image_key, k))
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
    else:
        with open(path, "w") as f:
            for r in rows:
                if isinstance(r.get("tags"), str):
                    r = {**r, "tags": r["tags"].split(",")}
                f.write(json.dumps(r) + "\n")
    return path


def tiny_datamodule(folder, **kw) -> PairsDataModule:
    return PairsDataModule(str(folder), clip_model=TINY_NAME, clip_config=TINY_CLIP, cache_dir=os.path.join(str(folder), ".hf"), **kw)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_reads_pairs_and_tag_labels(tmp_path, fmt):
    make_pairs_folder(tmp_path, 5, fmt)
    dm = tiny_datamodule(tmp_path)
    assert list(dm.splits["train"]) == list(range(5)) and list(dm.splits["query"]) == list(range(5))
    # independent multi-hot reference from the tag strings
    vocab = sorted({t for _, _, tags in PHOTOS[:5] for t in tags.split(",")})
    assert dm.classes == vocab and dm.num_classes == len(vocab)
    for i, (_, caption, tags) in enumerate(PHOTOS[:5]):
        item = dm.dataset("database")[i]
        want = torch.tensor([float(v in tags.split(",")) for v in vocab])
        assert torch.equal(item["label"], want)
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert item["text"].shape == (16,) and item["text"].dtype == torch.int64
        assert dm.table.captions[i] == caption
    assert (dm.image_dim, dm.text_dim) == (3, 16)


def test_imagefolder_layout_and_instance_labels(tmp_path):
    make_pairs_folder(tmp_path, 4, "jsonl", image_key="file_name",
                      extra=[{"file_name": "astronaut.png", "caption": "  An ASTRONAUT in a white space suit with a flag "}])
    dm = PairsDataModule(str(tmp_path), tags_column=None, clip_model=TINY_NAME, clip_config=TINY_CLIP,
                         cache_dir=str(tmp_path / ".hf"))
    assert dm.num_classes == 4  # the last caption equals the first up to case and spacing
    ids = [int(dm.dataset("train")[i]["label"].argmax()) for i in range(5)]
    assert ids[4] == ids[0] and len(set(ids[:4])) == 4
    for i in range(5):
        assert dm.dataset("train")[i]["label"].sum() == 1


def test_split_column_and_random_queries(tmp_path):
    splits = ["train", "database", "query", "train", "test", "db"]
    extra = []
    make_pairs_folder(tmp_path, 6, "csv")
    path = tmp_path / "metadata.csv"
    rows = list(csv.DictReader(open(path)))
    for r, s in zip(rows, splits):
        r["split"] = s
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + extra)
    dm = tiny_datamodule(tmp_path)
    assert dm.splits["train"].tolist() == [0, 3]
    assert dm.splits["database"].tolist() == [0, 1, 3, 5]
    assert dm.splits["query"].tolist() == [2, 4]
    dm2 = tiny_datamodule(tmp_path, split_column=None, num_query=0.5, seed=3)
    q, db = dm2.splits["query"], dm2.splits["database"]
    assert len(q) == 3 and sorted(q.tolist() + db.tolist()) == list(range(6)) and not set(q) & set(db)
    assert dm2.splits["train"].tolist() == db.tolist()
    with pytest.raises(ValueError, match="num_query"):
        tiny_datamodule(tmp_path, split_column=None, num_query=6).splits


def test_bad_rows_reported_by_row_then_skipped(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    extra = [
        {"image": "missing.png", "caption": "a ghost", "tags": "x"},
        {"image": "broken.png", "caption": "broken file", "tags": "x"},
        {"image": "coffee.png", "caption": "   ", "tags": "x"},
    ]
    meta = make_pairs_folder(tmp_path, 3, "csv", extra=extra)
    with pytest.raises(BadRowsError) as err:
        read_pairs(str(tmp_path), meta, cache_dir=str(tmp_path / ".hf"))
    msg = str(err.value)
    assert "row 4 (line 5)" in msg and "missing.png does not exist" in msg
    assert "row 5 (line 6)" in msg and "unreadable" in msg
    assert "row 6 (line 7)" in msg and "empty caption" in msg
    assert [r for r, _ in err.value.rows] == [4, 5, 6]
    with pytest.warns(UserWarning, match=r"3 bad row\(s\)"):
        dm = tiny_datamodule(tmp_path, on_bad_row="skip")
        dm.splits  # noqa: B018
    assert dm.table.rows == [1, 2, 3] and len(dm.dataset("train")) == 3


def test_bad_arguments_are_named(tmp_path):
    make_pairs_folder(tmp_path, 2, "csv")
    with pytest.raises(ValueError, match="no column 'text'"):
        read_pairs(str(tmp_path), caption_column="text", cache_dir=str(tmp_path / ".hf"))
    with pytest.raises(ValueError, match="transform and a tokenizer"):
        PairsDataModule(str(tmp_path), cache_dir=str(tmp_path / ".hf")).splits
    with pytest.raises(FileNotFoundError, match="metadata"):
        read_pairs(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="labels='tags'"):
        tiny_datamodule(tmp_path, labels="tags", tags_column=None).splits


def test_datamodule_registered():
    import dmmh

    assert dmmh.DATAMODULES.get("pairs") is PairsDataModule
    assert "PairsDataModule" in dmmh.data.__all__  # exported like the other DataModules


def test_small_query_fraction_still_makes_disjoint_queries(tmp_path):
    """A fraction that rounds to 0 items must not fall back to num_query=0 (every item a query)."""
    make_pairs_folder(tmp_path, 6, "csv")
    dm = tiny_datamodule(tmp_path, split_column=None, num_query=0.05, seed=3)
    q, db = dm.splits["query"], dm.splits["database"]
    assert len(q) == 1 and len(db) == 5 and not set(q) & set(db)
    with pytest.raises(ValueError, match="whole count"):
        tiny_datamodule(tmp_path, num_query=2.5)


@pytest.mark.parametrize("labels", ["auto", "tags"])
def test_empty_tags_column_is_an_error_not_all_zero_labels(tmp_path, labels):
    make_pairs_folder(tmp_path, 3, "csv")
    path = tmp_path / "metadata.csv"
    rows = list(csv.DictReader(open(path)))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "tags": ""} for r in rows)
    with pytest.raises(ValueError, match=r"'tags' column holds no tag.*labels='instance'"):
        tiny_datamodule(tmp_path, labels=labels).splits

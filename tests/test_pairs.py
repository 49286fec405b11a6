"""The ``pairs`` DataModule: metadata formats, labels, splits, bad rows. Also holds the tiny
image–caption set and tiny open_clip architecture that the other CLIP tests import."""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

pytest.importorskip("open_clip")
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
    return PairsDataModule(str(folder), clip_model=TINY_NAME, clip_config=TINY_CLIP, **kw)


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
    dm = PairsDataModule(str(tmp_path), tags_column=None, clip_model=TINY_NAME, clip_config=TINY_CLIP)
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
        read_pairs(str(tmp_path), meta)
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
        read_pairs(str(tmp_path), caption_column="text")
    with pytest.raises(ValueError, match="transform and a tokenizer"):
        PairsDataModule(str(tmp_path)).splits
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


# -- metadata that cannot be parsed, images that cannot be decoded, paths that leave the root --------


def write_bytes_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def jsonl_line(image, caption, tags="x") -> bytes:
    return json.dumps({"image": image, "caption": caption, "tags": [tags]}).encode()


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_non_utf8_row_is_named_and_skippable(tmp_path, fmt):
    make_pairs_folder(tmp_path, 3, fmt)
    meta = tmp_path / f"metadata.{fmt}"
    lines = meta.read_bytes().rstrip(b"\n").split(b"\n")
    bad = b'coffee.png,caf\xe9 au lait,drink' if fmt == "csv" else b'{"image": "coffee.png", "caption": "caf\xe9", "tags": []}'
    lines.insert(2, bad)  # a Latin-1 byte on line 3 (CSV: after the header)
    write_bytes_lines(meta, lines)
    row, line = (2, 3) if fmt == "csv" else (3, 3)
    with pytest.raises(BadRowsError, match=rf"row {row} \(line {line}\): is not UTF-8 text \(byte 0xE9\)") as err:
        read_pairs(str(tmp_path), str(meta))
    assert [r for r, _ in err.value.rows] == [row] and str(meta) in str(err.value)
    with pytest.warns(UserWarning, match=r"1 bad row\(s\)"):
        t = read_pairs(str(tmp_path), str(meta), on_bad_row="skip")
    assert [os.path.basename(p) for p in t.paths] == [f"{name}.png" for name, _, _ in PHOTOS[:3]]
    assert t.rows == [r for r in range(1, 5) if r != row]  # metadata rows of the items kept


def test_non_utf8_header_is_an_error_even_when_skipping(tmp_path):
    make_pairs_folder(tmp_path, 2, "csv")
    meta = tmp_path / "metadata.csv"
    meta.write_bytes(meta.read_bytes().replace(b"caption", b"l\xe9gende", 1))
    with pytest.raises(ValueError, match=r"metadata.csv: line 1 \(the header\) is not UTF-8 text \(byte 0xE9\)"):
        read_pairs(str(tmp_path), str(meta), on_bad_row="skip")
    meta.write_text("image,caption,caption\na.png,x,y\n")
    with pytest.raises(ValueError, match=r"line 1 \(the header\) names column\(s\) \['caption'\] more than once"):
        read_pairs(str(tmp_path), str(meta))
    meta.write_text("")
    with pytest.raises(ValueError, match="metadata.csv: empty"):
        read_pairs(str(tmp_path), str(meta))


def test_malformed_jsonl_lines_are_named_and_skippable(tmp_path):
    make_pairs_folder(tmp_path, 3, "jsonl")
    meta = tmp_path / "metadata.jsonl"
    good = meta.read_bytes().rstrip(b"\n").split(b"\n")
    lines = [good[0], b"", b'{"image": "coffee.png", "caption": "a cup"', good[1], b"[1, 2]", b"   ", good[2], b'"text"']
    write_bytes_lines(meta, lines)
    with pytest.raises(BadRowsError) as err:
        read_pairs(str(tmp_path), str(meta))
    msg = str(err.value)
    assert [r for r, _ in err.value.rows] == [2, 4, 6]  # blank lines are not rows
    assert "row 2 (line 3): not valid JSON" in msg
    assert "row 4 (line 5): a JSON list, expected an object" in msg
    assert "row 6 (line 8): a JSON str, expected an object" in msg
    with pytest.warns(UserWarning, match=r"3 bad row\(s\)"):
        t = read_pairs(str(tmp_path), str(meta), on_bad_row="skip")
    assert t.rows == [1, 3, 5] and t.lines == [1, 4, 7]
    assert t.captions == [c for _, c, _ in PHOTOS[:3]]


def test_ragged_csv_rows_are_named_and_skippable(tmp_path):
    make_pairs_folder(tmp_path, 4, "csv")
    meta = tmp_path / "metadata.csv"
    header, *rows = meta.read_text().rstrip("\n").split("\n")
    lines = [header, rows[0], 'coffee.png,"a caption\nover two lines",drink', rows[1] + ",extra", rows[2],
             "camera.png,no tags column", rows[3]]
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRowsError) as err:
        read_pairs(str(tmp_path), str(meta))
    msg = str(err.value)
    assert [r for r, _ in err.value.rows] == [3, 5]
    assert "row 3 (line 5): has 4 fields, the header has 3" in msg  # the quoted caption spans lines 3-4
    assert "row 5 (line 7): has 2 fields, the header has 3" in msg
    with pytest.warns(UserWarning, match=r"2 bad row\(s\)"):
        t = read_pairs(str(tmp_path), str(meta), on_bad_row="skip")
    assert t.rows == [1, 2, 4, 6] and t.lines == [2, 3, 6, 8]
    assert t.captions[1] == "a caption\nover two lines"


def test_broken_csv_quoting_is_an_error_naming_the_line(tmp_path):
    make_pairs_folder(tmp_path, 2, "csv")
    meta = tmp_path / "metadata.csv"
    header, *rows = meta.read_text().rstrip("\n").split("\n")
    meta.write_text("\n".join([header, rows[0], 'coffee.png,"a cup" of coffee,drink', rows[1]]) + "\n")
    with pytest.raises(ValueError, match=r"metadata.csv: line 3: malformed CSV .*fix the quoting"):
        read_pairs(str(tmp_path), str(meta), on_bad_row="skip")


def test_json_array_metadata(tmp_path):
    make_pairs_folder(tmp_path, 3, "jsonl")
    items = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    (tmp_path / "meta.json").write_text(json.dumps(items, indent=2))
    t = read_pairs(str(tmp_path), str(tmp_path / "meta.json"))
    assert t.captions == [c for _, c, _ in PHOTOS[:3]] and t.tags[0] == PHOTOS[0][2].split(",")


def jpeg_bytes(name="astronaut") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((64, 64)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def garble_huffman_table(data: bytes) -> bytes:
    """Zero the code counts of the first Huffman table: the header still parses (PIL's verify()
    passes), the entropy-coded data no longer decodes."""
    i = data.index(b"\xff\xc4")
    return data[: i + 5] + bytes(16) + data[i + 21 :]


def test_truncated_and_garbled_jpegs_fail_validation(tmp_path):
    from PIL import Image

    jpeg = jpeg_bytes()
    (tmp_path / "good.jpg").write_bytes(jpeg)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "garbled.jpg").write_bytes(garble_huffman_table(jpeg))
    for name in ("truncated.jpg", "garbled.jpg"):  # what the old check let through
        with Image.open(tmp_path / name) as im:
            im.verify()
    extra = [{"image": n, "caption": f"photo {n}", "tags": "x"} for n in ("good.jpg", "truncated.jpg", "garbled.jpg")]
    meta = make_pairs_folder(tmp_path, 2, "csv", extra=extra)
    with pytest.raises(BadRowsError) as err:
        read_pairs(str(tmp_path), meta)
    assert [r for r, _ in err.value.rows] == [4, 5]
    assert "row 4 (line 5): image file" in str(err.value) and "truncated.jpg is unreadable" in str(err.value)
    assert "garbled.jpg is unreadable" in str(err.value)
    with pytest.warns(UserWarning, match=r"2 bad row\(s\)"):
        dm = tiny_datamodule(tmp_path, on_bad_row="skip")
        dm.splits  # noqa: B018
    assert dm.table.rows == [1, 2, 3]
    assert all(torch.isfinite(dm.dataset("train")[i]["image"]).all() for i in range(3))


def test_an_image_that_breaks_after_validation_names_its_row(tmp_path):
    make_pairs_folder(tmp_path, 3, "jsonl")
    dm = tiny_datamodule(tmp_path)
    dm.splits  # noqa: B018
    (tmp_path / "coffee.png").write_bytes((tmp_path / "coffee.png").read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{tmp_path / 'metadata.jsonl'} row 2 \(line 2\): cannot read image .*coffee.png"):
        dm.dataset("train")[1]
    assert dm.dataset("train")[2]["image"].shape == (3, 32, 32)


def test_image_paths_outside_the_root_are_refused_by_default(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    write_image(str(elsewhere / "secret.png"), "coffee")
    os.symlink(elsewhere / "secret.png", root / "link.png")
    (root / "sub").mkdir()
    write_image(str(root / "sub" / "inside.png"), "moon")
    extra = [{"image": "../elsewhere/secret.png", "caption": "dot dot", "tags": "x"},
             {"image": str(elsewhere / "secret.png"), "caption": "absolute", "tags": "x"},
             {"image": "link.png", "caption": "a symlink out", "tags": "x"},
             {"image": "sub/../sub/inside.png", "caption": "dot dot that stays inside", "tags": "x"},
             {"image": str(root / "sub" / "inside.png"), "caption": "absolute inside", "tags": "x"}]
    meta = make_pairs_folder(root, 1, "jsonl", extra=extra)
    with pytest.raises(BadRowsError) as err:
        read_pairs(str(root), meta)
    assert [r for r, _ in err.value.rows] == [2, 3, 4]
    assert str(err.value).count("outside the root folder") == 3 and "allow_outside_root=True" in str(err.value)
    with pytest.warns(UserWarning, match=r"3 bad row\(s\)"):
        assert read_pairs(str(root), meta, on_bad_row="skip").rows == [1, 5, 6]
    assert read_pairs(str(root), meta, allow_outside_root=True).rows == [1, 2, 3, 4, 5, 6]
    dm = tiny_datamodule(root, allow_outside_root=True)
    assert len(dm.dataset("train")) == 6 and dm.dataset("train")[3]["image"].shape == (3, 32, 32)
    # a root reached through a symlink is still the root
    os.symlink(root, tmp_path / "root_link")
    with pytest.warns(UserWarning, match=r"3 bad row\(s\)"):
        assert read_pairs(str(tmp_path / "root_link"), meta, on_bad_row="skip").rows == [1, 5, 6]


def test_cache_dir_is_deprecated(tmp_path):
    make_pairs_folder(tmp_path, 2, "csv")
    with pytest.warns(FutureWarning, match="cache_dir is no longer used"):
        assert len(read_pairs(str(tmp_path), cache_dir=str(tmp_path / ".hf"))) == 2

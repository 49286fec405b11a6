"""MS-COCO 2014 recipe on a miniature official release (COCO's JSON schema): counts by hand,
labels / caption bag-of-words against plain loops, the split with left-out items, the file
MSCOCO loads, and bad raw files (missing, malformed JSON, wrong schema)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from _raw_releases import COCO_CATEGORIES, make_coco, tiny_clip_spec

from dmmh.data import MSCOCO
from dmmh.prepare import MissingRawFileError, RawReleaseError, SplitSizes, coco, prepare


def test_tokenize():
    assert coco.tokenize("A man, riding  a BIKE.") == ["a", "man", "riding", "a", "bike"]
    assert coco.tokenize("two-tone 3 cats' toys!") == ["two", "tone", "cats", "toys"]
    assert coco.tokenize("") == []


def test_recipe_counts_labels_and_text(tmp_path, rng):
    truth = make_coco(tmp_path, rng)
    recipe = coco.read(tmp_path, vocab_size=12)
    # by hand (see make_coco): 14 + 10 images; 2 + 2 without a category -> 20
    assert [c["items"] for c in recipe.counts] == [24, 20]
    order = sorted((s, i) for s, i, _ in truth["images"] if s == "train2014") + \
        sorted((s, i) for s, i, _ in truth["images"] if s == "val2014")
    kept = [i for _, i in order if truth["labels"][i]]
    assert recipe.ids == kept
    names = {i: name for _, i, name in truth["images"]}
    subset = {i: s for s, i, _ in truth["images"]}
    assert recipe.images == [f"{subset[i]}/{names[i]}" for i in kept]
    cat_ids = [c for c, _, _ in COCO_CATEGORIES]
    assert recipe.label_names == [n for _, n, _ in COCO_CATEGORIES]
    np.testing.assert_array_equal(recipe.labels, [[c in truth["labels"][i] for c in cat_ids] for i in kept])
    # reference vocabulary: document frequency over the kept images' captions, ties alphabetical
    docs = {i: {w.strip(".,!").lower() for c in truth["captions"][i] for w in c.split()} - {""} for i in kept}
    df = {}
    for ws in docs.values():
        for w in ws:
            df[w] = df.get(w, 0) + 1
    vocab = sorted(df, key=lambda w: (-df[w], w))[:12]
    assert recipe.vocabulary == vocab
    np.testing.assert_array_equal(recipe.text, [[w in docs[i] for w in vocab] for i in kept])


def test_prepare_with_left_out_items_loads_in_mscoco(tmp_path, rng):
    make_coco(tmp_path / "raw", rng)
    spec, config = tiny_clip_spec(tmp_path)
    out = prepare("coco", tmp_path / "raw", tmp_path / "coco.safetensors", spec, model_config=config,
                  split_sizes=SplitSizes(query=3, database=12, train=5), recipe_params={"vocab_size": 12},
                  progress=False, chunk_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dm = MSCOCO(str(out))
        splits = dm.splits
    assert dm.source.format == "safetensors" and dm.num_classes == 80 and dm.text_dim == 12
    assert {k: len(s) for k, s in splits.items()} == {"query": 3, "database": 12, "train": 5}
    manifest = json.loads((tmp_path / "coco.safetensors.manifest.json").read_text())
    assert manifest["splits"]["sizes"] == {"query": 3, "database": 12, "train": 5, "unused": 5}
    assert any("left out" in note for note in manifest["recipe"]["notes"])


def test_missing_and_malformed_json_name_the_path(tmp_path, rng):
    make_coco(tmp_path, rng)
    caps = tmp_path / "annotations" / "captions_val2014.json"
    text = caps.read_text()
    caps.write_text(text[: len(text) // 2])  # a truncated download
    with pytest.raises(RawReleaseError, match=re.escape(str(caps)) + r": not valid JSON \(.* at line 1, column \d+\)"):
        coco.read(tmp_path)
    caps.unlink()
    with pytest.raises(MissingRawFileError, match=re.escape(str(caps)) + ".*cocodataset.org"):
        coco.read(tmp_path)
    caps.write_text(text)
    inst = tmp_path / "annotations" / "instances_train2014.json"
    original = inst.read_text()
    data = json.loads(original)
    data["annotations"][1].pop("category_id")
    inst.write_text(json.dumps(data))
    with pytest.raises(RawReleaseError, match=re.escape(f"{inst}: annotations[1]['category_id'] must be a int")):
        coco.read(tmp_path)
    data["annotations"][1]["category_id"] = 12  # not a COCO category id
    inst.write_text(json.dumps(data))
    with pytest.raises(RawReleaseError, match=re.escape(f"{inst}: annotations[1] refers to category_id 12")):
        coco.read(tmp_path)
    del data["images"]
    inst.write_text(json.dumps(data))
    with pytest.raises(RawReleaseError, match=re.escape(f"{inst}: key 'images' must be a list")):
        coco.read(tmp_path)
    inst.write_text(original)
    import shutil

    shutil.rmtree(tmp_path / "val2014")
    with pytest.raises(MissingRawFileError, match=re.escape(str(tmp_path / "val2014"))):
        coco.read(tmp_path)

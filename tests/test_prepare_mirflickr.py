"""MIR-Flickr25K recipe on a miniature official release: counts after each step (by hand),
arrays against a plain-loop reference, the file the DataModule loads, and bad raw files."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from _raw_releases import MIR_CONCEPTS, make_mirflickr, tiny_clip_spec

from dmmh.data import MIRFlickr25K
from dmmh.prepare import MissingRawFileError, RawReleaseError, SplitSizes, prepare
from dmmh.prepare import mirflickr


def _expected(truth):
    vocab = truth["vocabulary"]
    kept = [n for n in range(1, truth["n_images"] + 1) if truth["labels"][n] and any(t in vocab for t in truth["tags"][n])]
    labels = np.array([[c in truth["labels"][n] for c in MIR_CONCEPTS] for n in kept], dtype=np.uint8)
    text = np.array([[t in truth["tags"][n] for t in vocab] for n in kept], dtype=np.uint8)
    return kept, labels, text


def test_recipe_counts_labels_and_text(tmp_path, rng):
    truth = make_mirflickr(tmp_path, rng)
    recipe = mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    # by hand (see make_mirflickr): 30 images; N % 6 == 0 unlabelled -> 25; N in {5,10,15,20,25} no vocabulary tag -> 20
    assert [c["items"] for c in recipe.counts] == [30, 25, 20]
    kept, labels, text = _expected(truth)
    assert recipe.ids == kept and len(kept) == 20
    assert recipe.images == [f"mirflickr/im{n}.jpg" for n in kept]
    assert recipe.label_names == list(MIR_CONCEPTS)
    assert recipe.vocabulary == truth["vocabulary"]  # file order
    assert {"café", "água"} <= set(recipe.vocabulary)  # UTF-8 tags
    np.testing.assert_array_equal(recipe.labels, labels)
    np.testing.assert_array_equal(recipe.text, text)
    assert recipe.text.dtype == recipe.labels.dtype == np.uint8
    # the tag-count threshold: tags used fewer times are not in the vocabulary, so rare-only images are dropped
    assert all(not t.startswith("rare") for t in recipe.vocabulary)
    keep_all = mirflickr.read(tmp_path, n_images=30, min_tag_count=3, require_text=False)
    assert [c["items"] for c in keep_all.counts] == [30, 25]


def test_r1_files_and_readme_are_not_labels(tmp_path, rng):
    make_mirflickr(tmp_path, rng)
    ann = tmp_path / "mirflickr25k_annotations_v080"
    a = mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    for p in ann.glob("*_r1.txt"):
        p.write_text("1\n2\n3\n")  # _r1 lists are subsets: changing them changes nothing
    (ann / "README.txt").write_text("not a list of numbers\n")
    b = mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_prepare_gives_a_file_the_datamodule_loads(tmp_path, rng):
    truth = make_mirflickr(tmp_path / "raw", rng)
    spec, config = tiny_clip_spec(tmp_path)
    out = prepare("mirflickr", tmp_path / "raw", tmp_path / "mir_cnn_twt.mat", spec, model_config=config,
                  split_sizes=SplitSizes(query=4, database=None, train=6), recipe_params={"n_images": 30,
                  "min_tag_count": 3}, chunk_size=5, batch_size=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # split sizes differ from the published ones
        dm = MIRFlickr25K(str(out))
        splits = dm.splits
    assert dm.source.format == "mat-v7.3"
    assert {k: len(s) for k, s in splits.items()} == {"query": 4, "database": 16, "train": 6}
    kept, labels, text = _expected(truth)
    import json

    manifest = json.loads((tmp_path / "mir_cnn_twt.mat.manifest.json").read_text())
    items = manifest["splits"]["items"]
    assert sorted(items["query"] + items["database"]) == kept and set(items["train"]) <= set(items["database"])
    row = {n: i for i, n in enumerate(kept)}
    for split, key in (("query", "query"), ("database", "database"), ("train", "train")):
        idx = [row[n] for n in items[key]]
        np.testing.assert_array_equal(np.asarray(splits[split].label), labels[idx])
        np.testing.assert_array_equal(np.asarray(splits[split].text), text[idx])
        assert splits[split].image.shape == (len(idx), 32)
    assert [c["items"] for c in manifest["counts"]] == [30, 25, 20]
    # train rows are database rows: the same item has the same features
    db = {n: i for i, n in enumerate(items["database"])}
    for j, n in enumerate(items["train"]):
        np.testing.assert_array_equal(np.asarray(splits["train"].image[j]), np.asarray(splits["database"].image[db[n]]))


@pytest.mark.parametrize("damage", ["no_images_folder", "no_annotations_folder", "no_concept_file", "no_tags_file",
                                    "no_common_tags"])
def test_missing_raw_files_name_the_expected_path(tmp_path, rng, damage):
    make_mirflickr(tmp_path, rng)
    import shutil

    target = {"no_images_folder": tmp_path / "mirflickr", "no_annotations_folder": tmp_path / "mirflickr25k_annotations_v080",
              "no_concept_file": tmp_path / "mirflickr25k_annotations_v080" / "animals.txt",
              "no_tags_file": tmp_path / "mirflickr" / "meta" / "tags" / "tags17.txt",
              "no_common_tags": tmp_path / "mirflickr" / "doc" / "common_tags.txt"}[damage]
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(MissingRawFileError) as err:
        mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    assert str(target) in str(err.value) and "press.liacs.nl/mirflickr" in str(err.value)


def test_raw_folder_one_level_too_deep(tmp_path, rng):
    make_mirflickr(tmp_path, rng)
    with pytest.raises(RawReleaseError, match="looks like the mirflickr folder itself"):
        mirflickr.read(tmp_path / "mirflickr", n_images=30, min_tag_count=3)


def test_malformed_lines_name_file_and_line(tmp_path, rng):
    make_mirflickr(tmp_path, rng)
    ann = tmp_path / "mirflickr25k_annotations_v080" / "dog.txt"
    ann.write_text(ann.read_text() + "im12\n")
    lines = ann.read_text().splitlines()
    with pytest.raises(RawReleaseError, match=re.escape(f"{ann}, line {len(lines)}: 'im12' is not an image number")):
        mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    ann.write_text("31\n")
    with pytest.raises(RawReleaseError, match=re.escape(f"{ann}, line 1: image number 31 outside 1..30")):
        mirflickr.read(tmp_path, n_images=30, min_tag_count=3)
    ann.write_text("")
    common = tmp_path / "mirflickr" / "doc" / "common_tags.txt"
    common.write_text("sky 12\nno count here\n")
    with pytest.raises(RawReleaseError, match=re.escape(f"{common}, line 2: 'no count here'; expected '<tag> <count>'")):
        mirflickr.read(tmp_path, n_images=30, min_tag_count=3)

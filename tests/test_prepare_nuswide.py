"""NUS-WIDE recipe on a miniature official release (CRLF text, Windows image paths, 81 label
files, 1,000-D tag vectors): counts by hand, arrays against plain loops, the 0/1 matrix parser,
the file NUSWIDE loads, and bad raw files."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from _raw_releases import NUS_CONCEPTS, NUS_TOP21, make_nuswide, tiny_clip_spec

from dmmh.data import NUSWIDE
from dmmh.prepare import MissingRawFileError, RawReleaseError, SplitSizes, nuswide, prepare
from dmmh.prepare._raw import Where, read_binary_matrix


def test_recipe_counts_labels_and_text(tmp_path, rng):
    truth = make_nuswide(tmp_path, rng)
    counts = {c: sum(c in truth["labels"][i] for i in truth["labels"]) for c in NUS_CONCEPTS}
    assert min(counts[c] for c in NUS_TOP21) > max(counts[c] for c in NUS_CONCEPTS if c not in NUS_TOP21)  # fixture sanity
    recipe = nuswide.read(tmp_path)
    # by hand (see make_nuswide): 40 images; i % 4 == 0 have none of the 21 -> 30 left
    assert [c["items"] for c in recipe.counts] == [40, 30]
    assert recipe.label_names == sorted(NUS_TOP21)
    kept = [i for i in range(1, 41) if i % 4]
    assert recipe.ids == kept
    assert recipe.images == [f"Flickr/{truth['files'][i][0]}/{truth['files'][i][1]}" for i in kept]
    np.testing.assert_array_equal(recipe.labels, [[c in truth["labels"][i] for c in sorted(NUS_TOP21)] for i in kept])
    np.testing.assert_array_equal(recipe.text, [[j in truth["tags"][i] for j in range(1000)] for i in kept])
    assert recipe.vocabulary == truth["tag_names"]
    strict = nuswide.read(tmp_path, require_text=True)
    # by hand: images 7, 14, 21, 35 are kept and have no tag -> 26
    assert [c["items"] for c in strict.counts] == [40, 30, 26]


def test_top_concepts_ties_break_alphabetically(tmp_path, rng):
    make_nuswide(tmp_path, rng, n_images=8)
    truth = tmp_path / "Groundtruth" / "AllLabels"
    for c in NUS_CONCEPTS:  # 'zebra' and 'airport' in 3 images, 'cat' and 'bear' in 2 (a tie), the rest in none
        n = {"zebra": 3, "airport": 3, "cat": 2, "bear": 2}.get(c, 0)
        (truth / f"Labels_{c}.txt").write_bytes(b"".join(b"1\r\n" if i < n else b"0\r\n" for i in range(8)))
    recipe = nuswide.read(tmp_path, top_concepts=3)
    assert recipe.label_names == ["airport", "bear", "zebra"]  # bear beats cat on the tie; output alphabetical
    assert recipe.details["positives_per_concept"]["cat"] == 2


def test_binary_matrix_parser_against_a_reference(tmp_path, rng):
    rows, cols = int(rng.integers(1, 30)), int(rng.integers(1, 12))
    m = (rng.random((rows, cols)) < 0.4).astype(np.uint8)
    seps, ends = [" ", "\t"], ["\n", "\r\n"]
    text = "".join(seps[int(rng.integers(2))].join(map(str, r)) + rng.choice(["", "\t", " "]) + ends[int(rng.integers(2))]
                   for r in m)
    path = tmp_path / "m.txt"
    path.write_text(text + rng.choice(["", "\n", "\r\n\r\n"]), newline="")
    reference = np.array([[int(v) for v in line.split()] for line in text.splitlines()], dtype=np.uint8)
    np.testing.assert_array_equal(read_binary_matrix(path, rows, cols, Where("x", "y")), reference)
    np.testing.assert_array_equal(reference, m)


@pytest.mark.parametrize(("content", "message"), [
    ("0 1\n1 2\n", "line 2: unexpected character '2'"),
    ("0 1\n11 0\n", "line 2: a value with more than one digit"),
    ("0 1\n1\n", "line 2: 1 values, expected 2"),
    ("0 1\n", "1 lines, expected 2"),
    ("0 1\n\n1 0\n", "line 2: 0 values, expected 2"),
])
def test_binary_matrix_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "m.txt"
    path.write_text(content)
    expected = re.escape(message if "lines" in message else f"{path}, {message}")
    with pytest.raises(RawReleaseError, match=expected):
        read_binary_matrix(path, 2, 2, Where("x", "y"))


def test_prepare_gives_a_file_the_datamodule_loads(tmp_path, rng):
    make_nuswide(tmp_path / "raw", rng)
    spec, config = tiny_clip_spec(tmp_path)
    out = prepare("nuswide", tmp_path / "raw", tmp_path / "nus.npz", spec, model_config=config,
                  split_sizes=SplitSizes(query=5, database=None, train=8), progress=False, chunk_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dm = NUSWIDE(str(out))
        splits = dm.splits
    assert dm.source.format == "npz" and dm.num_classes == 21 and dm.text_dim == 1000
    assert {k: len(s) for k, s in splits.items()} == {"query": 5, "database": 25, "train": 8}


def test_missing_and_malformed_files_name_the_path(tmp_path, rng):
    make_nuswide(tmp_path, rng)
    label = tmp_path / "Groundtruth" / "AllLabels" / "Labels_sky.txt"
    label.unlink()
    with pytest.raises(MissingRawFileError, match=re.escape(str(label)) + ".*Groundtruth"):
        nuswide.read(tmp_path)
    label.write_text("0\r\n" * 39)  # one line short
    with pytest.raises(RawReleaseError, match=re.escape(f"{label}: 39 lines, expected 40")):
        nuswide.read(tmp_path)
    label.write_text("0\r\n" * 40)
    listing = tmp_path / "ImageList" / "Imagelist.txt"
    listing.write_text(listing.read_text() + "not-an-image\n")
    with pytest.raises(RawReleaseError, match=re.escape(f"{listing}, line 41")):
        nuswide.read(tmp_path)
    listing.unlink()
    with pytest.raises(MissingRawFileError, match=re.escape(str(listing)) + ".*ImageList.zip"):
        nuswide.read(tmp_path)

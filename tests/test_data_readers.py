"""Feature-file readers: every format gives the same arrays; bad files give errors naming file, key, expected vs found."""

from __future__ import annotations

import re
import warnings

import h5py
import numpy as np
import pytest
from _benchmark_files import KEYS, WRITERS, make_arrays, write, write_mat73, write_npz

from dmmh.data.readers import (
    ALL_KEYS, detect_format, find_feature_file, read_feature_file, validate_feature_file, write_npy_folder,
)


@pytest.fixture
def arrays():
    return make_arrays(np.random.default_rng(), classes=24)


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_reads_the_same_arrays(tmp_path, arrays, fmt):
    path = write(fmt, tmp_path, arrays)
    _, _, detected, mmapped = WRITERS[fmt]
    assert detect_format(path) == detected
    ff = read_feature_file(path)
    assert ff.format == detected
    assert sorted(ff.arrays) == sorted(ALL_KEYS)
    for key, a in arrays.items():
        assert ff.arrays[key].shape == a.shape, key  # rows are items after the transpose
        np.testing.assert_array_equal(np.asarray(ff.arrays[key]), a, err_msg=key)
    assert (ff.mmapped == set(ALL_KEYS)) is mmapped
    assert all(isinstance(ff.arrays[k], np.memmap) for k in ff.mmapped)
    validate_feature_file(ff, num_classes=24, check_values=True)  # a good file passes


def test_mat73_is_stored_column_major_and_transposed_on_load(tmp_path, arrays):
    path = write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)
    with open(path, "rb") as fh:
        assert fh.read(19) == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        assert f["I_tr"].shape == arrays["I_tr"].shape[::-1]  # (columns, rows) on disk
    ff = read_feature_file(path)
    row = 3
    np.testing.assert_array_equal(ff.arrays["I_tr"][row], arrays["I_tr"][row])
    np.testing.assert_array_equal(ff.arrays["L_db"][[row, 0]], arrays["L_db"][[row, 0]])
    assert read_feature_file(path, mmap=False).mmapped == set()


def test_find_feature_file(tmp_path, arrays):
    path = write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)
    (tmp_path / "notes.txt").write_text("x")
    assert find_feature_file(tmp_path, ["mir*_cnn_twt*.mat"]) == path
    assert find_feature_file(path) == path
    write_npz(tmp_path / "a.npz", arrays)
    write_npz(tmp_path / "b.npz", arrays)
    assert find_feature_file(tmp_path, ["mir*_cnn_twt*.mat"]) == path  # the dataset's own name wins
    path.unlink()
    with pytest.raises(ValueError, match=r"several files matching '\*\.npz' \(a\.npz, b\.npz\)"):
        find_feature_file(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_feature_file(tmp_path / "missing.mat")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no feature file in .*I_tr\.npy"):
        find_feature_file(empty)


def test_unknown_format(tmp_path):
    path = tmp_path / "features.bin"
    path.write_bytes(b"\x01\x02garbage" * 20)
    with pytest.raises(ValueError, match=r"features\.bin.*unknown feature file format"):
        detect_format(path)


def _bad(arrays, case):
    a = dict(arrays)
    if case == "missing":
        del a["T_te"]
        return a, ["T_te", "missing key", "expected all of"]
    if case == "rows":
        a["T_db"] = a["T_db"][:-1]
        return a, ["'T_db'", f"{len(arrays['T_db']) - 1} rows", f"expected {len(arrays['I_db'])}"]
    if case == "width":
        a["I_te"] = np.hstack([a["I_te"], a["I_te"][:, :1]])
        return a, ["'I_te'", "8 columns", "expected 7"]
    if case == "classes":
        for k in ("L_tr", "L_te", "L_db"):
            a[k] = a[k][:, :23]
        return a, ["'L_tr'", "23 columns", "expected 24 classes"]
    if case == "labels":
        a["L_te"] = a["L_te"].copy()
        a["L_te"][2, 5] = 2.0
        return a, ["'L_te'", "{0, 1}", "found 2.0", "row 2, column 5"]
    if case in ("nan", "inf"):
        a["I_db"] = a["I_db"].copy()
        a["I_db"][4, 6] = np.nan if case == "nan" else -np.inf
        return a, ["'I_db'", "nan" if case == "nan" else "-inf", "row 4, column 6", "expected finite"]
    if case == "ndim":
        a["L_tr"] = a["L_tr"][:, :, None]
        return a, ["'L_tr'", "shape", "expected 2-D"]
    raise AssertionError(case)


CASES = ["missing", "rows", "width", "classes", "labels", "nan", "inf"]


@pytest.mark.parametrize(("fmt", "case"), [(f, c) for f in ("mat73", "mat5", "npz") for c in CASES] + [("npz", "ndim")])
def test_bad_files_name_file_key_expected_and_found(tmp_path, arrays, fmt, case):
    bad, needles = _bad(arrays, case)
    path = write(fmt, tmp_path, bad)
    ff = read_feature_file(path)
    with pytest.raises(ValueError) as err:
        validate_feature_file(ff, num_classes=24, dataset="MIR-Flickr25K")
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle.lower() in msg.lower(), (needle, msg)


def test_missing_key_lists_expected_and_found(tmp_path, arrays):
    del arrays["L_tr"], arrays["I_db"]
    arrays["extra"] = np.zeros((2, 2))
    ff = read_feature_file(write_npz(tmp_path / "x.npz", arrays))
    with pytest.raises(ValueError, match=r"missing key\(s\) L_tr, I_db; expected all of I_tr, .*found I_te, .*extra"):
        validate_feature_file(ff)


def test_split_sizes_unlike_published_warn_with_expected_and_found(tmp_path, arrays):
    ff = read_feature_file(write_npz(tmp_path / "x.npz", arrays))
    with pytest.warns(UserWarning) as rec:
        validate_feature_file(ff, 24, {"train": 5000, "query": 2243, "database": 17772}, "MIR-Flickr25K")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 3
    assert any(re.search(r"query split \(I_te/T_te/L_te\).*expected 2243, found 5\)", m) for m in msgs), msgs
    assert all("x.npz" in m and "MIR-Flickr25K" in m for m in msgs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matching sizes: silent
        validate_feature_file(ff, 24, {s: len(arrays[k[0]]) for s, k in KEYS.items()})


def test_value_scan_is_blockwise_and_can_be_skipped(tmp_path, arrays, monkeypatch):
    import dmmh.data.readers as readers

    monkeypatch.setattr(readers, "_BLOCK_ROWS", 3)  # the bad value lies in a later block
    arrays["I_db"] = arrays["I_db"].copy()
    arrays["I_db"][10, 1] = np.inf
    ff = read_feature_file(write_mat73(tmp_path / "m.mat", arrays))
    with pytest.raises(ValueError, match=r"'I_db' has inf at row 10, column 1"):
        validate_feature_file(ff)
    validate_feature_file(ff, check_values=False)


def test_write_npy_folder_is_row_major_identical_and_atomic(tmp_path, arrays):
    ff = read_feature_file(write_mat73(tmp_path / "m.mat", arrays))
    out = write_npy_folder(ff.arrays, tmp_path / "cache")
    back = read_feature_file(out)
    assert back.format == "npy" and back.mmapped == set(ALL_KEYS)
    for key, a in arrays.items():
        assert back.arrays[key].flags.c_contiguous
        np.testing.assert_array_equal(back.arrays[key], a)
    with pytest.raises(FileExistsError):
        write_npy_folder(ff.arrays, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.mat"]  # no temporary left

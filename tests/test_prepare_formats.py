"""The seeded split against its documented algorithm, and the three output writers: MATLAB v7.3
layout (header, column-major datasets, MATLAB_class), reproducible bytes, equal arrays."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
import scipy.io

from dmmh.data.readers import read_feature_file
from dmmh.prepare.recipe import SplitSizes, split_items
from dmmh.prepare.writers import MATLAB_HEADER, array_sha256, write_arrays


@pytest.mark.parametrize("database", [None, "exact"])
def test_split_follows_the_documented_algorithm(rng, database):
    n = int(rng.integers(1, 60))
    q = int(rng.integers(0, n + 1))
    db = n - q if database is None else int(rng.integers(0, n - q + 1))
    t = int(rng.integers(0, db + 1))
    seed = int(rng.integers(0, 2**31))
    got = split_items(n, SplitSizes(q, None if database is None else db, t), seed)
    g = np.random.default_rng(seed)  # reference: the docstring's two permutations
    perm = list(g.permutation(n))
    database_in_draw_order = perm[q : q + db]
    order = list(g.permutation(db))
    assert got["query"].tolist() == sorted(perm[:q])
    assert got["database"].tolist() == sorted(database_in_draw_order)
    assert got["train"].tolist() == sorted(database_in_draw_order[i] for i in order[:t])
    assert got["unused"].tolist() == sorted(perm[q + db :])
    assert set(got["train"]) <= set(got["database"]) and not set(got["query"]) & set(got["database"])
    assert split_items(n, SplitSizes(q, None if database is None else db, t), seed)["train"].tolist() == got["train"].tolist()


def test_split_sizes_that_do_not_fit():
    with pytest.raises(ValueError, match="do not fit the 10 items"):
        split_items(10, SplitSizes(4, 7, 1), 0)
    with pytest.raises(ValueError, match="train <= database"):
        split_items(10, SplitSizes(4, None, 7), 0)
    assert {k: len(v) for k, v in split_items(0, SplitSizes(0, None, 0), 0).items()} == \
        {"query": 0, "database": 0, "train": 0, "unused": 0}


def _arrays(rng):
    sizes = {"tr": 5, "te": 3, "db": 11}
    out = {}
    for s, n in sizes.items():
        out[f"I_{s}"] = rng.standard_normal((n, 6)).astype(np.float32)
        out[f"T_{s}"] = (rng.random((n, 9)) < 0.3).astype(np.uint8)
        out[f"L_{s}"] = (rng.random((n, 4)) < 0.5).astype(np.uint8)
    return out


def test_mat_v73_layout(tmp_path, rng):
    arrays = _arrays(rng)
    path = tmp_path / "x.mat"
    write_arrays(path, arrays)
    raw = path.read_bytes()
    assert raw[:128] == MATLAB_HEADER and len(MATLAB_HEADER) == 128
    assert raw[:10] == b"MATLAB 7.3" and raw[124:126] == b"\x00\x02" and raw[126:128] == b"IM"
    with pytest.raises(NotImplementedError, match="v7.3"):  # scipy recognises MATLAB's v7.3 header
        scipy.io.loadmat(str(path))
    with h5py.File(path, "r") as f:
        assert f.userblock_size == 512
        for key, a in arrays.items():
            ds = f[key]
            assert ds.shape == a.shape[::-1] and ds.chunks is None and ds.compression is None
            np.testing.assert_array_equal(ds[()], a.T)  # column-major: MATLAB's (rows, columns) transposed
            assert ds.attrs["MATLAB_class"] == {np.float32: b"single", np.uint8: b"uint8"}[a.dtype.type]


@pytest.mark.parametrize("suffix", [".mat", ".npz", ".safetensors"])
def test_writers_are_reproducible_and_read_back_equal(tmp_path, rng, suffix):
    arrays = _arrays(rng)
    a, b = tmp_path / f"a{suffix}", tmp_path / f"b{suffix}"
    write_arrays(a, arrays)
    write_arrays(b, {k: arrays[k].copy() for k in arrays})
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    ff = read_feature_file(a)
    for key, x in arrays.items():
        got = np.asarray(ff.arrays[key])
        np.testing.assert_array_equal(got, x)
        assert got.dtype == x.dtype
        assert array_sha256(ff.arrays[key]) == hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
    with pytest.raises(ValueError, match="must end in"):
        write_arrays(tmp_path / "x.h5", arrays)

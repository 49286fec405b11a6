"""Multi-index hashing: exact k-NN and range search equal to a brute-force sort by (distance, index)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dmmh.hashing.index as index_module
import dmmh.hashing.multi_index as mi
from dmmh.hashing import HammingIndex, MultiIndex, pack_bits
from dmmh.hashing.multi_index import _flips, _substring, predicted_work, substring_count
from dmmh.hashing.search import _words
from test_search import ref_distances, ref_knn  # the plain-loop references of the exact search


def brute_range(q, db, radius):
    d = ref_distances(q, db)
    return [sorted((int(d[i, j]), j) for j in range(len(db)) if d[i, j] <= radius) for i in range(len(q))]


def tied_codes(rng, n, n_bytes):
    """Codes with heavy ties: bytes from a few values, a block of exact duplicates, near-duplicates."""
    db = rng.choice(np.array([0, 1, 3, 7, 255], np.uint8), (n, n_bytes))
    if n > 4:
        db[rng.integers(0, n, n // 3)] = db[0]  # duplicates
        near = rng.integers(0, n, n // 4)
        db[near, rng.integers(0, n_bytes, len(near))] ^= np.uint8(1 << int(rng.integers(0, 8)))
    return db


@pytest.fixture
def no_scan(monkeypatch):
    """Work costs zero: every query is answered by the multi-index enumeration, never by the scan fallback."""
    monkeypatch.setattr(mi, "PROBE_COST", 0.0)
    monkeypatch.setattr(mi, "CANDIDATE_COST", 0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the scan fallback ran")

    monkeypatch.setattr(mi, "hamming_knn", refuse)
    monkeypatch.setattr(mi, "hamming_range_search", refuse)


def check_equal(index: MultiIndex, q, db, ks, radii):
    for k in ks:
        d, i = index.knn(q, k)
        rd, ri = ref_knn(q, db, k)
        assert d.dtype == torch.int32 and i.dtype == torch.int64 and d.shape == rd.shape, (k, d.shape, rd.shape)
        np.testing.assert_array_equal(i.numpy(), ri, err_msg=f"k={k} m={index.m}")
        np.testing.assert_array_equal(d.numpy(), rd, err_msg=f"k={k} m={index.m}")
    for radius in radii:
        res = index.range_search(q, radius)
        want = brute_range(q, db, radius)
        assert res.lims.tolist() == [0] + np.cumsum([len(w) for w in want]).tolist()
        for row in range(len(q)):
            got_d, got_i = res.query(row)
            assert list(zip(got_d.tolist(), got_i.tolist())) == want[row], (radius, row)


@pytest.mark.parametrize("n_bits", [16, 24, 64, 136, 256])
def test_equals_brute_force_on_heavy_ties(no_scan, rng, n_bits):
    n_bytes = n_bits // 8
    for _ in range(3):
        n = int(rng.integers(1, 160))
        db = tied_codes(rng, n, n_bytes)
        q = np.concatenate([db[rng.integers(0, n, 3)], tied_codes(rng, 4, n_bytes), rng.integers(0, 256, (2, n_bytes), dtype=np.uint8)])
        low = math.ceil(n_bits / 12)  # substrings of at most 12 bits keep the full enumeration small
        m = int(rng.integers(low, min(n_bits, 3 * low) + 1))
        index = MultiIndex(db, m=m)
        ks = sorted({1, int(rng.integers(1, n + 1)), n, n + int(rng.integers(1, 5))})
        radii = sorted({0, int(rng.integers(0, n_bits // 4 + 1)), int(rng.integers(0, n_bits + 1)), n_bits})
        check_equal(index, q, db, ks, radii)


def test_uniform_codes_default_m(no_scan, rng):
    db = rng.integers(0, 256, (3000, 2), dtype=np.uint8)
    index = MultiIndex(db)
    assert index.m == substring_count(16, 3000) == math.ceil(16 / math.log2(3000)) == 2
    check_equal(index, rng.integers(0, 256, (20, 2), dtype=np.uint8), db, [1, 5, 40], [0, 3, 6])


def test_one_item_empty_index_and_no_queries(no_scan, rng):
    one = rng.integers(0, 256, (1, 8), dtype=np.uint8)
    q = rng.integers(0, 256, (3, 8), dtype=np.uint8)
    check_equal(MultiIndex(one, m=8), q, one, [1, 2, 10], [0, 30, 64])
    empty = MultiIndex(np.zeros((0, 8), np.uint8))
    d, i = empty.knn(q, 5)
    assert d.shape == (3, 0) and i.shape == (3, 0)
    assert empty.range_search(q, 10).lims.tolist() == [0, 0, 0, 0]
    d, i = MultiIndex(one, m=8).knn(q[:0], 3)
    assert d.shape == (0, 1)
    assert MultiIndex(one, m=8).range_search(q[:0], 3).lims.tolist() == [0]


def test_scan_fallback_mixes_with_the_enumeration(monkeypatch, rng):
    """With small work costs some queries finish by enumeration and the rest by the scan: still exact."""
    monkeypatch.setattr(mi, "PROBE_COST", 1.0)
    monkeypatch.setattr(mi, "CANDIDATE_COST", 1.0)
    scanned = []
    real = mi.hamming_knn
    monkeypatch.setattr(mi, "hamming_knn", lambda q, *a, **kw: scanned.append(len(q)) or real(q, *a, **kw))
    db = tied_codes(rng, 400, 4)
    q = np.concatenate([db[:10], rng.integers(0, 256, (30, 4), dtype=np.uint8)])
    index = MultiIndex(db, m=4)
    check_equal(index, q, db, [1, 7, 60], [0, 5, 12])
    assert 0 < sum(scanned) < len(q) * 3  # some queries, not all of them, were scanned


def test_default_guard_scans_when_enumeration_costs_more(rng):
    """With the measured costs a tiny collection is cheaper to scan: the result is the same."""
    db = rng.integers(0, 256, (50, 8), dtype=np.uint8)
    q = rng.integers(0, 256, (5, 8), dtype=np.uint8)
    check_equal(MultiIndex(db), q, db, [1, 10, 50], [20])


def test_blocks_and_threads_give_the_same_result(no_scan, monkeypatch, rng):
    db = tied_codes(rng, 500, 4)
    q = np.concatenate([db[:40], tied_codes(rng, 40, 4)])
    index = MultiIndex(db, m=4)
    want = index.knn(q, 9), index.range_search(q, 6)
    monkeypatch.setattr(mi, "QUERY_BLOCK", 7)
    monkeypatch.setattr(mi, "CANDIDATE_BLOCK", 5)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            got = index.knn(q, 9), index.range_search(q, 6)
            assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
            assert all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    finally:
        torch.set_num_threads(threads)


def test_substring_count_follows_the_paper():
    """m = ceil(b / log2 N): substrings of at most log2 N bits, never more than 32."""
    for n_bits, n, m in [(64, 10**6, 4), (64, 10**7, 3), (128, 10**7, 6), (128, 10**6, 7), (64, 2, 64), (256, 10**12, 8)]:
        assert substring_count(n_bits, n) == m, (n_bits, n)
    for n_bits in (8, 64, 256):
        for n in (0, 1, 5, 10**4, 10**9, 10**15):
            m = substring_count(n_bits, n)
            assert 1 <= m <= n_bits and math.ceil(n_bits / m) <= 32


def test_flips_and_substrings_by_hand(rng):
    for s in (1, 5, 12):
        for rho in range(s + 1):
            f = _flips(s, rho)
            assert len(f) == math.comb(s, rho) == len(set(f.tolist()))
            assert all(bin(v).count("1") == rho and v < 2**s for v in f.tolist())
    codes = rng.integers(0, 256, (20, 17), dtype=np.uint8)
    words = _words(torch.from_numpy(codes))
    bits = np.unpackbits(codes, axis=1, bitorder="little")
    for lo, hi in [(0, 8), (3, 35), (60, 70), (100, 132), (120, 136)]:
        want = [sum(int(bits[i, b]) << (b - lo) for b in range(lo, hi)) for i in range(len(codes))]
        assert _substring(words, lo, hi).tolist() == want


def test_bad_input():
    with pytest.raises(ValueError, match="packed uint8"):
        MultiIndex(np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match=r"m must be in \[2, 64\]"):
        MultiIndex(np.zeros((3, 8), np.uint8), m=1)
    with pytest.raises(ValueError, match=r"queries \(Q, 8\)"):
        MultiIndex(np.zeros((3, 8), np.uint8)).knn(np.zeros((2, 4), np.uint8), 1)


def test_predicted_work():
    """The worst-case model: no gain on small collections, a clear one on large 64-bit ones."""
    assert predicted_work(1000, 64, k=10) == 1000
    assert predicted_work(10**7, 64, k=10) < 10**7 / 2
    assert predicted_work(10**7, 64, k=1) <= predicted_work(10**7, 64, k=10) <= predicted_work(10**7, 64, k=1000)
    assert predicted_work(10**7, 64, radius=2) < predicted_work(10**7, 64, radius=10)
    assert predicted_work(10**7, 256, k=10) == 10**7  # long codes: as costly as a scan


# ---------------------------------------------------------------- as a HammingIndex backend


def test_hamming_index_mih_backend(no_scan, rng):
    x = torch.from_numpy(rng.choice([-1.0, 1.0], (300, 32)).astype(np.float32))
    x[100:140] = x[0]  # duplicates
    ids = torch.from_numpy(rng.permutation(10**6)[:300].astype(np.int64))
    q = torch.cat([x[:5], torch.from_numpy(rng.choice([-1.0, 1.0], (5, 32)).astype(np.float32))])
    flat, fast = HammingIndex(32, backend="numpy").add(x, ids), HammingIndex(32, backend="mih").add(x, ids)
    for k in (1, 10, 299, 400):
        for a, b in zip(flat.search(q, k), fast.search(q, k)):
            assert torch.equal(a, b), k
    for radius in (0, 5, 32):
        assert all(torch.equal(a, b) for a, b in zip(flat.range_search(q, radius), fast.range_search(q, radius)))
    built = fast.multi_index()
    more = torch.from_numpy(rng.choice([-1.0, 1.0], (50, 32)).astype(np.float32))
    flat.add(more), fast.add(more)
    for a, b in zip(flat.search(q, 20), fast.search(q, 20)):  # the tables are rebuilt after an add
        assert torch.equal(a, b)
    assert fast.multi_index() is not built and len(fast.multi_index()) == 350
    empty = HammingIndex(32, backend="mih")
    assert empty.search(q, 3)[0].shape == (10, 0) and empty.range_search(q, 3).lims.tolist() == [0] * 11
    with pytest.raises(ValueError, match="'mih' runs on CPU"):
        HammingIndex(32, backend="mih", device="meta")


def test_auto_builds_the_multi_index_once_it_pays(monkeypatch, rng):
    """auto: a scan while the predicted gain is small or has not paid for building the tables, mih after."""
    index = HammingIndex(64).add(pack_bits(torch.randn(1000, 64)))
    scan = index._backend(1, k=10)
    assert scan in ("faiss", "numpy")  # 1,000 items: no predicted gain
    monkeypatch.setattr(index_module, "predicted_work", lambda n, b, k=None, radius=None: n / 4)  # a 4x gain
    build = index_module.BUILD_COST * substring_count(64, 1000) * 1000
    per_query = 1000 - 1000 / 4
    calls = math.ceil(build / (per_query * 100))
    assert [index._backend(100, k=10) for _ in range(calls - 1)] == [scan] * (calls - 1)
    assert index._backend(100, k=10) == "mih"
    index.multi_index()
    assert index._backend(1, k=10) == "mih"  # built: used for any batch
    index.add(pack_bits(torch.randn(1, 64)))
    assert index._backend(1, k=10) == scan  # an add invalidates the tables: credit starts again
    monkeypatch.setattr(index_module, "predicted_work", lambda n, b, k=None, radius=None: n / 1.2)
    assert index._backend(10**9, k=10) == scan  # under MIH_MIN_SPEEDUP: never

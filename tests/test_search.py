"""Hamming distances, exact k-NN and range search on packed codes: every backend vs a brute-force reference."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import dmmh.hashing.search as search
from dmmh._optional import available
from dmmh.hashing import hamming_distance_packed, hamming_knn, hamming_range_search

BACKENDS = ["numpy", "torch", "auto"] + (["faiss"] if available("faiss") else [])


def ref_distances(q: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Plain bit comparison, independent of any popcount trick."""
    qb, dbb = np.unpackbits(q, axis=1), np.unpackbits(db, axis=1)
    return (qb[:, None, :] != dbb[None, :, :]).sum(-1)


def ref_knn(q, db, k):
    d = ref_distances(q, db)
    rows = [sorted(range(len(db)), key=lambda j: (d[i, j], j))[:k] for i in range(len(q))]
    ids = np.array(rows, dtype=np.int64).reshape(len(q), min(k, len(db)))
    return np.take_along_axis(d, ids, 1), ids


def random_codes(rng, n, n_bytes, ties=False):
    if ties:  # few distinct byte values → many equal distances
        return rng.choice(np.array([0, 1, 3, 255], np.uint8), (n, n_bytes))
    return rng.integers(0, 256, (n, n_bytes), dtype=np.uint8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_bytes", [1, 3, 8, 9, 16])
def test_distances(backend, n_bytes):
    rng = np.random.default_rng(n_bytes)
    q, db = random_codes(rng, 13, n_bytes), random_codes(rng, 41, n_bytes)
    got = hamming_distance_packed(torch.from_numpy(q), db, backend=backend)
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), ref_distances(q, db))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_bytes", [1, 4, 8, 16, 17])
def test_knn_matches_brute_force(backend, ties, n_bytes):
    rng = np.random.default_rng(100 * n_bytes + ties)
    q, db = random_codes(rng, 23, n_bytes, ties), random_codes(rng, 150, n_bytes, ties)
    db[40:45] = q[0]  # exact duplicates: distance 0, ordered by index
    full_d, full_i = ref_knn(q, db, len(db))
    for k in (1, 10, 149, 150, 400):
        d, i = hamming_knn(q, torch.from_numpy(db), k, backend=backend, chunk=4)
        rd, ri = full_d[:, :k], full_i[:, :k]
        assert d.dtype == torch.int32 and i.dtype == torch.int64 and d.shape == (23, min(k, 150))
        np.testing.assert_array_equal(i.numpy(), ri, err_msg=f"k={k}")
        np.testing.assert_array_equal(d.numpy(), rd, err_msg=f"k={k}")
    exact = i[0][d[0] == 0].tolist()
    assert {40, 41, 42, 43, 44} <= set(exact) and exact == sorted(exact)


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_edge_sizes(backend):
    rng = np.random.default_rng(7)
    db = random_codes(rng, 1, 8)
    d, i = hamming_knn(random_codes(rng, 3, 8), db, 5, backend=backend)
    assert i.tolist() == [[0]] * 3 and d.shape == (3, 1)
    d, i = hamming_knn(np.zeros((0, 8), np.uint8), db, 5, backend=backend)
    assert d.shape == (0, 1) and i.shape == (0, 1)
    d, i = hamming_knn(random_codes(rng, 2, 8), np.zeros((0, 8), np.uint8), 5, backend=backend)
    assert d.shape == (2, 0) and i.shape == (2, 0)
    same = np.full((6, 8), 7, np.uint8)  # all tied
    d, i = hamming_knn(same[:2], same, 4, backend=backend)
    assert i.tolist() == [[0, 1, 2, 3]] * 2 and d.tolist() == [[0] * 4] * 2


def test_torch_int64_keys(monkeypatch):
    """Wide composite keys (huge databases) take the int64 path; force it on a small case."""
    monkeypatch.setattr(search, "_INT32_KEYS", 1)
    rng = np.random.default_rng(3)
    q, db = random_codes(rng, 9, 4, ties=True), random_codes(rng, 60, 4, ties=True)
    d, i = hamming_knn(q, db, 17, backend="torch")
    rd, ri = ref_knn(q, db, 17)
    np.testing.assert_array_equal(i.numpy(), ri)
    np.testing.assert_array_equal(d.numpy(), rd)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("radius", [0, 2, 5, 200])
def test_range_search(backend, radius):
    rng = np.random.default_rng(radius)
    q, db = random_codes(rng, 11, 2, ties=True), random_codes(rng, 90, 2, ties=True)
    q[3] = 0b10101010  # a query far from the tied values: few or no hits at small radius
    res = hamming_range_search(q, db, radius, backend=backend, chunk=3)
    d = ref_distances(q, db)
    assert res.lims.shape == (12,) and res.lims[0] == 0 and res.lims[-1] == len(res.indices) == len(res.distances)
    assert res.distances.dtype == torch.int32 and res.indices.dtype == torch.int64
    for row in range(len(q)):
        hits = sorted((int(d[row, j]), j) for j in range(len(db)) if d[row, j] <= radius)
        got_d, got_i = res.query(row)
        assert list(zip(got_d.tolist(), got_i.tolist())) == hits, f"query {row}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_range_search_empty(backend):
    q, db = np.zeros((2, 8), np.uint8), np.full((5, 8), 255, np.uint8)
    res = hamming_range_search(q, db, 3, backend=backend)
    assert res.lims.tolist() == [0, 0, 0] and len(res.indices) == 0
    res = hamming_range_search(q[:0], db, 3, backend=backend)
    assert res.lims.tolist() == [0] and len(res.distances) == 0


def test_errors():
    a, b = np.zeros((2, 8), np.uint8), np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="code lengths differ: query 64 bits, database 32 bits"):
        hamming_knn(a, b, 1)
    with pytest.raises(ValueError, match="packed uint8.*float32"):
        hamming_knn(torch.zeros(2, 64), a, 1)
    with pytest.raises(TypeError, match="numpy array"):
        hamming_knn([[1]], a, 1)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            hamming_knn(a, a, k)
    with pytest.raises(ValueError, match="radius must be a non-negative integer"):
        hamming_range_search(a, a, -1)
    with pytest.raises(ValueError, match="backend must be one of"):
        hamming_knn(a, a, 1, backend="gpu")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        hamming_knn(a, a, 1, backend="numpy", chunk=0)


def test_without_optional_packages():
    """With faiss and triton unimportable, 'auto' falls back (numpy / torch) and asked-for backends say what to install."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["faiss"] = None
        sys.modules["triton"] = None
        import numpy as np, torch
        from dmmh._optional import MissingDependencyError
        from dmmh.hashing import HammingIndex, hamming_knn, pack_bits
        from dmmh.hashing.search import cpu_backend
        assert cpu_backend() == "numpy"
        rng = np.random.default_rng(0)
        db = rng.integers(0, 256, (50, 8), dtype=np.uint8)
        d, i = hamming_knn(db[:3], db, 4)
        assert i[:, 0].tolist() == [0, 1, 2]
        x = torch.randn(4, 16)
        assert (pack_bits(x).numpy() == np.packbits(x.numpy() >= 0, axis=1, bitorder="little")).all()
        for call in (lambda: hamming_knn(db, db, 1, backend="faiss"), lambda: HammingIndex(64).to_faiss()):
            try:
                call()
            except MissingDependencyError as e:
                assert "faiss-cpu" in str(e), e
            else:
                raise AssertionError("no error without faiss")
        print("FALLBACK-OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FALLBACK-OK" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n_bytes", [4, 8, 16, 300])
def test_torch_backend_on_cuda(n_bytes):
    rng = np.random.default_rng(n_bytes)
    for ties in (False, True):
        q, db = random_codes(rng, 300, n_bytes, ties), random_codes(rng, 5000, n_bytes, ties)
        d, i = hamming_knn(torch.from_numpy(q).cuda(), torch.from_numpy(db).cuda(), 100, chunk=64)
        assert d.is_cuda
        rd, ri = hamming_knn(q, db, 100, backend="numpy")
        assert torch.equal(d.cpu(), rd) and torch.equal(i.cpu(), ri)
        res = hamming_range_search(torch.from_numpy(q).cuda(), torch.from_numpy(db).cuda(), n_bytes * 2)
        ref = hamming_range_search(q, db, n_bytes * 2, backend="numpy")
        assert all(torch.equal(a.cpu(), b) for a, b in zip(res, ref))


def test_range_result_sorted_whatever_the_hit_order():
    rng = np.random.default_rng(11)
    rows, dist, cols = (torch.from_numpy(rng.integers(0, m, 200)) for m in (4, 3, 50))
    perm = torch.from_numpy(rng.permutation(200))
    res = search._gather_range(5, rows[perm], dist[perm], cols[perm])
    expected = sorted(zip(rows.tolist(), dist.tolist(), cols.tolist()))
    assert res.lims.tolist() == [0] + np.cumsum(np.bincount(rows.numpy(), minlength=5)).tolist()
    got = [(r, d, c) for r in range(5) for d, c in zip(*(t.tolist() for t in res.query(r)))]
    assert got == expected

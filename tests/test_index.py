"""HammingIndex: add/search/range search, save/load (atomic, checked), faiss export/import."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from dmmh._optional import available
from dmmh.hashing import HammingIndex, IndexFileError, pack_bits
from dmmh.hashing.index import _HEADER, MAGIC, VERSION

BACKENDS = ["numpy", "torch", "auto"] + (["faiss"] if available("faiss") else [])
needs_faiss = pytest.mark.skipif(not available("faiss"), reason="faiss not installed")


def ref_search(query_bits: np.ndarray, db_bits: np.ndarray, ids: np.ndarray, k: int):
    """Brute force on unpacked 0/1 bits, ties by insertion position."""
    d = (query_bits[:, None, :] != db_bits[None, :, :]).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, order, 1), ids[order]


def make(rng, n, n_bits=32, ties=False):
    if ties:
        x = rng.choice([-1.0, 1.0], (n, n_bits // 4)).repeat(4, axis=1)  # 4-bit blocks: many equal distances
    else:
        x = rng.standard_normal((n, n_bits))
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ties", [False, True])
def test_add_and_search_match_brute_force(backend, ties):
    rng = np.random.default_rng(int(ties))
    a, b, q = make(rng, 70, ties=ties), make(rng, 45, ties=ties), make(rng, 9, ties=ties)
    ids_a = rng.permutation(1000)[:70]  # arbitrary, unordered ids
    index = HammingIndex(32, backend=backend)
    index.add(a, ids_a)  # relaxed float codes
    index.add(pack_bits(b))  # packed codes, default ids continue from len(index)
    index.add(b[:0])  # empty add is a no-op
    assert len(index) == 115 and index.ids[70:].tolist() == list(range(70, 115))
    bits = np.concatenate([a.numpy() >= 0, b.numpy() >= 0])
    all_ids = np.concatenate([ids_a, np.arange(70, 115)])
    for k in (1, 8, 115, 500):
        d, i = index.search(q, k)
        rd, ri = ref_search(q.numpy() >= 0, bits, all_ids, k)
        np.testing.assert_array_equal(d.numpy(), rd)
        np.testing.assert_array_equal(i.numpy(), ri)
    res = index.range_search(q, 12)
    dist = (q.numpy()[:, None] >= 0) != bits[None]
    dist = dist.sum(-1)
    for row in range(len(q)):
        pos = [j for j in sorted(range(115), key=lambda j: (dist[row, j], j)) if dist[row, j] <= 12]
        got_d, got_i = res.query(row)
        assert got_i.tolist() == all_ids[pos].tolist() and got_d.tolist() == dist[row, pos].tolist()


def test_search_after_more_adds_sees_new_codes():
    """The cached faiss index must grow with later adds."""
    rng = np.random.default_rng(5)
    index = HammingIndex(16).add(make(rng, 10, 16))
    index.search(make(rng, 2, 16), 3)
    target = make(rng, 1, 16)
    index.add(target, [777])
    d, i = index.search(target, 1)
    assert i.tolist() == [[777]] and d.tolist() == [[0]]


def test_empty_index_and_bad_input():
    index = HammingIndex(16)
    d, i = index.search(torch.randn(3, 16), 5)
    assert d.shape == (3, 0) and i.shape == (3, 0)
    assert index.range_search(torch.randn(2, 16), 4).lims.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="multiple of 8"):
        HammingIndex(12)
    with pytest.raises(ValueError, match="24 bits, the index holds 16-bit"):
        index.add(torch.randn(3, 24))
    with pytest.raises(ValueError, match="3 bytes per code, the index holds 2"):
        index.add(torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="ambiguous"):
        index.add(torch.ones(4, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"ids must have shape \(4,\)"):
        index.add(torch.randn(4, 16), ids=[1, 2])
    with pytest.raises(ValueError, match="ids must be integers"):
        index.add(torch.randn(2, 16), ids=[1.5, 2.5])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(torch.randn(1, 16), 0)


@pytest.mark.parametrize("n", [0, 1, 257])
def test_save_load_round_trip(tmp_path, n):
    rng = np.random.default_rng(n)
    index = HammingIndex(64).add(make(rng, n, 64), rng.integers(-(2**62), 2**62, n))
    path = index.save(tmp_path / "codes.dmmh")
    assert [p.name for p in tmp_path.iterdir()] == ["codes.dmmh"]  # no temp file left behind
    assert path.stat().st_mode & 0o644 == 0o644  # not mkstemp's owner-only 0600
    loaded = HammingIndex.load(path)
    assert loaded.n_bits == 64 and torch.equal(loaded.codes, index.codes) and torch.equal(loaded.ids, index.ids)
    q = make(rng, 6, 64)
    for a, b in zip(index.search(q, 10), loaded.search(q, 10)):
        assert torch.equal(a, b)
    for a, b in zip(index.range_search(q, 30), loaded.range_search(q, 30)):
        assert torch.equal(a, b)


def test_save_replaces_atomically(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / "i.dmmh"
    HammingIndex(8).add(make(rng, 3, 8)).save(path)
    before = path.read_bytes()

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        HammingIndex(8).add(make(rng, 50, 8)).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["i.dmmh"]


@pytest.mark.parametrize("mmap", [False, True])
def test_bad_files(tmp_path, mmap):
    rng = np.random.default_rng(1)
    good = HammingIndex(32).add(make(rng, 20, 32)).save(tmp_path / "good.dmmh").read_bytes()
    cases = {
        "truncated payload": (good[:-40], "truncated"),
        "truncated header": (good[:12], "truncated"),
        "only part of magic": (good[:3], "truncated"),
        "empty": (b"", "truncated"),
        "foreign": (b"PK\x03\x04" + good[4:], "not a dmmh HammingIndex file"),
        "numpy file": (b"\x93NUMPY" + bytes(100), "not a dmmh HammingIndex file"),
        "trailing bytes": (good + b"\0", "trailing bytes"),
        "flipped payload bit": (good[:50] + bytes([good[50] ^ 1]) + good[51:], "checksum mismatch"),
        "newer version": (MAGIC + (2).to_bytes(4, "little") + good[12:], "format version 2"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.dmmh"
        path.write_bytes(data)
        with pytest.raises(IndexFileError, match=message):
            HammingIndex.load(path, mmap=mmap)
        with pytest.raises(IndexFileError, match=str(path.name)):
            HammingIndex.load(path, mmap=mmap)


def _load_within(path, seconds: float = 20.0, **kw):
    """``HammingIndex.load(path)`` in a thread; returns the index or the exception. A load that waits
    (on a FIFO) fails the test instead of blocking it: a writer is opened to release it."""
    out = {}

    def run():
        try:
            out["result"] = HammingIndex.load(path, **kw)
        except Exception as e:  # noqa: BLE001 - handed to the test
            out["result"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with open(path, "wb"):
            pass
        thread.join(seconds)
        pytest.fail(f"HammingIndex.load({path}) blocked for {seconds} s")
    return out["result"]


@pytest.mark.parametrize("mmap", [False, True])
def test_load_refuses_what_is_not_a_regular_file(tmp_path, mmap):
    fifo = tmp_path / "pipe.dmmh"
    os.mkfifo(fifo)
    cases = {fifo: "a FIFO", tmp_path: "a directory"}
    if os.path.exists("/dev/zero"):
        cases[Path("/dev/zero")] = "a device"
    for path, kind in cases.items():
        err = _load_within(path, mmap=mmap)
        assert isinstance(err, IndexFileError) and f"{path}: not a regular file ({kind}" in str(err), err


def _peak_bytes(call) -> tuple[int, object]:
    """Peak traced allocation (Python objects and numpy buffers) while ``call()`` runs, and its result or error."""
    tracemalloc.start()
    try:
        try:
            result = call()
        except Exception as e:  # noqa: BLE001
            result = e
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mmap", [False, True])
def test_load_checks_the_header_before_reading_the_body(tmp_path, mmap):
    """A wrong path to a big file, or a header that declares more than the file holds, costs a header read."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GiB of zeros, no disk used
    peak, err = _peak_bytes(lambda: HammingIndex.load(big, mmap=mmap))
    assert isinstance(err, IndexFileError) and "not a dmmh HammingIndex file" in str(err)
    assert peak < 1 << 20, peak
    n = 1 << 40  # declared items: 16 TiB of payload in a 100-byte file
    lying = tmp_path / "lying.dmmh"
    lying.write_bytes(MAGIC + _HEADER.pack(VERSION, 64, n, n * 16) + bytes(100))
    peak, err = _peak_bytes(lambda: HammingIndex.load(lying, mmap=mmap))
    assert isinstance(err, IndexFileError) and f"truncated: 132 bytes, expected {32 + n * 16 + 32}" in str(err)
    assert peak < 1 << 20, peak
    with open(big, "r+b") as f:  # a valid header whose size matches the sparse file: read, then the checksum fails
        f.write(MAGIC + _HEADER.pack(VERSION, 64, 10, 160))
        f.truncate(32 + 160 + 32)
    err = _load_within(big, mmap=mmap)
    assert isinstance(err, IndexFileError) and "checksum mismatch" in str(err)


def test_load_allocates_the_payload_once(tmp_path):
    rng = np.random.default_rng(3)
    path = HammingIndex(256).add(make(rng, 4000, 256)).save(tmp_path / "i.dmmh")
    peak, index = _peak_bytes(lambda: HammingIndex.load(path))
    assert isinstance(index, HammingIndex) and len(index) == 4000
    assert peak < path.stat().st_size + (1 << 16), (peak, path.stat().st_size)  # not the file's bytes plus a copy


_FAISS_PATHS = textwrap.dedent(
    """
    import gc, sys
    import faiss, numpy as np, torch
    from dmmh.hashing import HammingIndex, pack_bits

    rng = np.random.default_rng(int(sys.argv[1]))
    x = torch.from_numpy(rng.choice([-1.0, 1.0], (300, 48)).astype(np.float32))
    q = torch.from_numpy(rng.choice([-1.0, 1.0], (7, 48)).astype(np.float32))
    ids = torch.from_numpy(rng.permutation(10**6)[:300].astype(np.int64))

    def same(index, codes, ids, what):
        assert len(index) == len(codes) and torch.equal(index.codes, codes) and torch.equal(index.ids, ids), what

    def flat_of(codes):  # returned without any other reference: a temporary for the caller
        flat = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        flat.add(codes.numpy())
        return flat

    h = HammingIndex(48).add(x, ids)
    for rep in range(20):  # use-after-free shows as garbage or a crash; repeat with collections between
        same(HammingIndex.from_faiss(h.to_faiss()), h.codes, h.ids, "temporary IDMap")
        exported = h.to_faiss()
        gc.collect()
        d, i = exported.search(pack_bits(q).numpy(), 12)
        ours_d, ours_i = h.search(q, 12)
        assert (d == ours_d.numpy()).all() and (i == ours_i.numpy()).all(), "exported search"
        same(HammingIndex.from_faiss(exported), h.codes, h.ids, "IDMap")
        same(HammingIndex.from_faiss(flat_of(h.codes)), h.codes, torch.arange(300), "temporary flat")
        flat = flat_of(h.codes[:5])
        same(HammingIndex.from_faiss(flat), h.codes[:5], torch.arange(5), "flat")
        by_user = faiss.IndexBinaryIDMap(faiss.IndexBinaryFlat(48))  # over a temporary flat index
        by_user.add_with_ids(h.codes.numpy(), h.ids.numpy())
        same(HammingIndex.from_faiss(by_user), h.codes, h.ids, "IDMap over a temporary")
        blob = faiss.serialize_index_binary(h.to_faiss())
        same(HammingIndex.from_faiss(faiss.deserialize_index_binary(blob)), h.codes, h.ids, "read back")
        idmap2 = faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(48))
        idmap2.add_with_ids(h.codes[:9].numpy(), h.ids[:9].numpy())
        same(HammingIndex.from_faiss(idmap2), h.codes[:9], h.ids[:9], "IDMap2")
        gc.collect()
    survivor = HammingIndex(48).add(x[:3], [7, 8, 9]).to_faiss()  # its HammingIndex is gone
    gc.collect()
    assert survivor.ntotal == 3 and survivor.index.ntotal == 3
    assert faiss.vector_to_array(survivor.id_map).tolist() == [7, 8, 9]
    assert survivor.search(pack_bits(x[:1]).numpy(), 1)[1].tolist() == [[7]]
    path = sys.argv[2]
    faiss.write_index_binary(h.to_faiss(), path)
    same(HammingIndex.from_faiss(faiss.read_index_binary(path)), h.codes, h.ids, "file")
    empty = HammingIndex.from_faiss(HammingIndex(16).to_faiss())
    assert len(empty) == 0 and empty.n_bits == 16 and empty.codes.shape == (0, 2)
    try:
        HammingIndex.from_faiss(faiss.IndexBinaryHash(48, 8))
    except TypeError as e:
        assert "IndexBinaryFlat" in str(e)
    else:
        raise AssertionError("IndexBinaryHash accepted")
    print("FAISS-PATHS-OK")
    """
)


@needs_faiss
def test_faiss_conversions_in_every_form(rng, tmp_path):
    """to_faiss / from_faiss on variables, temporaries, files, IDMap2; a subprocess, so a segfault fails the test."""
    seed = int(rng.integers(2**31))
    proc = subprocess.run([sys.executable, "-c", _FAISS_PATHS, str(seed), str(tmp_path / "f.index")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "FAISS-PATHS-OK" in proc.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_index_matches_cpu():
    rng = np.random.default_rng(4)
    x, q = make(rng, 3000, 128, ties=True), make(rng, 50, 128, ties=True)
    cpu, gpu = HammingIndex(128).add(x), HammingIndex(128, device="cuda").add(x.cuda())
    for a, b in zip(cpu.search(q, 100), gpu.search(q.cuda(), 100)):
        assert torch.equal(a, b.cpu())

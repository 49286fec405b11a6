"""HammingIndex files at any size: streaming save, memory-mapped load, streaming merge of index files."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from dmmh._optional import available
from dmmh.hashing import HammingIndex, IndexFileError
from dmmh.hashing.index import BLOCK_BYTES

BACKENDS = ["numpy", "torch", "mih", "auto"] + (["faiss"] if available("faiss") else [])
MB = 1 << 20


def old_save(index: HammingIndex, path) -> bytes:
    """The writer before streaming (format version 1), kept here as the reference bytes."""
    codes, ids = index.codes.cpu().contiguous(), index.ids.cpu().contiguous()
    payload = codes.numpy().tobytes() + ids.numpy().astype("<i8").tobytes()
    header = struct.pack("<IIQQ", 1, index.n_bits, codes.shape[0], len(payload))
    data = b"DMMHHIX\0" + header + payload + hashlib.sha256(header + payload).digest()
    with open(path, "wb") as f:
        f.write(data)
    return data


def random_index(rng, n: int, n_bits: int, parts: int = 1) -> HammingIndex:
    """``n`` random codes and ids, added in ``parts`` calls (pending, not yet flushed), one with strided ids."""
    index = HammingIndex(n_bits)
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    for lo, hi in zip([0, *cuts], [*cuts, n]):
        codes = torch.from_numpy(rng.integers(0, 256, (hi - lo, n_bits // 8), dtype=np.uint8))
        ids = torch.from_numpy(rng.integers(-(2**62), 2**62, 2 * (hi - lo)))[::2]  # not contiguous
        index.add(codes, ids)
    return index


def peak_bytes(call):
    """Peak traced allocation (Python objects and numpy buffers) while ``call()`` runs, and its result."""
    tracemalloc.start()
    try:
        result = call()
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


def same(a: HammingIndex, b: HammingIndex) -> bool:
    return a.n_bits == b.n_bits and torch.equal(a.codes, b.codes) and torch.equal(a.ids, b.ids)


# ------------------------------------------------------------------------------ save


@pytest.mark.parametrize("n_bits", [8, 24, 64, 256])
def test_save_writes_the_old_writers_bytes(rng, tmp_path, n_bits, monkeypatch):
    for n in (0, 1, int(rng.integers(2, 3000))):
        index = random_index(rng, n, n_bits, parts=int(rng.integers(1, 4)))
        new = index.save(tmp_path / "new.dmmh").read_bytes()  # before the pending adds are flushed
        assert new == old_save(index, tmp_path / "old.dmmh")
        assert index.save(tmp_path / "flushed.dmmh").read_bytes() == new  # and after
    monkeypatch.setattr("dmmh.hashing.index.BLOCK_BYTES", 5 * n_bits // 8)  # several blocks, a short last one
    index = random_index(rng, 23, n_bits, parts=3)
    assert index.save(tmp_path / "small-blocks.dmmh").read_bytes() == old_save(index, tmp_path / "old.dmmh")


def test_save_streams_a_64_MB_index(rng, tmp_path):
    index = random_index(rng, 4 << 20, 64, parts=3)  # 32 MB of codes + 32 MB of ids
    peak, path = peak_bytes(lambda: index.save(tmp_path / "big.dmmh"))
    assert path.stat().st_size == 64 * MB + 64
    assert peak < BLOCK_BYTES + MB, peak  # one block of strided ids made contiguous, nothing of the index's size
    assert same(HammingIndex.load(path, mmap=True), index)


# ------------------------------------------------------------------------------ load(mmap=True)


def test_mmap_load_of_a_64_MB_index_maps_it(rng, tmp_path):
    index = random_index(rng, 4 << 20, 64)
    path = index.save(tmp_path / "big.dmmh")
    for verify in (True, False):
        peak, loaded = peak_bytes(lambda: HammingIndex.load(path, mmap=True, verify=verify))
        assert peak < MB, peak  # the in-memory load allocates the file's 64 MB (test_index.py)
        assert same(loaded, index)
    q = index.codes[rng.integers(0, len(index), 5)]
    d, i = loaded.search(q, 3)
    assert (d[:, 0] == 0).all() and torch.equal(index.search(q, 3)[0], d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmap_index_searches_like_the_loaded_one(rng, tmp_path, backend):
    # 8- and 24-bit codes with an odd count put the ids at an offset that is not a multiple of 8
    for n_bits, n in ((8, int(rng.integers(1, 400)) | 1), (24, 301), (128, 1000)):
        x = np.repeat(rng.integers(0, 256, (n // 3 + 1, n_bits // 8), dtype=np.uint8), 3, axis=0)[:n]  # ties
        ids = rng.permutation(10**6)[:n]
        path = HammingIndex(n_bits).add(torch.from_numpy(x), ids).save(tmp_path / f"{n_bits}.dmmh")
        ref, mapped = HammingIndex.load(path, backend=backend), HammingIndex.load(path, backend=backend, mmap=True)
        q = torch.from_numpy(np.concatenate([x[:3], rng.integers(0, 256, (4, n_bits // 8), dtype=np.uint8)]))
        for k in (1, 7, n + 5):
            for a, b in zip(ref.search(q, k), mapped.search(q, k)):
                assert torch.equal(a, b)
        for a, b in zip(ref.range_search(q, n_bits // 4), mapped.range_search(q, n_bits // 4)):
            assert torch.equal(a, b)
        if available("faiss"):
            exported = mapped.to_faiss()
            assert same(HammingIndex.from_faiss(exported), ref)
            d, i = exported.search(q.numpy(), 5)
            ref_d, ref_i = ref.search(q, 5)  # min(5, n) columns; faiss pads the rest with id -1
            m = min(5, n)
            assert ref_i.shape == (len(q), m) and (i[:, m:] == -1).all()
            assert (d[:, :m] == ref_d.numpy()).all() and (i[:, :m] == ref_i.numpy()).all()


def test_mmap_index_is_copy_on_write(rng, tmp_path):
    """Writes to a mapped index (in place, or by add) never reach its file; add then save streams both."""
    index = random_index(rng, 50, 32)
    path = index.save(tmp_path / "i.dmmh")
    before = path.read_bytes()
    mapped = HammingIndex.load(path, mmap=True)
    mapped.codes[0] ^= 0xFF  # the caller's tensor is writable: a private copy of that page
    mapped.ids[1] = -7
    assert path.read_bytes() == before and same(HammingIndex.load(path), index)
    assert mapped.codes[0].tolist() == (index.codes[0] ^ 0xFF).tolist() and mapped.ids[1] == -7

    mapped = HammingIndex.load(path, mmap=True)
    more = random_index(rng, 20, 32)
    mapped.add(more.codes, more.ids)
    mapped.save(path)  # over its own mapped file: replaced by rename, the mapping keeps the old one
    reference = HammingIndex(32).add(index.codes, index.ids).add(more.codes, more.ids)
    assert path.read_bytes() == old_save(reference, tmp_path / "ref.dmmh")
    q = reference.codes[::7]
    for a, b in zip(mapped.search(q, 4), reference.search(q, 4)):  # the search flushes: codes copied into memory
        assert torch.equal(a, b)
    assert same(mapped, reference) and same(HammingIndex.load(path, mmap=True), reference)


def test_verify_false_skips_only_the_checksum(rng, tmp_path):
    path = random_index(rng, 40, 16).save(tmp_path / "i.dmmh")
    data = bytearray(path.read_bytes())
    data[32 + 5] ^= 1  # a code byte
    path.write_bytes(bytes(data))
    for mmap in (False, True):
        with pytest.raises(IndexFileError, match="i.dmmh: checksum mismatch"):
            HammingIndex.load(path, mmap=mmap)
        loaded = HammingIndex.load(path, mmap=mmap, verify=False)  # documented: corruption goes unnoticed
        assert loaded.codes.numpy().tobytes()[5] == data[32 + 5]
    path.write_bytes(bytes(data[:-1]))
    for mmap in (False, True):  # the header and size checks stay
        with pytest.raises(IndexFileError, match="truncated"):
            HammingIndex.load(path, mmap=mmap, verify=False)


# ------------------------------------------------------------------------------ merge


def test_merge_equals_adding_the_files_in_a_loop(rng, tmp_path):
    n_bits = int(rng.choice([8, 16, 40, 64, 128]))
    sizes = [0, 1, *rng.integers(0, 500, int(rng.integers(1, 6)))]
    rng.shuffle(sizes)
    paths = [random_index(rng, int(n), n_bits, parts=2).save(tmp_path / f"s{i}.dmmh") for i, n in enumerate(sizes)]
    out = HammingIndex.merge_files(paths, tmp_path / "out.dmmh")
    loop = HammingIndex(n_bits)
    for p in paths:
        part = HammingIndex.load(p)
        loop.add(part.codes, part.ids)
    assert out.read_bytes() == old_save(loop, tmp_path / "ref.dmmh")
    codes = np.concatenate([np.frombuffer(p.read_bytes()[32:32 + n * n_bits // 8], np.uint8) for p, n in zip(paths, sizes)])
    merged = HammingIndex.load(out)
    assert merged.codes.numpy().reshape(-1).tolist() == codes.tolist() and len(merged) == sum(sizes)
    # one input, and the same file twice
    assert HammingIndex.merge_files(paths[:1], tmp_path / "one.dmmh").read_bytes() == paths[0].read_bytes()
    twice = HammingIndex.load(HammingIndex.merge_files([paths[0], paths[0]], tmp_path / "twice.dmmh"))
    first = HammingIndex.load(paths[0])
    assert same(twice, HammingIndex(n_bits).add(first.codes, first.ids).add(first.codes, first.ids))


def test_merge_streams_64_MB_of_shards(rng, tmp_path):
    index = random_index(rng, 4 << 20, 64)
    cuts = [0, *np.sort(rng.integers(0, len(index), 4)), len(index)]
    paths = []
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        paths.append(HammingIndex(64).add(index.codes[lo:hi], index.ids[lo:hi]).save(tmp_path / f"s{i}.dmmh"))
    seen = []
    peak, out = peak_bytes(lambda: HammingIndex.merge_files(paths, tmp_path / "out.dmmh", check=lambda i, s: seen.append((i, len(s)))))
    assert peak < MB, peak  # no copy at all: the mapped shards are written as they are
    assert seen == [(i, hi - lo) for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:]))]
    assert same(HammingIndex.load(out, mmap=True), index)


def test_merge_refuses_bad_inputs_and_leaves_out_alone(rng, tmp_path):
    a = random_index(rng, 30, 32).save(tmp_path / "a.dmmh")
    b = random_index(rng, 20, 32).save(tmp_path / "b.dmmh")
    out = tmp_path / "out.dmmh"
    out.write_bytes(b"previous")

    def refused(paths, match, error=IndexFileError, **kw):
        with pytest.raises(error, match=match):
            HammingIndex.merge_files(paths, out, **kw)
        assert out.read_bytes() == b"previous" and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    refused([], "no input files", ValueError)
    other_bits = random_index(rng, 5, 16).save(tmp_path / "c.dmmh")
    refused([a, other_bits], "c.dmmh: 16-bit codes, .*a.dmmh holds 32-bit codes")
    corrupt = tmp_path / "corrupt.dmmh"
    data = bytearray(b.read_bytes())
    data[-40] ^= 4  # an id byte: found by the checksum of the first pass, before any id is written
    corrupt.write_bytes(bytes(data))
    refused([a, corrupt], "corrupt.dmmh: checksum mismatch")
    corrupt.write_bytes(bytes(data[:-3]))
    refused([a, corrupt], "corrupt.dmmh: truncated")
    refused([a, tmp_path / "missing.dmmh"], "missing.dmmh", FileNotFoundError)
    refused([a, tmp_path], "not a regular file", IndexFileError)

    def veto(i, shard):
        if i == 1:
            raise RuntimeError(f"shard {i} vetoed ({len(shard)} items)")

    refused([a, b], r"shard 1 vetoed \(20 items\)", RuntimeError, check=veto)

    def replace_b(i, shard):  # another valid file of the same size, renamed over b between the two passes
        if i == 1:
            random_index(rng, 20, 32).save(b)

    refused([a, b], "b.dmmh: changed during the merge", check=replace_b)

"""ChunkStore: chunked results that resume, describe themselves, verify what they reuse, one writer."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal

import numpy as np
import pytest

from dmmh._io import write_npz
from dmmh.chunks import ChunkStore, ChunkStoreBusy

RECORD = {"model": "tiny", "weights": "ab" * 32, "items": 7}


def full_arrays(rng, n):
    return {"image": rng.standard_normal((n, 4)).astype(np.float32), "ids": rng.integers(-5, 5, n),
            "mask": rng.random((n, 2)) < 0.5}


def rows_of(arrays, rows):
    return {k: a[rows.start : rows.stop] for k, a in arrays.items()}


def expected_chunks(n, size):
    out, start = [], 0
    while start < n:
        out.append(range(start, min(start + size, n)))
        start += size
    return out


def fill(folder, arrays, n=7, size=3, record=RECORD, only=None):
    with ChunkStore(folder, record, n, size) as store:
        for i, rows in enumerate(store.pending()):
            if only is None or i in only:
                store.write(rows, rows_of(arrays, rows), info={"batch_size": 2})
    return store


def load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rewrite(path, arrays, entry_updates=None):
    """Rewrite a chunk file with ``arrays``; ``entry_updates`` (name → array) also updates its
    record so that dtype, shape and checksum are consistent with the new arrays."""
    entry = json.loads(str(arrays.pop("__chunk__")))
    for name, a in (entry_updates or {}).items():
        entry["arrays"][name] = {"dtype": a.dtype.str, "shape": list(a.shape),
                                 "sha256": hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()}
    write_npz(path, {**arrays, "__chunk__": np.array(json.dumps(entry))})


@pytest.mark.parametrize("n,size", [(7, 3), (6, 3), (1, 1), (5, 10), (4, 1)])
def test_round_trip_and_layout(tmp_path, rng, n, size):
    arrays = full_arrays(rng, n)
    folder = tmp_path / "out.parts"
    with ChunkStore(folder, RECORD, n, size) as store:
        assert store.pending() == expected_chunks(n, size)
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["record"] == RECORD and meta["n_rows"] == n and meta["chunk_size"] == size
        for rows in store.pending():
            store.write(rows, rows_of(arrays, rows), info={"rows": len(rows)})
        assert store.pending() == []
        got = store.read_all()
        assert store.chunk_infos() == [{"rows": len(r)} for r in expected_chunks(n, size)]
    assert sorted(got) == sorted(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a), k
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([".lock", "meta.json"] + [f"chunk_{i:06d}.npz" for i in range(len(expected_chunks(n, size)))])
    store.remove()
    assert list(tmp_path.iterdir()) == []
    store.remove()  # already gone: nothing to do


def test_resume_reuses_only_finished_chunks(tmp_path, rng):
    arrays = full_arrays(rng, 7)
    folder = tmp_path / "p"
    fill(folder, arrays, only={0, 2})
    chunk0 = (folder / "chunk_000000.npz").read_bytes()
    with ChunkStore(folder, dict(RECORD), 7, 3) as store:
        assert store.pending() == [range(3, 6)]
        assert store.chunk_infos() == [{"batch_size": 2}, None, {"batch_size": 2}]
        store.write(range(3, 6), rows_of(arrays, range(3, 6)), info={"batch_size": 1})
        got = store.read_all()
        assert store.chunk_infos() == [{"batch_size": 2}, {"batch_size": 1}, {"batch_size": 2}]
    assert (folder / "chunk_000000.npz").read_bytes() == chunk0  # reused, not rewritten
    assert all(np.array_equal(got[k], a) for k, a in arrays.items())


@pytest.mark.parametrize("change,field", [
    (dict(record={**RECORD, "weights": "cd" * 32}), r"record\['weights'\] is 'abab"),
    (dict(record={**RECORD, "extra": 1}), r"record\['extra'\] is '<missing>' there but 1 here"),
    (dict(n=8), "n_rows is 7 there but 8 here"),
    (dict(size=2), "chunk_size is 3 there but 2 here"),
])
def test_folder_of_another_run_is_refused(tmp_path, rng, change, field):
    folder = tmp_path / "p"
    fill(folder, full_arrays(rng, 7), only={0})
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = {"record": RECORD, "n": 7, "size": 3, **change}
    store = ChunkStore(folder, args["record"], args["n"], args["size"])
    with pytest.raises(ValueError, match=f"{folder} was made by another run: {field}.*refusing to mix"):
        store.open()
    with pytest.raises(ValueError, match="another run"):
        store.remove()  # never deletes another run's folder
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_folder_without_valid_meta_is_refused(tmp_path, rng):
    fill(tmp_path / "good", full_arrays(rng, 7))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tmp_path / "good" / "chunk_000000.npz", bare)  # chunks, no metadata (what an old run could leave)
    with pytest.raises(ValueError, match=f"{bare} has no meta.json.*refusing to adopt"):
        ChunkStore(bare, RECORD, 7, 3).open()
    assert sorted(p.name for p in bare.iterdir()) == ["chunk_000000.npz"]  # untouched: not even a lock file
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no meta.json"):
        ChunkStore(tmp_path / "empty", RECORD, 7, 3).open()
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a folder"):
        ChunkStore(tmp_path / "file", RECORD, 7, 3).open()
    (tmp_path / "good" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"good/meta.json: unreadable chunk folder metadata"):
        ChunkStore(tmp_path / "good", RECORD, 7, 3).open()
    (tmp_path / "good" / "meta.json").write_text(json.dumps({"record": RECORD}))
    with pytest.raises(ValueError, match="not a ChunkStore's metadata"):
        ChunkStore(tmp_path / "good", RECORD, 7, 3).open()


def tamper_duplicated_row(path, other):
    a = load(path)
    a["image"][1] = a["image"][0]
    rewrite(path, a)


def tamper_extra_row(path, other):
    a = load(path)
    a["image"], a["ids"], a["mask"] = (np.concatenate([a[k], a[k][:1]]) for k in ("image", "ids", "mask"))
    rewrite(path, a)


def tamper_edited_value(path, other):
    a = load(path)
    a["image"][2, 3] += 1e-3
    rewrite(path, a)


def tamper_nan_with_valid_checksum(path, other):
    a = load(path)
    a["image"][0, 1] = np.nan
    rewrite(path, a, {"image": a["image"]})


def tamper_other_dtype(path, other):
    a = load(path)
    a["image"] = a["image"].astype(np.float64)
    rewrite(path, a)


def tamper_other_dtype_recorded(path, other):  # consistent with its own record, not with the others
    a = load(path)
    a["image"] = a["image"].astype(np.float64)
    rewrite(path, a, {"image": a["image"]})


def tamper_other_width_recorded(path, other):
    a = load(path)
    a["image"] = a["image"][:, :3].copy()
    rewrite(path, a, {"image": a["image"]})


def tamper_from_another_run(path, other):
    shutil.copy(other / path.name, path)  # same record, same rows, another folder's run


def tamper_moved(path, other):
    shutil.copy(path.with_name("chunk_000000.npz"), path)  # chunk 0's file under chunk 1's name


def tamper_truncated(path, other):
    path.write_bytes(path.read_bytes()[:300])


def tamper_no_record(path, other):
    a = load(path)
    del a["__chunk__"]
    write_npz(path, a)


@pytest.mark.parametrize("tamper,reason", [
    (tamper_duplicated_row, "'image' does not match its checksum"),
    (tamper_extra_row, "has shape \\(4,.*\\), its record says \\[3.*\\] and the chunk has 3 rows"),
    (tamper_edited_value, "'image' does not match its checksum"),
    (tamper_nan_with_valid_checksum, "'image' has nan at row 0, column 1; expected finite"),
    (tamper_other_dtype, "'image' has dtype <f8, its record says <f4"),
    (tamper_other_dtype_recorded, "differ in dtype or width from chunk 0's"),
    (tamper_other_width_recorded, "differ in dtype or width from chunk 0's"),
    (tamper_from_another_run, "written by another run"),
    (tamper_moved, "records chunk 0, rows \\[0, 3\\), 3 rows, but this is chunk 1, rows \\[3, 6\\)"),
    (tamper_truncated, "unreadable"),
    (tamper_no_record, "no valid '__chunk__' record"),
])
def test_bad_chunk_is_an_error_in_read_all_and_recomputed_by_pending(tmp_path, rng, tamper, reason):
    arrays = full_arrays(rng, 7)
    folder, other = tmp_path / "p", tmp_path / "other"
    fill(folder, arrays)
    fill(other, arrays)
    bad = folder / "chunk_000001.npz"
    tamper(bad, other)
    with ChunkStore(folder, RECORD, 7, 3) as store:
        with pytest.raises(ValueError, match=f"{bad}: .*{reason}.*run again to recompute it"):
            store.read_all()
        with pytest.warns(UserWarning, match=f"{bad}: .*{reason}.*recomputing it"):
            assert store.pending() == [range(3, 6)]
        assert not bad.exists()
        store.write(range(3, 6), rows_of(arrays, range(3, 6)))
        got = store.read_all()
    assert all(np.array_equal(got[k], a) for k, a in arrays.items())


def test_write_refuses_what_it_cannot_verify_later(tmp_path, rng):
    arrays = full_arrays(rng, 7)
    store = ChunkStore(tmp_path / "p", RECORD, 7, 3)
    with pytest.raises(RuntimeError, match="with block"):
        store.write(range(0, 3), rows_of(arrays, range(0, 3)))
    with store:
        for rows in (range(1, 4), range(0, 2), range(6, 9), range(0, 3, 2), [0, 1, 2]):
            with pytest.raises(ValueError, match="are not a chunk"):
                store.write(rows, rows_of(arrays, range(0, 3)))
        with pytest.raises(ValueError, match=r"chunk 0 \(rows \[0, 3\)\): array 'image' has shape \(2, 4\), expected 3 rows"):
            store.write(range(0, 3), {**rows_of(arrays, range(0, 3)), "image": arrays["image"][:2]})
        for value in (np.nan, np.inf, -np.inf):
            x = arrays["image"][3:6].copy()
            x[2, 1] = value
            with pytest.raises(ValueError, match=r"chunk 1 \(rows \[3, 6\)\): array 'image' has -?(nan|inf) at row 2, column 1; expected finite"):
                store.write(range(3, 6), {**rows_of(arrays, range(3, 6)), "image": x})
        with pytest.raises(TypeError, match="dtype object"):
            store.write(range(0, 3), {"o": np.array([object()] * 3)})
        with pytest.raises(TypeError, match="dtype <U1"):
            store.write(range(0, 3), {"s": np.array(["a"] * 3)})
        with pytest.raises(ValueError, match="array name"):
            store.write(range(0, 3), {"__chunk__": np.zeros(3)})
        with pytest.raises(ValueError, match="no arrays"):
            store.write(range(0, 3), {})
        with pytest.raises(TypeError, match="info must be JSON-able"):
            store.write(range(0, 3), rows_of(arrays, range(0, 3)), info={"f": object()})
        assert store.pending() == expected_chunks(7, 3)  # nothing was written
        store.write(range(0, 3), rows_of(arrays, range(0, 3)))
        with pytest.raises(ValueError, match="differ in dtype or width from the finished chunks"):
            store.write(range(3, 6), {**rows_of(arrays, range(3, 6)), "image": arrays["image"][3:6].astype(np.float64)})
        with pytest.raises(ValueError, match="not written yet \\(chunk_000001.npz, chunk_000002.npz\\)"):
            store.read_all()


def test_bad_arguments(tmp_path):
    for n, size in ((0, 3), (3, 0), (2.5, 1), (True, 1)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            ChunkStore(tmp_path, RECORD, n, size)
    with pytest.raises(TypeError, match="JSON-able"):
        ChunkStore(tmp_path, {"x": object()}, 3, 1)
    with pytest.raises(TypeError, match="JSON-able"):
        ChunkStore(tmp_path, {"x": float("nan")}, 3, 1)


def _hold(folder, ready, release, write_first):
    with ChunkStore(folder, RECORD, 7, 3) as store:
        if write_first:
            store.write(range(0, 3), {"x": np.arange(3.0)})
        ready.set()
        release.wait(30)
        if write_first == "die":
            os.kill(os.getpid(), signal.SIGKILL)


def test_second_writer_gets_a_clear_busy_error(tmp_path):
    ctx = mp.get_context("fork")
    folder = tmp_path / "p"
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(folder, ready, release, False))
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(ChunkStoreBusy, match=f"{folder} is in use: another run .* holds its lock"):
            ChunkStore(folder, RECORD, 7, 3).open()
        with pytest.raises(ChunkStoreBusy):
            ChunkStore(folder, RECORD, 7, 3).remove()
        assert isinstance(ChunkStoreBusy("x"), RuntimeError)
    finally:
        release.set()
        child.join(30)
    assert child.exitcode == 0
    with ChunkStore(folder, RECORD, 7, 3) as store:  # free again
        with pytest.raises(ChunkStoreBusy):  # two stores in one process exclude each other too
            ChunkStore(folder, RECORD, 7, 3).open()
        assert len(store.pending()) == 3


def test_a_killed_writer_leaves_its_chunks_and_no_lock(tmp_path):
    ctx = mp.get_context("fork")
    folder = tmp_path / "p"
    ready, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(folder, ready, release, "die"))
    child.start()
    assert ready.wait(30)
    release.set()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    with ChunkStore(folder, RECORD, 7, 3) as store:
        assert store.pending() == [range(3, 6), range(6, 7)]

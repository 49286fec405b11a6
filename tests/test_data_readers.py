"""Feature-file readers: every format gives the same arrays; bad files give errors naming file,
key, expected vs found, before any data is read; HDF5 data outside the file is refused unless
allowed; safetensors goes through its own library."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tracemalloc
import warnings
import zipfile
import zlib

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse
from _benchmark_files import (
    KEYS, WRITERS, huge_rows, make_arrays, mat5_compress, npy_header, write, write_declaring, write_mat73, write_npz,
)

import dmmh.data.matlab as matlab
import dmmh.data.readers as readers
from dmmh._arrayfiles import SafetensorsArray, read_arrays
from dmmh.data.cache import write_npy_folder
from dmmh.data.readers import (
    ALL_KEYS, FileFormatError, detect_format, find_feature_file, read_feature_file, validate_feature_file,
)


def _headers_only(source, names, check=None, lazy=False, where=""):
    """read_arrays that fails if it gets past the layout check to the data."""
    def check_then_stop(headers):
        check(headers)
        raise AssertionError("the layout check passed: the data would be read")

    return read_arrays(source, names, check_then_stop, lazy, where)


@pytest.fixture
def arrays(rng):
    return make_arrays(rng, classes=24)


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
    assert (ff.mmapped | ff.lazy == set(ALL_KEYS)) is mmapped
    assert all(isinstance(ff.arrays[k], np.memmap) for k in ff.mmapped)
    assert all(isinstance(ff.arrays[k], SafetensorsArray) for k in ff.lazy)
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


def test_fifo_and_device_are_refused_without_reading(tmp_path):
    os.mkfifo(tmp_path / "pipe.mat")  # opening it for reading would wait for a writer forever
    for path in (tmp_path / "pipe.mat", "/dev/zero"):
        with pytest.raises(FileFormatError, match=r"is not a regular file"):
            read_feature_file(path)


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


LAYOUT_CASES = {"missing", "rows", "width", "ndim"}  # found from the headers, before any data is read


@pytest.mark.parametrize(("fmt", "case"), [(f, c) for f in ("mat73", "mat5", "npz", "safetensors") for c in CASES] + [("npz", "ndim")])
def test_bad_files_name_file_key_expected_and_found(tmp_path, arrays, fmt, case, monkeypatch):
    bad, needles = _bad(arrays, case)
    path = write(fmt, tmp_path, bad)
    if case in LAYOUT_CASES:
        monkeypatch.setattr(readers, "read_arrays", _headers_only)
    with pytest.raises(FileFormatError) as err:
        validate_feature_file(read_feature_file(path), num_classes=24, dataset="MIR-Flickr25K")
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle.lower() in msg.lower(), (needle, msg)


def test_missing_key_lists_expected_and_found(tmp_path, arrays):
    del arrays["L_tr"], arrays["I_db"]
    arrays["extra"] = np.zeros((2, 2))
    with pytest.raises(FileFormatError, match=r"missing key\(s\) L_tr, I_db; expected all of I_tr, .*found I_te, .*extra"):
        read_feature_file(write_npz(tmp_path / "x.npz", arrays))


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


_DYING_WRITER = """
import os, sys, numpy as np
from dmmh.data.cache import write_npy_folder
class Dies:  # an array whose rows cannot be read: the writer is killed mid-write
    shape, dtype = (10, 3), np.dtype("f4")
    def __getitem__(self, rows):
        os._exit(9)
write_npy_folder({"a": np.ones((4, 2)), "b": Dies()}, sys.argv[1])
"""


def test_a_killed_cache_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path, arrays):
    proc = subprocess.run([sys.executable, "-c", _DYING_WRITER, str(tmp_path / "cache")], capture_output=True, text=True,
                          timeout=300, env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 9, proc.stderr[-2000:]
    (stale,) = tmp_path.iterdir()
    assert stale.name.startswith(".cache.") and (stale / "a.npy").is_file()
    write_npy_folder(arrays, tmp_path / "cache")
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]


# -- HDF5: data outside the file ----------------------------------------------------------------
def _write_outside(kind: str, folder, arrays):
    """A MATLAB v7.3 file whose I_tr lives outside it (``kind``), and the I_tr it stands for.
    Its own bytes at the offset the other file uses hold something else."""
    target = np.ascontiguousarray(arrays["I_tr"].T) * -3  # what the outside data holds, stored (columns, rows)
    with h5py.File(folder / "other.h5", "w") as f:
        f.create_dataset("pad", data=np.arange(100.0))  # so the offsets in the two files differ
        f.create_dataset("x", data=target)
    (folder / "raw.bin").write_bytes(target.tobytes())
    path = write_mat73(folder / "mir_cnn_twt.mat", {k: a for k, a in arrays.items() if k != "I_tr"})
    with h5py.File(path, "r+") as f:
        if kind == "external_link":
            f["I_tr"] = h5py.ExternalLink("other.h5", "/x")
        elif kind == "soft_to_external":
            f["ext"] = h5py.ExternalLink("other.h5", "/x")
            f["I_tr"] = h5py.SoftLink("/ext")
        elif kind == "raw_external":
            f.create_dataset("I_tr", shape=target.shape, dtype=target.dtype, external=[("raw.bin", 0, target.nbytes)])
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=target.shape, dtype=target.dtype)
            layout[:] = h5py.VirtualSource("other.h5", "x", shape=target.shape)
            f.create_virtual_dataset("I_tr", layout)
        elif kind == "soft_in_file":
            f.create_dataset("stored", data=target)
            f["I_tr"] = h5py.SoftLink("/stored")
    return path, target.T


OUTSIDE = ["external_link", "soft_to_external", "raw_external", "virtual"]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("kind", OUTSIDE)
def test_hdf5_data_outside_the_file_is_refused_by_default_and_read_correctly_when_allowed(tmp_path, arrays, kind, mmap, monkeypatch):
    path, want = _write_outside(kind, tmp_path, arrays)
    with pytest.raises(FileFormatError, match=rf"{re.escape(str(path))} .*key 'I_tr' is .*outside this file.*allow_external=True"):
        read_feature_file(path, mmap=mmap)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative names resolve against the file's folder, not the working directory
    ff = read_feature_file(path, mmap=mmap, allow_external=True)
    np.testing.assert_array_equal(np.asarray(ff.arrays["I_tr"]), want)
    for key in ALL_KEYS[1:]:
        np.testing.assert_array_equal(np.asarray(ff.arrays[key]), arrays[key], err_msg=key)
    validate_feature_file(ff, 24)


def test_hdf5_soft_link_inside_the_file_is_read_and_memory_mapped(tmp_path, arrays):
    path, want = _write_outside("soft_in_file", tmp_path, arrays)
    ff = read_feature_file(path)
    assert "I_tr" in ff.mmapped
    np.testing.assert_array_equal(ff.arrays["I_tr"], want)


def test_hdf5_float_in_another_encoding_is_converted_not_memory_mapped(tmp_path, arrays):
    """A float type other than IEEE's (here another exponent bias; h5py calls it float128, a bit
    flip can keep it float64) must go through HDF5's conversion: its raw bytes are not IEEE."""
    path = write_mat73(tmp_path / "m.mat", {k: a for k, a in arrays.items() if k != "T_te"})
    ftype = h5py.h5t.IEEE_F64LE.copy()
    ftype.set_ebias(1000)
    with h5py.File(path, "r+") as f:
        ds = h5py.h5d.create(f.id, b"T_te", ftype, h5py.h5s.create_simple(arrays["T_te"].shape[::-1]))
        ds.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(arrays["T_te"].T), mtype=h5py.h5t.NATIVE_DOUBLE)
    ff = read_feature_file(path)
    assert "T_te" not in ff.mmapped and "I_te" in ff.mmapped
    np.testing.assert_array_equal(ff.arrays["T_te"], arrays["T_te"])


def test_hdf5_chunk_smaller_than_its_unfiltered_data_is_refused(tmp_path, arrays):
    """A chunk whose filter mask says "not compressed" but which holds fewer bytes than its data:
    HDF5 returns stale memory for the rest (different values on every read) instead of failing."""
    path = write_mat73(tmp_path / "m.mat", {k: a for k, a in arrays.items() if k != "T_db"}, compress=True)
    stored = np.ascontiguousarray(arrays["T_db"].T)
    with h5py.File(path, "r+") as f:
        ds = f.create_dataset("T_db", shape=stored.shape, dtype=stored.dtype, chunks=stored.shape, compression="gzip")
        ds.id.write_direct_chunk((0, 0), zlib.compress(stored.tobytes()), filter_mask=1)  # deflate marked as skipped
    with pytest.raises(FileFormatError, match=rf"key 'T_db' has a chunk of \d+ bytes .*\(filter mask 1\) where {stored.nbytes} bytes"):
        read_feature_file(path)


def test_hdf5_dangling_and_cyclic_soft_links_are_errors_naming_the_key(tmp_path, arrays):
    path = write_mat73(tmp_path / "m.mat", {k: a for k, a in arrays.items() if k not in ("I_tr", "T_tr")})
    with h5py.File(path, "r+") as f:
        f["I_tr"] = h5py.SoftLink("/nowhere")
        f["T_tr"] = h5py.SoftLink("/T_tr")
    with pytest.raises(FileFormatError, match=r"key 'I_tr' leads to '/nowhere', which does not exist"):
        read_feature_file(path)
    with h5py.File(path, "r+") as f:
        del f["I_tr"]
        f.create_dataset("I_tr", data=arrays["I_tr"].T)
    with pytest.raises(FileFormatError, match=r"key 'T_tr' is a chain of more than 16 soft links"):
        read_feature_file(path)


# -- safetensors through its library --------------------------------------------------------------
def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize("case", ["overlap", "short", "past_end", "bad_json"])
def test_malformed_safetensors_rejected_by_the_library_with_the_file_name(tmp_path, arrays, case):
    f32 = {"dtype": "F32", "shape": [2, 2]}
    header, data = {"I_tr": f32 | {"data_offsets": [0, 16]}, "T_tr": f32 | {"data_offsets": [16, 32]}}, bytes(32)
    if case == "overlap":  # T_tr reuses 8 of I_tr's bytes
        header["T_tr"]["data_offsets"] = [8, 24]
        data = bytes(24)
    elif case == "short":  # 2x2 float32 needs 16 bytes, the offsets give 8
        header["T_tr"]["data_offsets"] = [16, 24]
        data = bytes(24)
    elif case == "past_end":
        data = bytes(20)
    path = tmp_path / "x.safetensors"
    raw = _safetensors_bytes(header, data)
    path.write_bytes(raw[:-len(data) - 3] + b"}}}" if case == "bad_json" else raw)
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + r".*could not be read \(SafetensorError"):
        read_feature_file(path)


def test_safetensors_bf16_is_widened_to_float32_and_read_on_demand(tmp_path, arrays):
    import torch
    from safetensors.torch import save_file

    tensors = {k: torch.from_numpy(a).to(torch.bfloat16) if k.startswith("I_") else torch.from_numpy(a) for k, a in arrays.items()}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    for mmap in (True, False):
        ff = read_feature_file(tmp_path / "x.safetensors", mmap=mmap)
        assert ff.lazy == (set(ALL_KEYS) if mmap else set())
        for key, t in tensors.items():
            want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
            assert ff.arrays[key].dtype == want.dtype
            np.testing.assert_array_equal(np.asarray(ff.arrays[key]), want, err_msg=key)
            np.testing.assert_array_equal(ff.arrays[key][[4, 0, 4]], want[[4, 0, 4]], err_msg=key)


def test_safetensors_rows_on_demand_index_like_numpy(tmp_path, rng):
    from safetensors.numpy import save_file

    a = rng.standard_normal((37, 3)).astype(np.float32)
    save_file({"a": a}, str(tmp_path / "a.safetensors"))
    lazy = SafetensorsArray(tmp_path / "a.safetensors", "a", a.shape, a.dtype)
    indices = [0, -1, 36, slice(None), slice(5, 2), slice(3, 30, 4), slice(None, None, -3), slice(-5, None), ...,
               [], [3, 3, 1, -2], np.array([[1, 2], [30, 0]]), rng.random(37) < 0.5, (slice(2, 9), 1), (7, slice(1, 3)),
               rng.integers(-37, 37, 50)]
    for index in indices:
        np.testing.assert_array_equal(lazy[index], a[index], err_msg=repr(index))
    for bad in (37, -38, [0, 37], np.zeros(36, bool)):
        with pytest.raises(IndexError):
            lazy[bad]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(lazy))[2:4], a[2:4])  # DataLoader workers reopen it


# -- memory: declared sizes are checked before any data is read ---------------------------------
HUGE_FORMATS = ["mat73", "mat73_gzip", "npz", "npz_stored", "npy", "mat5", "mat5_zlib", "safetensors"]

_MEMORY_SCRIPT = r"""
import resource, sys, time
import dmmh.data.matlab as matlab
import dmmh.data.readers as readers
paths = sys.argv[1:]
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))  # 1 GiB more, at most
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in paths:
    t = time.perf_counter()
    try:
        readers.read_feature_file(path)
    except readers.FileFormatError as exc:
        print(f"{time.perf_counter() - t:.3f} ERROR {exc}")
    else:
        print("READ", path)
print("RSS_GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_small_files_declaring_huge_arrays_fail_fast_without_allocating(tmp_path, rng):
    """A file of a few KB declaring a 2 GiB (or 64 GiB) database split: a clear error naming the
    file and key, read under a 1 GiB address-space limit, with little memory growth."""
    arrays = make_arrays(rng, 24)
    paths = []
    for size in (2 << 30, 64 << 30):
        for fmt in HUGE_FORMATS:
            folder = tmp_path / f"{fmt}-{size >> 30}"
            folder.mkdir()
            rows = min(huge_rows(size), 2**31 - 1) if fmt.startswith("mat5") else huge_rows(size)  # MATLAB v5 dims are int32
            path = write_declaring(fmt, folder, arrays, rows)
            file_bytes = sum(p.stat().st_size for p in path.iterdir()) if path.is_dir() else path.stat().st_size
            assert file_bytes < 32 * 1024, (fmt, file_bytes)
            paths.append(path)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *map(str, paths)], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for path, line in zip(paths, lines):
        assert " ERROR " in line and str(path) in line, line
        seconds, msg = line.split(" ERROR ", 1)
        assert float(seconds) < 5, line
        if path.suffix != ".safetensors":  # the safetensors library names no key ("incomplete metadata, file not fully covered")
            assert re.search(r"(key|variable) '[ITL]_db'|[ITL]_db\.npy", msg), msg
    assert int(lines[-1].split()[1]) < 200 * 1024, lines[-1]


def test_compressed_hdf5_is_transposed_without_a_second_full_copy(tmp_path, rng, monkeypatch):
    arrays = make_arrays(rng, 24, sizes=(12, 5, 3000), image_dim=600)  # I_db: 7.2 MB of float32
    path = write_mat73(tmp_path / "m.mat", arrays, compress=True)
    monkeypatch.setattr(matlab, "_BLOCK_BYTES", 1 << 18)
    tracemalloc.start()
    try:
        ff = read_feature_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = sum(a.nbytes for a in ff.arrays.values())
    assert peak < total + (2 << 20), (peak, total)  # the arrays plus about one block, not twice I_db
    for key, a in arrays.items():
        assert ff.arrays[key].flags.c_contiguous
        np.testing.assert_array_equal(ff.arrays[key], a, err_msg=key)


@pytest.mark.parametrize("fmt", ["mat73", "mat5", "npz", "npy"])
def test_only_the_nine_keys_are_read(tmp_path, arrays, fmt):
    """Other keys (one declaring 64 GiB, text, a sparse matrix, garbage) are never read."""
    huge = npy_header((huge_rows(64 << 30), 7), "<f4") + bytes(64)
    if fmt == "mat73":
        path = write_mat73(tmp_path / "m.mat", arrays)
        with h5py.File(path, "r+") as f:
            f.create_dataset("junk", shape=(7, huge_rows(64 << 30)), dtype="f4")
            f.create_dataset("title", data=np.frombuffer("a title".encode("utf-16-le"), np.uint16)).attrs["MATLAB_class"] = np.bytes_("char")
    elif fmt == "mat5":
        path = tmp_path / "m.mat"
        scipy.io.savemat(path, {**arrays, "title": "a title", "S": scipy.sparse.eye(3).tocsc(), "C": np.array([1, "x"], dtype=object)})
    elif fmt == "npz":
        path = write_npz(tmp_path / "x.npz", arrays)
        with zipfile.ZipFile(path, "a") as z:
            z.writestr("junk.npy", huge)
            z.writestr("notes.npy", b"\x93NUMPY garbage")
    else:
        path = write("npy", tmp_path, arrays)
        (path / "junk.npy").write_bytes(huge)
    ff = read_feature_file(path)
    assert sorted(ff.arrays) == sorted(ALL_KEYS)
    for key, a in arrays.items():
        np.testing.assert_array_equal(np.asarray(ff.arrays[key]), a, err_msg=key)


# -- clear errors naming the file -----------------------------------------------------------------
def test_empty_and_truncated_files_are_errors_naming_the_file(tmp_path, arrays):
    empty = tmp_path / "empty.mat"
    empty.write_bytes(b"")
    with pytest.raises(FileFormatError, match=re.escape(str(empty)) + r".*is empty \(0 bytes\)"):
        read_feature_file(empty)
    for fmt in ("mat73", "mat73_gzip", "mat5", "mat5_zlib", "npz", "safetensors"):
        full = write(fmt, tmp_path / fmt if (tmp_path / fmt).mkdir() is None else None, arrays)
        raw = full.read_bytes()
        for n in sorted({1, 20, 127, 200, 600, len(raw) // 2, len(raw) - 9, len(raw) - 1}):
            cut = tmp_path / fmt / f"cut{n}{full.suffix}"
            cut.write_bytes(raw[:n])
            with pytest.raises(FileFormatError, match=re.escape(str(cut))):
                validate_feature_file(read_feature_file(cut))


def test_sparse_matlab_matrices_say_save_dense(tmp_path, arrays):
    v5 = tmp_path / "v5.mat"
    scipy.io.savemat(v5, {**arrays, "L_db": scipy.sparse.csc_matrix(arrays["L_db"])})
    with pytest.raises(FileFormatError, match=r"v5\.mat \(mat-v5\): key 'L_db' is a MATLAB sparse matrix; sparse is not supported, save it dense"):
        read_feature_file(v5)
    v73 = write_mat73(tmp_path / "v73.mat", {k: a for k, a in arrays.items() if k != "L_db"})
    sp = scipy.sparse.csc_matrix(arrays["L_db"])
    with h5py.File(v73, "r+") as f:  # how MATLAB stores a sparse matrix
        g = f.create_group("L_db")
        g.attrs["MATLAB_class"], g.attrs["MATLAB_sparse"] = np.bytes_("double"), np.uint64(sp.shape[0])
        g["data"], g["ir"], g["jc"] = sp.data, sp.indices.astype(np.uint64), sp.indptr.astype(np.uint64)
    with pytest.raises(FileFormatError, match=r"v73\.mat \(mat-v7\.3\): key 'L_db' is a MATLAB sparse matrix; sparse is not supported, save it dense"):
        read_feature_file(v73)


def test_npy_folder_missing_one_file_names_it(tmp_path, arrays):
    folder = write("npy", tmp_path, arrays)
    (folder / "T_te.npy").unlink()
    with pytest.raises(FileFormatError, match=r"missing file\(s\) T_te\.npy; expected all nine"):
        read_feature_file(folder)
    with pytest.raises(FileNotFoundError, match=r"lacks T_te\.npy"):
        find_feature_file(folder)


@pytest.mark.parametrize("fmt", ["mat5", "npz", "mat73"])
def test_text_labels_are_errors_naming_the_key(tmp_path, arrays, fmt):
    names = np.array([f"class{i}" for i in range(len(arrays["L_te"]))])
    if fmt == "mat73":
        path = write_mat73(tmp_path / "m.mat", arrays)
        with h5py.File(path, "r+") as f:  # MATLAB stores char arrays as uint16 with MATLAB_class 'char'
            del f["L_te"]
            f.create_dataset("L_te", data=np.zeros((24, 5), np.uint16)).attrs["MATLAB_class"] = np.bytes_("char")
        needle = r"key 'L_te' holds a MATLAB char array"
    else:
        path = write(fmt, tmp_path, {**arrays, "L_te": names[:, None]})
        needle = r"key 'L_te' holds a MATLAB char array" if fmt == "mat5" else r"key 'L_te' has dtype <U\d+; expected a numeric array"
    with pytest.raises(FileFormatError, match=needle):
        read_feature_file(path)


def test_pickled_objects_are_refused_never_unpickled(tmp_path, arrays):
    path = tmp_path / "x.npz"
    np.savez(path, **{**arrays, "L_tr": np.array([[object()]] * 12, dtype=object)})
    with pytest.raises(FileFormatError, match=r"key 'L_tr' holds Python objects"):
        read_feature_file(path)


@pytest.mark.parametrize("fmt", ["npz", "mat73", "mat5", "safetensors"])
def test_empty_train_split_is_an_error_at_load(tmp_path, arrays, fmt):
    empty = {k: a[:0] if k.endswith("_tr") else a for k, a in arrays.items()}
    path = write(fmt, tmp_path, empty)
    if fmt == "mat73":  # MATLAB stores an empty array as its dimensions, marked MATLAB_empty
        with h5py.File(path, "r+") as f:
            for k in KEYS["train"]:
                del f[k]
                f.create_dataset(k, data=np.array([0, arrays[k].shape[1]], np.uint64)).attrs["MATLAB_empty"] = np.uint8(1)
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + r".*the train split \(I_tr/T_tr/L_tr\) is empty"):
        read_feature_file(path)


# -- MATLAB v5: scipy trusts the element tags, so they are checked first ---------------------------
def _v5_with_data_tag(path, arrays, kind=None, nbytes=None, compress=False):
    """A MATLAB v5 file whose I_db data tag says type ``kind`` / ``nbytes`` bytes."""
    raw = bytearray(write("mat5", path.parent, arrays).read_bytes())
    d = arrays["I_db"]
    head = struct.pack("<II", 5, 8) + struct.pack("<ii", *d.shape) + struct.pack("<HH", 1, 4) + b"I_db"
    at = raw.index(head) + len(head)  # the data tag follows the name
    assert struct.unpack("<II", raw[at : at + 8]) == (7, d.size * 4)  # miSINGLE
    raw[at : at + 8] = struct.pack("<II", 7 if kind is None else kind, d.size * 4 if nbytes is None else nbytes)
    path.write_bytes(mat5_compress(bytes(raw)) if compress else bytes(raw))
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_mat5_data_tag_declaring_2_gib_fails_before_scipy_allocates_it(tmp_path, arrays, compress):
    path = _v5_with_data_tag(tmp_path / "mir_cnn_twt.mat", arrays, nbytes=0x7FFFFFF8, compress=compress)
    tracemalloc.start()
    try:
        with pytest.raises(FileFormatError, match=r"variable 'I_db' of dimensions \(20, 7\) has a damaged data tag"):
            read_feature_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


@pytest.mark.parametrize("compress", [False, True])
def test_mat5_unknown_data_type_is_an_error_not_a_crash(tmp_path, arrays, compress):
    """scipy's loadmat segfaults on an unknown data type code (here 265 = a flipped bit of 9)."""
    path = _v5_with_data_tag(tmp_path / "mir_cnn_twt.mat", arrays, kind=265, compress=compress)
    code = f"import dmmh.data.readers as r\ntry:\n    r.read_feature_file({str(path)!r})\nexcept r.FileFormatError as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]  # -11 before the tags were checked
    assert "variable 'I_db' of dimensions (20, 7) has a damaged data tag (type 265" in proc.stdout


def test_mat5_complex_flag_is_refused_even_with_the_logical_flag(tmp_path, arrays):
    """scipy reads an imaginary part for a complex matrix; one that has none crashes it."""
    raw = bytearray(write("mat5", tmp_path, arrays).read_bytes())
    d = arrays["I_te"]
    dims_and_name = struct.pack("<II", 5, 8) + struct.pack("<ii", *d.shape) + struct.pack("<HH", 1, 4) + b"I_te"
    flags_at = raw.index(dims_and_name) - 8
    raw[flags_at : flags_at + 4] = struct.pack("<I", struct.unpack("<I", raw[flags_at : flags_at + 4])[0] | 0x800 | 0x200)
    path = tmp_path / "flags.mat"
    path.write_bytes(bytes(raw))
    code = f"import dmmh.data.readers as r\ntry:\n    r.read_feature_file({str(path)!r})\nexcept r.FileFormatError as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "key 'I_te' holds a MATLAB complex array; expected a real numeric matrix" in proc.stdout


def test_mat5_reads_matlab_storage_narrower_than_the_class_and_refuses_v4(tmp_path, arrays):
    """MATLAB stores a double array of small integers as uint8 (class double): read as double."""
    path = tmp_path / "mir_cnn_twt.mat"
    raw = bytearray(write("mat5", tmp_path, arrays).read_bytes())
    d = arrays["L_db"]
    head = struct.pack("<II", 5, 8) + struct.pack("<ii", *d.shape) + struct.pack("<HH", 1, 4) + b"L_db"
    at = raw.index(head) + len(head)
    narrow = struct.pack("<II", 2, d.size) + np.asfortranarray(d).astype(np.uint8).tobytes(order="F")
    narrow += bytes(-len(narrow) % 8)
    old_len = 8 + d.size * 8
    start = raw.rindex(struct.pack("<I", 14), 0, raw.index(head))  # the matrix tag of L_db
    raw[at : at + old_len] = narrow
    raw[start + 4 : start + 8] = struct.pack("<I", struct.unpack("<I", raw[start + 4 : start + 8])[0] - old_len + len(narrow))
    path.write_bytes(bytes(raw))
    ff = read_feature_file(path)
    assert ff.arrays["L_db"].dtype == np.float64
    np.testing.assert_array_equal(ff.arrays["L_db"], d)
    v4 = tmp_path / "v4.mat"
    scipy.io.savemat(v4, arrays, format="4")
    with pytest.raises(FileFormatError, match=r"v4\.mat \(mat-v5\): not a MATLAB v5 file \(a v4 file.*save it with -v7 or -v7\.3"):
        read_feature_file(v4)

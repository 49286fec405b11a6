"""Writers of small benchmark feature files in every format dmmh reads, with the real key names
and layouts (BSTH's MATLAB v7.3 files are HDF5 with a 512-byte MATLAB header, arrays stored
column-major, i.e. as their transpose)."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import scipy.io

KEYS = {"train": ("I_tr", "T_tr", "L_tr"), "query": ("I_te", "T_te", "L_te"), "database": ("I_db", "T_db", "L_db")}


def make_arrays(rng: np.random.Generator, classes: int, sizes=(12, 5, 20), image_dim: int = 7, text_dim: int = 5) -> dict[str, np.ndarray]:
    """Nine arrays with BSTH's dtypes: single image features, double BoW counts, double labels."""
    out = {}
    for (split, keys), n in zip(KEYS.items(), sizes):
        labels = (rng.random((n, classes)) < 0.2).astype(np.float64)
        labels[np.arange(n), rng.integers(0, classes, n)] = 1  # at least one label per item
        out[keys[0]] = rng.standard_normal((n, image_dim)).astype(np.float32)
        out[keys[1]] = rng.integers(0, 3, (n, text_dim)).astype(np.float64)
        out[keys[2]] = labels
    return out


def write_mat73(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> Path:
    """MATLAB v7.3: HDF5 with a 512-byte user block holding MATLAB's header; each (rows, cols)
    array stored as a (cols, rows) dataset (column-major), with its MATLAB_class attribute."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, a in arrays.items():
            kw = {"chunks": True, "compression": "gzip"} if compress else {}
            ds = f.create_dataset(key, data=np.ascontiguousarray(a.T), **kw)
            ds.attrs["MATLAB_class"] = np.bytes_("single" if a.dtype == np.float32 else "double")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    header = text.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)
    return path


def write_mat5(path: Path, arrays: dict[str, np.ndarray], compress: bool = False) -> Path:
    scipy.io.savemat(path, arrays, format="5", do_compression=compress)
    return path


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez_compressed(path, **arrays)
    return path


def write_npy(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.mkdir()
    for key, a in arrays.items():
        np.save(path / f"{key}.npy", a)
    return path


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(a) for k, a in arrays.items()}, str(path))
    return path


# name → (writer, file name, format detected, memory-mapped or read on demand)
WRITERS = {
    "mat73": (write_mat73, "mir_cnn_twt.mat", "mat-v7.3", True),
    "mat73_gzip": (lambda p, a: write_mat73(p, a, compress=True), "mir_cnn_twt.mat", "mat-v7.3", False),
    "mat5": (write_mat5, "mir_cnn_twt.mat", "mat-v5", False),
    "mat5_zlib": (lambda p, a: write_mat5(p, a, compress=True), "mir_cnn_twt.mat", "mat-v5", False),
    "npz": (write_npz, "mir.npz", "npz", False),
    "npy": (write_npy, "mir_npy", "npy", True),
    "safetensors": (write_safetensors, "mir.safetensors", "safetensors", True),
}


def write(fmt: str, folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    writer, name, _, _ = WRITERS[fmt]
    return writer(folder / name, arrays)


# -- files that declare far more data than they hold (a 2 GiB or 64 GiB database split) -----------
def huge_rows(nbytes: int, image_dim: int = 7) -> int:
    """Rows of a float32 image array of ``image_dim`` columns taking ``nbytes``."""
    return nbytes // (4 * image_dim)


def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_declaring(fmt: str, folder: Path, arrays: dict[str, np.ndarray], rows: int) -> Path:
    """A small file of format ``fmt`` whose database split declares ``rows`` rows (every key, so
    that the shapes agree) while holding only a few bytes of them."""
    small = {k: a for k, a in arrays.items() if not k.endswith("_db")}
    declared = {k: (rows, arrays[k].shape[1], arrays[k].dtype) for k in KEYS["database"]}
    if fmt in ("mat73", "mat73_gzip"):
        path = write_mat73(folder / "mir_cnn_twt.mat", small, compress=fmt == "mat73_gzip")
        with h5py.File(path, "r+") as f:
            for k, (n, d, dt) in declared.items():  # never written: no storage is allocated
                kw = {"chunks": (d, 1024), "compression": "gzip"} if fmt == "mat73_gzip" else {}
                f.create_dataset(k, shape=(d, n), dtype=dt, **kw)
        return path
    if fmt in ("npz", "npz_stored"):
        path = folder / "mir.npz"
        method = zipfile.ZIP_DEFLATED if fmt == "npz" else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", method) as z:
            for k, a in small.items():
                z.writestr(f"{k}.npy", _npy_bytes(a))
            for k, (n, d, dt) in declared.items():
                z.writestr(f"{k}.npy", npy_header((n, d), dt) + b"\0" * 64)
        return path
    if fmt == "npy":
        path = write_npy(folder / "mir_npy", small)
        for k, (n, d, dt) in declared.items():
            (path / f"{k}.npy").write_bytes(npy_header((n, d), dt) + b"\0" * 64)
        return path
    if fmt in ("mat5", "mat5_zlib"):
        for k in declared:
            small[k] = np.zeros((3, arrays[k].shape[1]), arrays[k].dtype) + 7  # 3 rows, to be edited to `rows`
        raw = bytearray(write_mat5(folder / "raw.mat", small).read_bytes())
        for k in declared:
            d = arrays[k].shape[1]
            # dims sub-element (miINT32, 8 bytes) followed by the name in small-element form
            pattern = struct.pack("<IIii", 5, 8, 3, d) + struct.pack("<HH", 1, len(k)) + k.encode().ljust(4, b"\0")
            at = raw.index(pattern)
            raw[at + 8 : at + 12] = struct.pack("<i", rows)
        path = folder / "mir_cnn_twt.mat"
        path.write_bytes(mat5_compress(bytes(raw)) if fmt == "mat5_zlib" else bytes(raw))
        (folder / "raw.mat").unlink()
        return path
    if fmt == "safetensors":
        import json

        header, offset, data = {}, 0, b""
        for k, a in small.items():
            b = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
            header[k] = {"dtype": {"f": "F", "i": "I", "u": "U"}[a.dtype.kind] + str(8 * a.dtype.itemsize),
                         "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
            offset, data = offset + len(b), data + b
        for k, (n, d, dt) in declared.items():
            nbytes = n * d * np.dtype(dt).itemsize
            header[k] = {"dtype": "F32" if np.dtype(dt) == np.float32 else "F64", "shape": [n, d], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header).encode()
        path = folder / "mir.safetensors"
        path.write_bytes(struct.pack("<Q", len(text)) + text + data + b"\0" * 64)
        return path
    raise AssertionError(fmt)


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def mat5_compress(raw: bytes) -> bytes:
    """A MATLAB v5 file with each top-level data element wrapped in a zlib-compressed
    (miCOMPRESSED) element, as MATLAB's default ``-v7`` writes them."""
    out, at = [raw[:128]], 128
    while at < len(raw):
        kind, nbytes = struct.unpack("<II", raw[at : at + 8])
        element = raw[at : at + 8 + nbytes]
        packed = zlib.compress(element)
        out.append(struct.pack("<II", 15, len(packed)) + packed)
        at += 8 + nbytes + (-nbytes % 8)
    return b"".join(out)

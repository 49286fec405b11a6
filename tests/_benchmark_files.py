"""Writers of small benchmark feature files in every format dmmh reads, with the real key names
and layouts (BSTH's MATLAB v7.3 files are HDF5 with a 512-byte MATLAB header, arrays stored
column-major, i.e. as their transpose)."""

from __future__ import annotations

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


def write_mat5(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    scipy.io.savemat(path, arrays, format="5")
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


# name → (writer, file name, format detected, memory-mapped)
WRITERS = {
    "mat73": (write_mat73, "mir_cnn_twt.mat", "mat-v7.3", True),
    "mat73_gzip": (lambda p, a: write_mat73(p, a, compress=True), "mir_cnn_twt.mat", "mat-v7.3", False),
    "mat5": (write_mat5, "mir_cnn_twt.mat", "mat-v5", False),
    "npz": (write_npz, "mir.npz", "npz", False),
    "npy": (write_npy, "mir_npy", "npy", True),
    "safetensors": (write_safetensors, "mir.safetensors", "safetensors", True),
}


def write(fmt: str, folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    writer, name, _, _ = WRITERS[fmt]
    return writer(folder / name, arrays)

"""Writing the nine benchmark arrays in the format of the output's suffix, byte-for-byte reproducibly.

- ``.mat``: MATLAB v7.3, i.e. HDF5 with MATLAB's 512-byte header in the user block; each
  ``(rows, columns)`` array is stored as a ``(columns, rows)`` contiguous dataset (MATLAB's
  column-major layout, which :mod:`dmmh.data.readers` transposes back) with its ``MATLAB_class``
  attribute. No timestamps are stored (h5py's default), and the header names no date.
- ``.npz``: uncompressed, fixed member timestamps (:func:`dmmh._io.write_npz`).
- ``.safetensors``: the ``safetensors`` library's format (the library builds the file in memory).

Every file is written atomically (:func:`dmmh._io.atomic_write`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping

import numpy as np

from dmmh._io import atomic_write, write_npz

__all__ = ["OUTPUT_FORMATS", "output_format", "write_arrays", "array_sha256", "MATLAB_HEADER"]

OUTPUT_FORMATS = {".mat": "mat-v7.3", ".npz": "npz", ".safetensors": "safetensors"}
_MATLAB_CLASS = {np.dtype(np.float32): "single", np.dtype(np.float64): "double", np.dtype(np.uint8): "uint8"}
_BLOCK_ROWS = 8192
# 116 bytes of text, 8 bytes of subsystem offset (none), version 0x0200, endian indicator "IM"
MATLAB_HEADER = (b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: dmmh prepare HDF5 schema 1.00 ."
                 .ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


def output_format(path: Path) -> str:
    """The format written for ``path`` (from its suffix)."""
    fmt = OUTPUT_FORMATS.get(Path(path).suffix)
    if fmt is None:
        raise ValueError(f"{path}: the output must end in {', '.join(OUTPUT_FORMATS)}")
    return fmt


def write_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` (rows = items) to ``path`` in the format of its suffix, atomically."""
    fmt = output_format(path)
    if fmt == "npz":
        write_npz(Path(path), dict(arrays))
    elif fmt == "safetensors":
        from dmmh._optional import require

        require("safetensors", "writing .safetensors files")
        from safetensors.numpy import save

        atomic_write(path, save({k: np.ascontiguousarray(a) for k, a in arrays.items()}))
    else:
        atomic_write(path, lambda f: _write_mat(f, arrays))


def _write_mat(f, arrays: Mapping[str, np.ndarray]) -> None:
    import h5py

    with h5py.File(f, "w", userblock_size=512, libver="earliest") as h5:
        for key, a in arrays.items():
            if a.dtype not in _MATLAB_CLASS:
                raise TypeError(f"{key}: dtype {a.dtype} has no MATLAB class here (use float32, float64 or uint8)")
            ds = h5.create_dataset(key, shape=(a.shape[1], a.shape[0]), dtype=a.dtype)
            for start in range(0, a.shape[0], _BLOCK_ROWS):
                ds[:, start : start + _BLOCK_ROWS] = a[start : start + _BLOCK_ROWS].T
            ds.attrs["MATLAB_class"] = np.bytes_(_MATLAB_CLASS[a.dtype])
    f.seek(0)
    f.write(MATLAB_HEADER)


def array_sha256(a) -> str:
    """SHA-256 of an array's values as row-major bytes of its dtype (the same for every format)."""
    h = hashlib.sha256()
    for start in range(0, a.shape[0], _BLOCK_ROWS):
        h.update(np.ascontiguousarray(a[start : start + _BLOCK_ROWS]).tobytes())
    return h.hexdigest()

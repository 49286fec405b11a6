"""Named arrays in ``.npy`` folders, ``.npz`` and ``.safetensors`` files, every header checked
before any data is read.

Each reader is an :class:`ArraySource`: ``names`` lists what the file holds, ``header(name)``
returns the declared shape and dtype once they are checked against the bytes that hold them,
and ``read(names)`` reads the arrays. A declared array must fit in those bytes (uncompressed
data), or in :data:`MAX_COMPRESSION_RATIO` times them (compressed data), so a small damaged or
hostile file cannot make the reader allocate much. :func:`read_arrays` runs the three steps with
a caller's layout check between the headers and the data. Every problem is a
:class:`FileFormatError` naming the file and the array.
"""

from __future__ import annotations

import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np

__all__ = [
    "FileFormatError", "ArrayHeader", "ArraySource", "MAX_COMPRESSION_RATIO", "reading", "read_arrays",
    "NpyFolder", "NpzArrays", "SafetensorsArrays", "SafetensorsArray",
]

# Deflate (zip, gzip, MATLAB and HDF5 compression) cannot exceed 1032:1; a compressed array
# declaring more than this ratio times its stored bytes (plus a small allowance) is refused.
MAX_COMPRESSION_RATIO = 1100
_SLACK_BYTES = 1 << 16
NUMERIC_KINDS = "fiub"


class FileFormatError(ValueError):
    """A data file that is unreadable, damaged, or not what was expected; the message names the
    file (and the key)."""


@dataclass(frozen=True)
class ArrayHeader:
    """What a file declares about one array (rows first)."""

    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=object)) * self.dtype.itemsize


class ArraySource(Protocol):
    names: Sequence[str]

    def header(self, name: str) -> ArrayHeader: ...

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]: ...


@contextmanager
def reading(where: str) -> Iterator[None]:
    """Turn any error of a file-reading library into a :class:`FileFormatError` naming ``where``
    (a ``MemoryError`` passes through: it would mean a check is missing; so does a missing
    optional package)."""
    try:
        yield
    except (FileFormatError, MemoryError, ImportError):  # ImportError: a missing optional package
        raise
    except Exception as exc:
        raise FileFormatError(f"{where}: could not be read ({type(exc).__name__}: {exc})") from exc


def read_arrays(
    source: ArraySource, names: Sequence[str], check: Callable[[dict[str, ArrayHeader]], None] | None = None,
    lazy: bool = False, where: str = "",
) -> dict[str, Any]:
    """The arrays ``names`` that ``source`` holds (absent names are left out): every header is
    checked first, then ``check(headers)`` (the caller's layout rules), then the data are read and
    each array is checked to be what its header declared."""
    headers = {n: source.header(n) for n in names if n in source.names}
    if check is not None:
        check(headers)
    arrays = source.read(list(headers), lazy)
    for name, h in headers.items():
        a = arrays[name]
        if tuple(a.shape) != h.shape or np.dtype(a.dtype).newbyteorder("<") != h.dtype.newbyteorder("<"):
            raise FileFormatError(
                f"{where}: key {name!r} read as {a.dtype} {tuple(a.shape)} but its header declares {h.dtype} {h.shape}"
            )
    return arrays


def check_stored_size(where: str, name: str, declared: int, stored: int, compressed: bool) -> None:
    """Refuse an array declaring more bytes than its stored bytes can hold."""
    limit = MAX_COMPRESSION_RATIO * stored + _SLACK_BYTES if compressed else stored
    if declared > limit:
        how = (
            f"{stored} bytes (even compressed, more than {MAX_COMPRESSION_RATIO}:1 is not plausible)" if compressed
            else f"only {stored} bytes"
        )
        raise FileFormatError(f"{where}: key {name!r} declares {declared} bytes of data but the file holds {how}; truncated or damaged")


# -- .npy ----------------------------------------------------------------------------------------
def npy_header(fp: Any, where: str, name: str) -> tuple[ArrayHeader, int]:
    """``(header, header length)`` of the ``.npy`` stream ``fp`` (read from its start)."""
    fmt = np.lib.format
    version = fmt.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = fmt.read_array_header_1_0(fp)
    elif version == (2, 0):
        shape, _, dtype = fmt.read_array_header_2_0(fp)
    else:
        raise FileFormatError(f"{where}: key {name!r} is a .npy version {version}; expected 1.0 or 2.0")
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FileFormatError(f"{where}: key {name!r} holds Python objects (dtype {dtype}); expected numbers (never unpickled)")
    return ArrayHeader(tuple(int(n) for n in shape), dtype), fp.tell()


class NpyFolder:
    """A folder of ``{name}.npy`` files; memory-mapped when read lazily."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.names = sorted(p.stem for p in self.folder.glob("*.npy") if p.is_file())

    def header(self, name: str) -> ArrayHeader:
        path = self.folder / f"{name}.npy"
        with reading(str(path)), open(path, "rb") as fh:
            h, offset = npy_header(fh, str(path), name)
        size = path.stat().st_size
        if offset + h.nbytes != size:
            raise FileFormatError(
                f"{path}: its header declares {h.dtype} {h.shape} ({h.nbytes} bytes after a {offset}-byte header) "
                f"but the file has {size} bytes; truncated or damaged"
            )
        return h

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]:
        out = {}
        for name in names:
            path = self.folder / f"{name}.npy"
            with reading(str(path)):
                out[name] = np.load(path, mmap_mode="r" if lazy else None, allow_pickle=False)
        return out


# -- .npz ----------------------------------------------------------------------------------------
class NpzArrays:
    """A ``.npz`` (zip of ``.npy``) archive, read member by member into memory."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        with reading(str(self.path)):
            self.zip = zipfile.ZipFile(self.path)
            self.members = {i.filename[:-4]: i for i in self.zip.infolist() if i.filename.endswith(".npy")}
        self.names = sorted(self.members)

    def close(self) -> None:
        self.zip.close()

    def header(self, name: str) -> ArrayHeader:
        where, info = str(self.path), self.members[name]
        if info.header_offset + info.compress_size > self.size:
            raise FileFormatError(f"{where}: member {info.filename!r} extends past the end of the file; truncated or damaged")
        with reading(where), self.zip.open(info) as fh:
            h, offset = npy_header(fh, where, name)
        if offset + h.nbytes != info.file_size:
            raise FileFormatError(
                f"{where}: key {name!r} declares {h.dtype} {h.shape} ({h.nbytes} bytes) but its member holds "
                f"{info.file_size - offset} bytes of data; truncated or damaged"
            )
        check_stored_size(where, name, info.file_size, info.compress_size, info.compress_type != zipfile.ZIP_STORED)
        return h

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]:
        out = {}
        with reading(str(self.path)):
            for name in names:
                with self.zip.open(self.members[name]) as fh:
                    out[name] = np.lib.format.read_array(fh, allow_pickle=False)
        return out


# -- .safetensors --------------------------------------------------------------------------------
# safetensors dtype -> numpy dtype; BF16 has none and is widened to float32 as it is read
_ST_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<f4", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}


def _safe_open(path: Path, bf16: bool) -> Any:
    from dmmh._optional import require

    st = require("safetensors", "reading .safetensors files")
    return st.safe_open(str(path), framework="pt" if bf16 else "numpy")  # numpy has no bfloat16


class SafetensorsArrays:
    """A ``.safetensors`` file, opened with the ``safetensors`` library (which validates the header:
    known dtypes, offsets that tile the data exactly, no overlap, nothing past the end)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with reading(str(self.path)):
            handle = _safe_open(self.path, bf16=False)
            self.names = list(handle.keys())
            self.slices = {n: handle.get_slice(n) for n in self.names}

    def header(self, name: str) -> ArrayHeader:
        kind = self.slices[name].get_dtype()
        if kind not in _ST_DTYPES:
            raise FileFormatError(f"{self.path}: key {name!r} has safetensors dtype {kind}; expected one of {', '.join(_ST_DTYPES)}")
        return ArrayHeader(tuple(int(n) for n in self.slices[name].get_shape()), np.dtype(_ST_DTYPES[kind]))

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]:
        out = {}
        for name in names:
            h = self.header(name)
            a = SafetensorsArray(self.path, name, h.shape, h.dtype, self.slices[name].get_dtype() == "BF16")
            out[name] = a if lazy else np.asarray(a)
        return out


class SafetensorsArray:
    """A read-only array of a ``.safetensors`` file whose rows are read on demand (``get_slice``):
    integers, slices, integer arrays and boolean masks index the rows, as numpy does."""

    def __init__(self, path: Path, name: str, shape: tuple[int, ...], dtype: np.dtype, bf16: bool = False):
        self.path, self.name, self.bf16 = Path(path), name, bf16
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self._slice: Any = None
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers reopen the file
        return self.__dict__ | {"_slice": None, "_pid": -1}

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SafetensorsArray({str(self.path)!r}, {self.name!r}, shape={self.shape}, dtype={self.dtype})"

    def _rows(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        if self._slice is None or self._pid != os.getpid():
            with reading(str(self.path)):
                self._slice, self._pid = _safe_open(self.path, self.bf16).get_slice(self.name), os.getpid()
        with reading(f"{self.path} (key {self.name!r})"):
            block = self._slice[start:stop]
            return block.float().numpy() if self.bf16 else np.asarray(block, dtype=self.dtype)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if self.ndim == 0:
            raise FileFormatError(f"{self.path}: key {self.name!r} is a scalar; expected an array")
        out = self._rows(0, self.shape[0])
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, index: Any) -> np.ndarray:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) and index else (index, ())
        n = self.shape[0]
        if rows is Ellipsis:
            out = self._rows(0, n)
        elif isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            out = self._rows(start, stop) if step == 1 else self._gather(np.arange(start, stop, step))
        elif isinstance(rows, (int, np.integer)):
            i = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= i < n:
                raise IndexError(f"index {int(rows)} is out of bounds for axis 0 with size {n}")
            out = self._rows(i, i + 1)[0]
        else:
            idx = np.asarray(rows)
            if idx.dtype == bool:
                if idx.shape != (n,):
                    raise IndexError(f"boolean index of shape {idx.shape} does not match axis 0 of size {n}")
                idx = np.flatnonzero(idx)
            elif idx.dtype.kind not in "iu" and idx.size:
                raise IndexError(f"arrays used as indices must be of integer or boolean type, not {idx.dtype}")
            out = self._gather(idx.astype(np.int64))
        return out[rest] if isinstance(rows, (int, np.integer)) else out[(slice(None), *rest)]

    def _gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed): one read per run of consecutive rows."""
        n = self.shape[0]
        if ((idx < -n) | (idx >= n)).any():
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
        uniq, inverse = np.unique(np.where(idx < 0, idx + n, idx), return_inverse=True)
        if uniq.size == 0:
            return np.empty((*idx.shape, *self.shape[1:]), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        starts, stops = uniq[np.r_[0, breaks]], uniq[np.r_[breaks - 1, uniq.size - 1]] + 1
        block = np.concatenate([self._rows(int(a), int(b)) for a, b in zip(starts, stops)])
        return block[inverse.reshape(idx.shape)]


def headers_of(arrays: Mapping[str, Any]) -> dict[str, ArrayHeader]:
    """Headers of arrays already in hand (to run the same layout checks on them)."""
    return {k: ArrayHeader(tuple(int(n) for n in a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}

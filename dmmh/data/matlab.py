"""MATLAB files as :class:`~dmmh._arrayfiles.ArraySource`: v7.3 (HDF5) and v5/v7.

- :class:`MatlabHdf5`: MATLAB v7.3 = HDF5. Each dataset is stored ``(columns, rows)`` and is
  transposed on read: contiguous uncompressed datasets are memory-mapped (a transposed view),
  others read into a row-major array block by block. Declared sizes are checked against the
  stored bytes first; datasets whose bytes live outside the file (external links, external raw
  storage, virtual datasets, soft links to them) are refused unless ``allow_external``; so are
  chunks smaller than their unfiltered data (HDF5 would return stale memory for the rest).
- :class:`MatlabV5`: MATLAB v5/v7 ``.mat``, read with scipy. scipy trusts the element tags (it
  allocates whatever a tag declares before reading it, and crashes on an unknown data type or a
  complex flag without an imaginary part), so the tags (every variable's header, and the data
  tags of numeric ones) are walked and checked against the file first; v4 files are not read.

Sparse matrices, text, cells and structs are refused by name.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dmmh._arrayfiles import ArrayHeader, FileFormatError, check_stored_size

__all__ = ["MatlabHdf5", "MatlabV5"]

_HDF5_CLASSES = {  # MATLAB_class attribute -> dtype of an empty array's (MATLAB_empty) stand-in
    "double": "f8", "single": "f4", "logical": "u1", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8",
}
_BLOCK_BYTES = 64 << 20  # bytes per block when transposing HDF5 datasets into memory
_MAX_SOFT_LINKS = 16


def _sparse(where: str, key: str) -> FileFormatError:
    return FileFormatError(
        f"{where}: key {key!r} is a MATLAB sparse matrix; sparse is not supported, save it dense "
        f"(in MATLAB: {key} = full({key}), then save again)"
    )


class _OutsideFile(Exception):
    """A link that leads out of the file (its message says where)."""


class MatlabHdf5:
    """MATLAB v7.3 (HDF5): each dataset is stored (columns, rows) and transposed on read."""

    def __init__(self, path: Path, allow_external: bool):
        import h5py

        self.h5py, self.path, self.allow_external = h5py, path, allow_external
        self.where = f"{path} (mat-v7.3)"
        self.file = h5py.File(path, "r")
        self.names = [k for k in self.file.keys() if not k.startswith("#")]  # "#refs#", "#subsystem#"
        self.plan: dict[str, tuple[str, Any, ArrayHeader]] = {}

    def close(self) -> None:
        self.file.close()

    def _hard_path(self, name: str, path: str, depth: int = 0) -> str:
        """``path`` with every soft link replaced by its target, without following external links."""
        resolved = ""
        for part in (p for p in path.split("/") if p and p != "."):
            link = self.file.get(f"{resolved}/{part}", getlink=True)
            if link is None:
                raise FileFormatError(f"{self.where}: key {name!r} leads to {path!r}, which does not exist")
            if isinstance(link, self.h5py.ExternalLink):
                raise _OutsideFile(f"an external link to {link.filename}:{link.path}")
            if isinstance(link, self.h5py.SoftLink):
                if depth >= _MAX_SOFT_LINKS:
                    raise FileFormatError(f"{self.where}: key {name!r} is a chain of more than {_MAX_SOFT_LINKS} soft links")
                target = link.path if link.path.startswith("/") else f"{resolved}/{link.path}"
                resolved = self._hard_path(name, target, depth + 1)
            else:
                resolved = f"{resolved}/{part}"
        return resolved or "/"

    def _open(self, name: str) -> Any:
        """The object ``name`` names; external datasets only if allowed, raw external files and
        virtual sources found relative to the file that names them."""
        h5py = self.h5py
        try:
            path = self._hard_path(name, name)
        except _OutsideFile as exc:
            if not self.allow_external:
                raise self._refuse(name, str(exc)) from None
            path = name
        if self.file.get(path, getclass=True) is not h5py.Dataset:
            return self.file[path]
        dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        dapl.set_efile_prefix(b"${ORIGIN}")
        dapl.set_virtual_prefix(b"${ORIGIN}")
        ds = h5py.Dataset(h5py.h5d.open(self.file.id, path.encode(), dapl=dapl))
        outside = "a virtual dataset (its bytes live in other datasets)" if ds.is_virtual else (
            f"stored in external raw file(s) {', '.join(str(e[0]) for e in ds.external)}" if ds.external else None)
        if outside and not self.allow_external:
            raise self._refuse(name, outside)
        return ds

    def _refuse(self, name: str, what: str) -> FileFormatError:
        return FileFormatError(
            f"{self.where}: key {name!r} is {what}: its bytes live outside this file, so it is refused "
            f"(pass allow_external=True to read it if you trust the file)"
        )

    def header(self, name: str) -> ArrayHeader:
        ds = self._open(name)
        if not isinstance(ds, self.h5py.Dataset):
            if "MATLAB_sparse" in ds.attrs:
                raise _sparse(self.where, name)
            raise FileFormatError(f"{self.where}: key {name!r} is an HDF5 group (a MATLAB struct or cell?); expected a numeric matrix")
        cls = ds.attrs.get("MATLAB_class", b"double")
        cls = cls.decode(errors="replace") if isinstance(cls, bytes) else str(cls)
        if cls not in _HDF5_CLASSES:
            raise FileFormatError(f"{self.where}: key {name!r} holds a MATLAB {cls} array; expected a numeric matrix")
        if ds.attrs.get("MATLAB_empty", 0):  # an empty MATLAB array is stored as its dimensions
            if ds.ndim != 1 or ds.size > 8 or ds.dtype.kind not in "iu":
                raise FileFormatError(f"{self.where}: key {name!r} is marked MATLAB_empty but stores {ds.dtype} {ds.shape}")
            h = ArrayHeader(tuple(int(n) for n in ds[()]), np.dtype(_HDF5_CLASSES[cls]))
            if 0 not in h.shape:
                raise FileFormatError(f"{self.where}: key {name!r} is marked MATLAB_empty but its dimensions are {h.shape}")
            self.plan[name] = ("empty", None, h)
            return h
        h = ArrayHeader(tuple(int(n) for n in ds.shape[::-1]), ds.dtype)  # stored (columns, rows)
        mode = "memory" if ds.is_virtual or ds.external else self._check_storage(name, ds, h)
        self.plan[name] = (mode, ds, h)
        return h

    def _check_storage(self, name: str, ds: Any, h: ArrayHeader) -> str:
        """Check the declared size against the bytes stored; ``"mmap"`` if the dataset can be
        memory-mapped (contiguous, unfiltered, in the file), else ``"memory"``."""
        h5py = self.h5py
        file_size = os.path.getsize(ds.file.filename)  # the file holding it (another one through an allowed external link)
        stored = ds.id.get_storage_size()
        if stored > file_size:
            raise FileFormatError(f"{self.where}: key {name!r} claims {stored} stored bytes but the file has {file_size}; damaged")
        filetype = ds.id.get_type()
        declared = int(np.prod(ds.shape, dtype=object)) * filetype.get_size()  # in the file's encoding
        filtered = ds.id.get_create_plist().get_nfilters() > 0
        check_stored_size(self.where, name, declared, stored, compressed=filtered)
        if ds.chunks is not None:
            self._check_chunks(name, ds, filetype.get_size(), file_size, filtered)
        if ds.id.get_create_plist().get_layout() != h5py.h5d.CONTIGUOUS or filtered:
            return "memory"
        if not filetype.equal(h5py.h5t.py_create(ds.dtype)):
            return "memory"  # not numpy's encoding of ds.dtype (e.g. another exponent bias): HDF5 converts it
        offset = ds.id.get_offset()
        if offset is None:
            return "memory"
        if offset + declared > file_size:
            raise FileFormatError(
                f"{self.where}: key {name!r} declares {declared} bytes at offset {offset} but the file has {file_size} bytes; truncated or damaged"
            )
        return "mmap"

    def _check_chunks(self, name: str, ds: Any, itemsize: int, file_size: int, filtered: bool) -> None:
        """Every chunk inside the file, and an unfiltered one (no filters, or filters skipped by its
        mask) as large as its data: HDF5 itself fills the rest of such a chunk with stale memory."""
        chunk_bytes = int(np.prod(ds.chunks, dtype=object)) * itemsize

        def check(info: Any) -> None:
            if info.byte_offset + info.size > file_size or ((not filtered or info.filter_mask) and info.size < chunk_bytes):
                raise FileFormatError(
                    f"{self.where}: key {name!r} has a chunk of {info.size} bytes at byte {info.byte_offset} "
                    f"(filter mask {info.filter_mask}) where {chunk_bytes} bytes of data are needed; damaged"
                )

        if hasattr(ds.id, "chunk_iter"):  # h5py >= 3.8 built on HDF5 >= 1.12.3
            ds.id.chunk_iter(check)
        else:
            for i in range(ds.id.get_num_chunks()):
                check(ds.id.get_chunk_info(i))

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]:
        out = {}
        for name in names:
            mode, ds, h = self.plan[name]
            if mode == "empty":
                out[name] = np.zeros(h.shape, dtype=h.dtype)
            elif mode == "mmap" and lazy and h.nbytes > 0:
                # stored (columns, rows) in C order == the MATLAB (rows, columns) array in Fortran order
                out[name] = np.memmap(ds.file.filename, dtype=ds.dtype, mode="r", offset=ds.id.get_offset(), shape=ds.shape).T
            else:
                out[name] = _read_transposed(ds, h)
        return out


def _read_transposed(ds: Any, h: ArrayHeader) -> np.ndarray:
    """A 2-D dataset stored (columns, rows), read into a row-major (rows, columns) array block by
    block (whole chunks at a time), so no second full copy is made."""
    out = np.empty(h.shape, dtype=ds.dtype)
    step = max(1, _BLOCK_BYTES // max(1, ds.shape[1] * ds.dtype.itemsize))
    if ds.chunks:
        step = max(ds.chunks[0], step - step % ds.chunks[0])
    for c0 in range(0, ds.shape[0], step):
        out[:, c0 : c0 + step] = ds[c0 : c0 + step].T
    return out


# -- MATLAB v5 -----------------------------------------------------------------------------------
# mxCLASS codes of a matrix's array flags -> name (as scipy's whosmat names them)
_MX_CLASSES = {
    1: "cell", 2: "struct", 3: "object", 4: "char", 5: "sparse", 6: "double", 7: "single", 8: "int8", 9: "uint8",
    10: "int16", 11: "uint16", 12: "int32", 13: "uint32", 14: "int64", 15: "uint64", 16: "function", 17: "opaque",
}
_V5_DTYPES = {  # class -> dtype scipy returns with mat_dtype=True
    "double": "f8", "single": "f4", "logical": "?", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8",
}
_MI_INT8, _MI_UINT32, _MI_INT32, _MI_MATRIX, _MI_COMPRESSED = 1, 6, 5, 14, 15
# numeric miTYPE codes -> bytes per element (scipy crashes on other codes in a data tag)
_MI_SIZES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 9: 8, 12: 8, 13: 8}
_MATRIX_HEAD_BYTES = 1 << 16  # a matrix's flags, dims, name and data tag lie in its first bytes
_MAX_DIMS, _MAX_NAME = 32, 4096


def _element(body: bytes, at: int, order: str, where: str) -> tuple[int, int, int, int]:
    """``(type, byte count, data start, next element)`` of the data element at ``body[at:]``."""
    if at + 8 > len(body):
        raise FileFormatError(f"{where}: truncated element tag")
    kind, nbytes = struct.unpack(order + "II", body[at : at + 8])
    if kind >> 16:  # "small data element": count and type in one word, data in the next four bytes
        return kind & 0xFFFF, kind >> 16, at + 4, at + 8
    return kind, nbytes, at + 8, at + 8 + nbytes + (-nbytes % 8)


def _matrix_header(body: bytes, order: str, where: str, stored: int | None) -> tuple[str, tuple[int, ...], str, int]:
    """``(name, dims, class, data bytes)`` of the matrix element ``body`` starts with; ``stored``:
    the bytes the element holds when uncompressed (every count must fit in them)."""
    kind, total, start, _ = _element(body, 0, order, where)
    end = start + total
    if kind != _MI_MATRIX or (stored is not None and 8 + total > stored):
        raise FileFormatError(f"{where}: expected a matrix of at most {stored} bytes, found element type {kind} of {total} bytes")
    parts = []
    at = start
    for want in (_MI_UINT32, _MI_INT32, _MI_INT8):  # array flags, dimensions, name
        kind, nbytes, data, at = _element(body, at, order, where)
        if kind != want or data + nbytes > min(end, len(body)) or nbytes > max(8, 4 * _MAX_DIMS, _MAX_NAME):
            raise FileFormatError(f"{where}: damaged matrix header (element type {kind}, {nbytes} bytes; expected type {want})")
        parts.append(body[data : data + nbytes])
    flags = struct.unpack(order + "I", parts[0][:4])[0]
    if len(parts[1]) < 8 or len(parts[1]) % 4:
        raise FileFormatError(f"{where}: damaged matrix dimensions ({len(parts[1])} bytes)")
    dims = struct.unpack(f"{order}{len(parts[1]) // 4}i", parts[1])
    name = parts[2].decode("latin-1")
    if min(dims) < 0:
        raise FileFormatError(f"{where}: variable {name!r} has negative dimensions {dims}")
    cls = _MX_CLASSES.get(flags & 0xFF, f"class {flags & 0xFF}")
    if flags & 0x800:  # complex (scipy would then read an imaginary part too)
        cls = "complex"
    elif flags & 0x200 and cls in _V5_DTYPES:
        cls = "logical"
    data_bytes = 0
    if cls in _V5_DTYPES:  # the data tag: every element, in a numeric type (MATLAB may store narrower ones)
        kind, data_bytes, data, _ = _element(body, at, order, f"{where}: variable {name!r}")
        expected = int(np.prod(dims, dtype=object)) * _MI_SIZES.get(kind, 0)
        if kind not in _MI_SIZES or data_bytes != expected or (stored is not None and data + data_bytes > end):
            raise FileFormatError(
                f"{where}: variable {name!r} of dimensions {dims} has a damaged data tag (type {kind}, {data_bytes} bytes)"
            )
    return name, tuple(dims), cls, data_bytes


def _inflate_head(fh: Any, nbytes: int, limit: int) -> bytes:
    """The first ``limit`` bytes that ``nbytes`` zlib-compressed bytes of ``fh`` inflate to."""
    z, out, left = zlib.decompressobj(), b"", nbytes
    while left > 0 and len(out) < limit:
        chunk = fh.read(min(left, 1 << 16))
        if not chunk:
            break
        left -= len(chunk)
        out += z.decompress(chunk, limit - len(out))
        if z.unconsumed_tail:  # the output limit was reached
            break
    return out


def _v5_variables(path: Path, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (dimensions, class) of every variable of a MATLAB v5 file, from the tags scipy
    will trust, each checked against the bytes that hold it."""
    size = path.stat().st_size
    out = {}
    with open(path, "rb") as fh:
        head = fh.read(128)
        if len(head) < 128 or 0 in head[:4]:  # scipy's test for MATLAB v4 files
            raise FileFormatError(
                f"{where}: not a MATLAB v5 file (a v4 file, or a damaged or truncated header); "
                f"save it with -v7 or -v7.3"
            )
        order = {b"IM": "<", b"MI": ">"}.get(head[126:128])
        if order is None or struct.unpack(order + "H", head[124:126])[0] != 0x0100:
            raise FileFormatError(f"{where}: damaged MATLAB v5 header (version and byte order {head[124:128]!r})")
        at = 128
        while at < size:
            fh.seek(at)
            tag = fh.read(8)
            if len(tag) < 8:
                raise FileFormatError(f"{where}: truncated at byte {size} (an element tag needs 8 bytes)")
            kind, nbytes = struct.unpack(order + "II", tag)
            if at + 8 + nbytes > size:
                raise FileFormatError(f"{where}: the element at byte {at} declares {nbytes} bytes but the file ends at byte {size}; truncated or damaged")
            if kind == _MI_COMPRESSED:
                body, stored = _inflate_head(fh, nbytes, _MATRIX_HEAD_BYTES), None
            elif kind == _MI_MATRIX:
                body, stored = tag + fh.read(min(nbytes, _MATRIX_HEAD_BYTES)), 8 + nbytes
            else:
                raise FileFormatError(f"{where}: element type {kind} at byte {at}; expected a MATLAB variable")
            name, dims, cls, data_bytes = _matrix_header(body, order, f"{where} (element at byte {at})", stored)
            if kind == _MI_COMPRESSED:
                check_stored_size(where, name, data_bytes, nbytes, compressed=True)
            out[name] = (dims, cls)
            at += 8 + nbytes
    return out


class MatlabV5:
    """MATLAB v5/v7 ``.mat``, read with scipy (rows already items)."""

    def __init__(self, path: Path):
        self.path, self.size, self.where = path, path.stat().st_size, f"{path} (mat-v5)"
        self.info = _v5_variables(path, self.where)
        self.names = list(self.info)

    def header(self, name: str) -> ArrayHeader:
        shape, cls = self.info[name]
        if cls == "sparse":
            raise _sparse(self.where, name)
        if cls not in _V5_DTYPES:
            raise FileFormatError(f"{self.where}: key {name!r} holds a MATLAB {cls} array; expected a real numeric matrix")
        h = ArrayHeader(shape, np.dtype(_V5_DTYPES[cls]))
        check_stored_size(self.where, name, h.nbytes, self.size, compressed=True)  # -v7 compresses each variable
        return h

    def read(self, names: Sequence[str], lazy: bool) -> dict[str, Any]:
        from scipy.io import loadmat

        data = loadmat(str(self.path), variable_names=list(names), appendmat=False, mat_dtype=True)
        return {n: data[n] for n in names}

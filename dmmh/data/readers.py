"""Readers for benchmark feature files, with checks that name the file, key and values.

Every format holds the nine BSTH arrays ``I_tr T_tr L_tr`` (train), ``I_te T_te L_te`` (query)
and ``I_db T_db L_db`` (database); ``I`` image features, ``T`` text features, ``L`` multi-hot
labels (DESIGN.md §2). Formats read (:func:`detect_format` names them):

- ``"mat-v7.3"``: MATLAB v7.3 = HDF5 (BSTH's ``*_cnn_twt*.mat``). MATLAB writes column-major, so
  each dataset is stored ``(columns, rows)`` and is **transposed** here. Contiguous uncompressed
  datasets are memory-mapped (no copy); chunked or compressed ones are read into memory, block by
  block. Datasets whose bytes live outside the file are refused unless ``allow_external``.
- ``"mat-v5"``: MATLAB v5/v4 ``.mat`` (scipy), rows already samples; read into memory.
- ``"npz"``: one ``.npz`` with the nine keys; read into memory.
- ``"npy"``: a folder of ``I_tr.npy``, ``T_tr.npy``, ...; memory-mapped.
- ``"safetensors"``: one ``.safetensors`` file with the nine keys, opened with the ``safetensors``
  library; rows are read on demand (bf16 is widened to float32).

Only the nine keys are read, and only after every declared shape, dtype and size has been
checked against the file (see :mod:`dmmh._arrayfiles`); sparse MATLAB matrices, text, cells and
structs are refused by name. Errors are :class:`FileFormatError` (a ``ValueError``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dmmh._arrayfiles import (
    NUMERIC_KINDS, ArrayHeader, FileFormatError, NpyFolder, NpzArrays, SafetensorsArray, SafetensorsArrays,
    headers_of, read_arrays, reading,
)
from dmmh.data.matlab import MatlabHdf5, MatlabV5

__all__ = [
    "SPLIT_KEYS", "ALL_KEYS", "FORMATS", "FeatureFile", "FileFormatError", "find_feature_file", "detect_format",
    "read_feature_file", "check_layout", "validate_feature_file",
]

SPLIT_KEYS: dict[str, tuple[str, str, str]] = {
    "train": ("I_tr", "T_tr", "L_tr"),
    "query": ("I_te", "T_te", "L_te"),
    "database": ("I_db", "T_db", "L_db"),
}
ALL_KEYS: tuple[str, ...] = tuple(k for keys in SPLIT_KEYS.values() for k in keys)
FORMATS = ("mat-v7.3", "mat-v5", "npz", "npy", "safetensors")
_BLOCK_ROWS = 8192  # rows per block when scanning (memory-mapped) arrays for bad values


@dataclass
class FeatureFile:
    """Arrays read from one feature file: ``arrays[key]`` is ``(rows, columns)``, rows = items;
    ``mmapped`` names the memory-mapped arrays, ``lazy`` those read on demand (safetensors)."""

    path: Path
    format: str
    arrays: dict[str, Any]
    mmapped: set[str] = field(default_factory=set)
    lazy: set[str] = field(default_factory=set)

    def describe(self) -> str:
        parts = [f"memory-mapped: {len(self.mmapped)}"] if self.mmapped else []
        parts += [f"read on demand: {len(self.lazy)}"] if self.lazy else []
        how = f", {', '.join(parts)} of {len(self.arrays)} arrays" if parts else ", in memory"
        shapes = ", ".join(f"{k} {tuple(self.arrays[k].shape)}" for k in ALL_KEYS if k in self.arrays)
        return f"{self.format} file {self.path}{how} ({shapes})"


# -- locating and detecting ----------------------------------------------------------------------
def find_feature_file(root: str | os.PathLike, patterns: Sequence[str] = ()) -> Path:
    """The feature file at ``root``: ``root`` itself if it is a file; for a folder, the folder
    itself when it holds the nine ``.npy`` files, else the one file matching the first of
    ``patterns`` (then ``*.mat``, ``*.npz``, ``*.safetensors``) that matches anything."""
    root = Path(root).expanduser()
    if root.is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"feature file or folder {str(root)!r} does not exist")
    if all((root / f"{k}.npy").is_file() for k in ALL_KEYS):
        return root
    tried = [*patterns, "*.mat", "*.npz", "*.safetensors"]
    for pattern in tried:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"folder {str(root)!r} holds several files matching {pattern!r} ({names}); pass the file itself")
    some = [k + ".npy" for k in ALL_KEYS if (root / f"{k}.npy").is_file()]
    if some:
        missing = ", ".join(k + ".npy" for k in ALL_KEYS if k + ".npy" not in some)
        raise FileNotFoundError(f"the .npy folder {str(root)!r} lacks {missing} (it holds {', '.join(some)}); expected all nine files")
    present = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
    raise FileNotFoundError(
        f"no feature file in {str(root)!r}: looked for {', '.join(tried)} or the nine files "
        f"{', '.join(k + '.npy' for k in ALL_KEYS)}; found: {present}"
    )


def detect_format(path: str | os.PathLike) -> str:
    """One of :data:`FORMATS`, from the file's content (MATLAB / HDF5 headers) and name."""
    path = Path(path)
    if path.is_dir():
        return "npy"
    if path.exists() and not path.is_file():  # opening a FIFO would wait forever, /dev/zero never ends
        raise FileFormatError(f"{str(path)!r} is not a regular file (a FIFO or a device?); expected a feature file")
    with open(path, "rb") as fh:
        head = fh.read(128)
    import h5py

    if h5py.is_hdf5(str(path)) or head.startswith(b"MATLAB 7.3"):  # the latter damaged: h5py will say how
        return "mat-v7.3"
    if head.startswith(b"PK"):  # a zip archive: numpy's .npz
        return "npz"
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return "safetensors"
    if path.suffix == ".mat" or head[:6] == b"MATLAB":
        return "mat-v5"
    raise FileFormatError(f"{str(path)!r}: unknown feature file format (expected one of {', '.join(FORMATS)})")


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


# -- reading -------------------------------------------------------------------------------------
def read_feature_file(path: str | os.PathLike, mmap: bool = True, allow_external: bool = False) -> FeatureFile:
    """Read the nine arrays of a feature file (rows = items); memory-map (or read on demand)
    where the format allows and ``mmap`` is true.

    Every declared shape, dtype and size is checked before any data is read, and so is the
    layout (:func:`check_layout`): a damaged or hostile file fails fast with a
    :class:`FileFormatError` naming the file and key, never allocating more than its bytes can
    hold. HDF5 datasets whose bytes live outside the file (external links, external raw storage,
    virtual datasets) are refused unless ``allow_external`` is true. Value checks are
    :func:`validate_feature_file`'s job."""
    path = Path(path)
    fmt = detect_format(path)
    where = f"{path} ({fmt})"
    if path.is_file() and path.stat().st_size == 0:
        raise FileFormatError(f"{where}: the file is empty (0 bytes); expected a feature file with keys {', '.join(ALL_KEYS)}")
    with reading(where):
        source = _SOURCES[fmt](path, allow_external)
        try:
            arrays = read_arrays(source, ALL_KEYS, lambda h: check_layout(where, h, source.names, fmt), lazy=mmap, where=where)
        finally:
            getattr(source, "close", lambda: None)()
    mmapped = {k for k, a in arrays.items() if isinstance(a, np.memmap)}
    lazy = {k for k, a in arrays.items() if isinstance(a, SafetensorsArray)}
    return FeatureFile(path, fmt, arrays, mmapped, lazy)


_SOURCES = {
    "mat-v7.3": MatlabHdf5,
    "mat-v5": lambda path, allow_external: MatlabV5(path),
    "npz": lambda path, allow_external: NpzArrays(path),
    "npy": lambda path, allow_external: NpyFolder(path),
    "safetensors": lambda path, allow_external: SafetensorsArrays(path),
}


# -- validation ----------------------------------------------------------------------------------
def check_layout(where: str, headers: Mapping[str, ArrayHeader], found: Iterable[str] = (), fmt: str = "") -> None:
    """Raise a :class:`FileFormatError` naming ``where``, the key and expected vs found for:
    missing keys (``found``: every name the file holds), arrays that are not 2-D or not numeric,
    row counts differing within a split, an empty train split, and widths (columns) that are 0
    or differ between splits. Runs on the declared headers, before any data is read."""
    missing = [k for k in ALL_KEYS if k not in headers]
    if missing:
        found = sorted(found) or sorted(headers)
        shown = ", ".join(found[:20]) + (f" and {len(found) - 20} more" if len(found) > 20 else "") if found else "none"
        if fmt == "npy":
            raise FileFormatError(
                f"{where}: missing file(s) {', '.join(k + '.npy' for k in missing)}; expected all nine of "
                f"{', '.join(k + '.npy' for k in ALL_KEYS)}; found {', '.join(k + '.npy' for k in found) or 'none'}"
            )
        raise FileFormatError(f"{where}: missing key(s) {', '.join(missing)}; expected all of {', '.join(ALL_KEYS)}, found {shown}")
    for key in ALL_KEYS:
        h = headers[key]
        if len(h.shape) != 2:
            raise FileFormatError(f"{where}: key {key!r} has shape {h.shape}; expected 2-D (items, columns)")
        if h.dtype.kind not in NUMERIC_KINDS:
            raise FileFormatError(f"{where}: key {key!r} has dtype {h.dtype}; expected a numeric array (bool, integer or float)")
        if h.shape[1] == 0:
            raise FileFormatError(f"{where}: key {key!r} has shape {h.shape}: 0 columns; expected at least one")
    for split, keys in SPLIT_KEYS.items():
        rows = headers[keys[0]].shape[0]
        for key in keys[1:]:
            if headers[key].shape[0] != rows:
                raise FileFormatError(
                    f"{where}: key {key!r} has {headers[key].shape[0]} rows, expected {rows} "
                    f"(the rows of {keys[0]!r}; every key of the {split} split needs one row per item)"
                )
    if headers["I_tr"].shape[0] == 0:
        raise FileFormatError(f"{where}: the train split ({'/'.join(SPLIT_KEYS['train'])}) is empty (0 rows); expected at least one item")
    for part in range(3):
        first = SPLIT_KEYS["train"][part]
        width = headers[first].shape[1]
        for keys in SPLIT_KEYS.values():
            found_width = headers[keys[part]].shape[1]
            if found_width != width:
                raise FileFormatError(f"{where}: key {keys[part]!r} has {found_width} columns, expected {width} (the width of {first!r})")


def validate_feature_file(
    ff: FeatureFile,
    num_classes: int | None = None,
    expected_sizes: Mapping[str, int] | None = None,
    dataset: str = "",
    check_values: bool = True,
) -> None:
    """Raise a :class:`FileFormatError` (a ``ValueError``) naming the file, key and expected vs
    found for: everything :func:`check_layout` checks, a label width other than ``num_classes``,
    labels other than 0/1, NaN or inf (the value scan is skipped when ``check_values`` is false).
    Split sizes other than ``expected_sizes`` (the published ones) only warn."""
    where = f"{ff.path} ({ff.format})"
    check_layout(where, headers_of(ff.arrays), ff.arrays, ff.format)
    if num_classes is not None and ff.arrays["L_tr"].shape[1] != num_classes:
        raise FileFormatError(
            f"{where}: key 'L_tr' has {ff.arrays['L_tr'].shape[1]} columns, expected {num_classes} classes"
            f"{' for ' + dataset if dataset else ''}"
        )
    if expected_sizes:
        for split, expected in expected_sizes.items():
            found = ff.arrays[SPLIT_KEYS[split][0]].shape[0]
            if found != expected:
                warnings.warn(
                    f"{where}: the {split} split ({'/'.join(SPLIT_KEYS[split])}) has {found} items; "
                    f"the published {dataset or 'benchmark'} split has {expected} (expected {expected}, found {found})",
                    stacklevel=2,
                )
    if check_values:
        for key in ALL_KEYS:
            _scan_values(where, key, ff.arrays[key], labels=key.startswith("L_"))


def _scan_values(where: str, key: str, a: Any, labels: bool) -> None:
    """Blockwise scan (memory-mapped arrays are read once, block by block)."""
    for start in range(0, a.shape[0], _BLOCK_ROWS):
        block = np.asarray(a[start : start + _BLOCK_ROWS])
        if labels:
            bad = (block != 0) & (block != 1)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise FileFormatError(
                    f"{where}: key {key!r} must hold multi-hot labels in {{0, 1}}; found {block[r, c].item()!r} "
                    f"at row {start + r}, column {c}"
                )
        elif block.dtype.kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise FileFormatError(
                    f"{where}: key {key!r} has {block[r, c].item()!r} at row {start + r}, column {c}; expected finite values"
                )

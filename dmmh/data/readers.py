"""Readers for benchmark feature files, with validation that names the file, key and values.

Every format holds the nine BSTH arrays ``I_tr T_tr L_tr`` (train), ``I_te T_te L_te`` (query)
and ``I_db T_db L_db`` (database); ``I`` image features, ``T`` text features, ``L`` multi-hot
labels (DESIGN.md §2). Formats read (:func:`detect_format` names them):

- ``"mat-v7.3"``: MATLAB v7.3 = HDF5 (BSTH's ``*_cnn_twt*.mat``). MATLAB writes column-major, so
  each dataset is stored ``(columns, rows)`` and is **transposed** here. Contiguous uncompressed
  datasets are memory-mapped (no copy); chunked or compressed ones are read into memory.
- ``"mat-v5"``: MATLAB v5/v4 ``.mat`` (scipy), rows already samples; read into memory.
- ``"npz"``: one ``.npz`` with the nine keys; read into memory.
- ``"npy"``: a folder of ``I_tr.npy``, ``T_tr.npy``, ...; memory-mapped.
- ``"safetensors"``: one ``.safetensors`` file with the nine keys; memory-mapped.

:func:`write_npy_folder` writes the ``"npy"`` layout atomically (used as a row-major,
memory-mappable cache of the other formats).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "SPLIT_KEYS", "ALL_KEYS", "FORMATS", "FeatureFile", "find_feature_file", "detect_format",
    "read_feature_file", "validate_feature_file", "write_npy_folder",
]

SPLIT_KEYS: dict[str, tuple[str, str, str]] = {
    "train": ("I_tr", "T_tr", "L_tr"),
    "query": ("I_te", "T_te", "L_te"),
    "database": ("I_db", "T_db", "L_db"),
}
ALL_KEYS: tuple[str, ...] = tuple(k for keys in SPLIT_KEYS.values() for k in keys)
FORMATS = ("mat-v7.3", "mat-v5", "npz", "npy", "safetensors")
_BLOCK_ROWS = 8192  # rows per block when scanning (memory-mapped) arrays for bad values

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_,
}


@dataclass
class FeatureFile:
    """Arrays read from one feature file: ``arrays[key]`` is ``(rows, columns)``, rows = items."""

    path: Path
    format: str
    arrays: dict[str, Any]
    mmapped: set[str] = field(default_factory=set)

    def describe(self) -> str:
        mm = f", memory-mapped: {len(self.mmapped)} of {len(self.arrays)} arrays" if self.mmapped else ", in memory"
        shapes = ", ".join(f"{k} {tuple(self.arrays[k].shape)}" for k in ALL_KEYS if k in self.arrays)
        return f"{self.format} file {self.path}{mm} ({shapes})"


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
    with open(path, "rb") as fh:
        head = fh.read(128)
    import h5py

    if h5py.is_hdf5(str(path)):
        return "mat-v7.3"
    if head.startswith(b"PK"):  # a zip archive: numpy's .npz
        return "npz"
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return "safetensors"
    if path.suffix == ".mat" or head[:6] == b"MATLAB":
        return "mat-v5"
    raise ValueError(f"{str(path)!r}: unknown feature file format (expected one of {', '.join(FORMATS)})")


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) > 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


# -- reading -------------------------------------------------------------------------------------
def read_feature_file(path: str | os.PathLike, mmap: bool = True) -> FeatureFile:
    """Read every array of a feature file (rows = items); memory-map where the format allows
    and ``mmap`` is true. Validation is :func:`validate_feature_file`'s job."""
    path = Path(path)
    fmt = detect_format(path)
    reader = {"mat-v7.3": _read_hdf5, "mat-v5": _read_mat_v5, "npz": _read_npz, "npy": _read_npy, "safetensors": _read_safetensors}[fmt]
    try:
        arrays, mmapped = reader(path, mmap)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{str(path)!r} ({fmt}): could not be read: {exc}") from exc
    return FeatureFile(path, fmt, arrays, mmapped)


def _read_hdf5(path: Path, mmap: bool) -> tuple[dict[str, Any], set[str]]:
    import h5py

    arrays, mmapped = {}, set()
    with h5py.File(path, "r") as f:
        for key, ds in f.items():
            if not isinstance(ds, h5py.Dataset) or key.startswith("#"):
                continue  # MATLAB's "#refs#" / "#subsystem#" groups
            offset = ds.id.get_offset() if ds.chunks is None and ds.compression is None else None
            if mmap and offset is not None and ds.dtype.kind in "fiub" and ds.ndim == 2 and ds.size > 0:
                # stored (columns, rows) in C order == the MATLAB (rows, columns) array in Fortran order
                arrays[key] = np.memmap(path, dtype=ds.dtype, mode="r", offset=offset, shape=ds.shape).T
                mmapped.add(key)
            else:
                arrays[key] = np.ascontiguousarray(np.asarray(ds[()]).T)
    return arrays, mmapped


def _read_mat_v5(path: Path, mmap: bool) -> tuple[dict[str, Any], set[str]]:
    from scipy.io import loadmat

    data = loadmat(str(path))
    return {k: v for k, v in data.items() if not k.startswith("__")}, set()


def _read_npz(path: Path, mmap: bool) -> tuple[dict[str, Any], set[str]]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, set()


def _read_npy(path: Path, mmap: bool) -> tuple[dict[str, Any], set[str]]:
    arrays = {p.stem: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False) for p in sorted(path.glob("*.npy"))}
    return arrays, {k for k, a in arrays.items() if isinstance(a, np.memmap)}


def _read_safetensors(path: Path, mmap: bool) -> tuple[dict[str, Any], set[str]]:
    """safetensors layout: 8-byte little-endian header length, JSON header, then the raw bytes."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    arrays, mmapped = {}, set()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":  # no numpy dtype: widen to float32 in memory
            raw = np.fromfile(path, dtype="<u2", count=(end - start) // 2, offset=8 + n + start)
            arrays[key] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"key {key!r}: unsupported safetensors dtype {info['dtype']!r}")
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        if mmap and end > start:
            arrays[key] = np.memmap(path, dtype=dtype, mode="r", offset=8 + n + start, shape=shape)
            mmapped.add(key)
        else:
            arrays[key] = np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=8 + n + start).reshape(shape)
    return arrays, mmapped


# -- validation ----------------------------------------------------------------------------------
def validate_feature_file(
    ff: FeatureFile,
    num_classes: int | None = None,
    expected_sizes: Mapping[str, int] | None = None,
    dataset: str = "",
    check_values: bool = True,
) -> None:
    """Raise a ``ValueError`` naming the file, key and expected vs found for: missing keys, arrays
    that are not 2-D, row counts differing within a split, feature widths differing between
    splits, a label width other than ``num_classes``, labels other than 0/1, NaN or inf (the
    value scan is skipped when ``check_values`` is false). Split sizes other than
    ``expected_sizes`` (the published ones) only warn."""
    where = f"{ff.path} ({ff.format})"
    missing = [k for k in ALL_KEYS if k not in ff.arrays]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(missing)}; expected all of {', '.join(ALL_KEYS)}, "
            f"found {', '.join(sorted(ff.arrays)) or 'none'}"
        )
    for key in ALL_KEYS:
        a = ff.arrays[key]
        if a.ndim != 2:
            raise ValueError(f"{where}: key {key!r} has shape {tuple(a.shape)}; expected 2-D (items, columns)")
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{where}: key {key!r} has dtype {a.dtype}; expected a numeric array")
    for split, keys in SPLIT_KEYS.items():
        rows = ff.arrays[keys[0]].shape[0]
        for key in keys[1:]:
            if ff.arrays[key].shape[0] != rows:
                raise ValueError(
                    f"{where}: key {key!r} has {ff.arrays[key].shape[0]} rows, expected {rows} "
                    f"(the rows of {keys[0]!r}; every key of the {split} split needs one row per item)"
                )
    for part in range(3):
        first = SPLIT_KEYS["train"][part]
        width = ff.arrays[first].shape[1]
        for keys in SPLIT_KEYS.values():
            found = ff.arrays[keys[part]].shape[1]
            if found != width:
                raise ValueError(f"{where}: key {keys[part]!r} has {found} columns, expected {width} (the width of {first!r})")
    if num_classes is not None and ff.arrays["L_tr"].shape[1] != num_classes:
        raise ValueError(
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
                raise ValueError(
                    f"{where}: key {key!r} must hold multi-hot labels in {{0, 1}}; found {block[r, c].item()!r} "
                    f"at row {start + r}, column {c}"
                )
        elif block.dtype.kind == "f":
            bad = ~np.isfinite(block)
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise ValueError(
                    f"{where}: key {key!r} has {block[r, c].item()!r} at row {start + r}, column {c}; expected finite values"
                )


# -- writing -------------------------------------------------------------------------------------
def write_npy_folder(arrays: Mapping[str, Any], folder: str | os.PathLike) -> Path:
    """Write ``arrays`` as row-major ``{key}.npy`` files into ``folder`` atomically (built in a
    temporary sibling folder, then renamed into place; ``folder`` must not exist yet)."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{str(folder)!r} already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for key, a in arrays.items():
            out = np.lib.format.open_memmap(tmp / f"{key}.npy", mode="w+", dtype=a.dtype, shape=tuple(a.shape))
            for start in range(0, a.shape[0], _BLOCK_ROWS):
                out[start : start + _BLOCK_ROWS] = a[start : start + _BLOCK_ROWS]
            out.flush()
            del out
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder

"""A folder of row chunks computed once: resumable, self-describing, verified, one writer at a time.

Long computations over ``n_rows`` items (feature extraction) write their results chunk by chunk,
so that an interrupted run resumes where it stopped::

    with ChunkStore(folder, record, n_rows, chunk_size) as store:   # creates or verifies; locks
        for rows in store.pending():                                  # chunks not finished, in order
            store.write(rows, {"image": a, "text": b})                # len(rows) rows per array
        arrays = store.read_all()                                     # name -> (n_rows, ...) array
    store.remove()                                                    # once the final file is written

Layout of ``folder``:

- ``meta.json``: ``record`` (what the rows are computed from: a JSON-able dict the caller
  chooses, e.g. model and data fingerprints), ``n_rows``, ``chunk_size``, the format version and
  a random ``run_id``. The folder is created with it in place (:func:`dmmh._io.atomic_dir`), so a
  folder without a valid ``meta.json`` was not made by a ChunkStore and is refused, as is one made
  for another record, row count or chunk size: the error names the folder and the field that
  differs. Chunks of another run are never adopted.
- ``chunk_000000.npz`` ...: rows ``[i * chunk_size, (i + 1) * chunk_size)``, one ``.npy`` entry per
  array plus ``__chunk__``, the chunk's own record: ``run_id``, index, row range, count, each
  array's dtype, shape and SHA-256, and the caller's ``info`` (how it was computed, e.g. a batch
  size). Written atomically (:func:`dmmh._io.write_npz`).
- ``.lock``: held with ``fcntl.flock`` for the store's lifetime. A second store on the folder (in
  any process) gets :class:`ChunkStoreBusy`; the lock dies with its process, so a killed writer
  never blocks the next run.

Verification: every finished chunk is checked when it is reused — readable, its run id, index,
row range and count, array names, dtypes and shapes as recorded, the SHA-256 of every array,
finite values (no NaN or inf), and the same dtypes and column widths as the other chunks (a chunk
that disagrees with most of them is the bad one). **A bad chunk is recomputed**: :meth:`pending`
warns, naming the file and the reason, deletes it, and lists its rows again.
:meth:`read_all` checks every chunk once more and raises on any problem, naming the file (rerun to
recompute it). :meth:`write` refuses rows that are not a chunk, a row count other than
``len(rows)``, non-finite values and dtypes or widths unlike the other chunks'.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dmmh._io import atomic_dir, remove_stale_temporaries, temp_sibling, write_npz

__all__ = ["ChunkStore", "ChunkStoreBusy", "FORMAT", "FORMAT_VERSION"]

FORMAT = "dmmh-chunks"
FORMAT_VERSION = 1
_META, _LOCK, _ENTRY = "meta.json", ".lock", "__chunk__"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_KINDS = "biufc"  # bool, integers, floats, complex: what a feature chunk may hold


class ChunkStoreBusy(RuntimeError):
    """Another :class:`ChunkStore` (in this or another process) holds the folder."""


class _BadChunk(Exception):
    pass


class ChunkStore:
    """Chunks of ``n_rows`` rows, ``chunk_size`` per chunk, in ``folder`` (see the module docs).

    Args:
        folder: the chunk folder; created (with its parents) when missing.
        record: JSON-able dict identifying what the rows are computed from; an existing folder
            must have been made with an equal one.
        n_rows: rows in all (>= 1).
        chunk_size: rows per chunk (>= 1); the last chunk may be shorter.
    """

    def __init__(self, folder: str | os.PathLike, record: Mapping[str, Any], n_rows: int, chunk_size: int):
        if not isinstance(record, Mapping):
            raise TypeError(f"ChunkStore {folder}: record must be a dict, got {type(record).__name__}")
        try:
            self.record = json.loads(json.dumps(dict(record), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"ChunkStore {folder}: record must be JSON-able ({exc})") from exc
        for name, value in (("n_rows", n_rows), ("chunk_size", chunk_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"ChunkStore {folder}: {name} must be an integer >= 1, got {value!r}")
        self.folder = Path(folder)
        self.n_rows, self.chunk_size = int(n_rows), int(chunk_size)
        self.chunks = [range(s, min(s + self.chunk_size, self.n_rows)) for s in range(0, self.n_rows, self.chunk_size)]
        self.run_id: str | None = None
        self._fd: int | None = None
        self._schema: Schema | None = None  # dtypes and widths every chunk must share
        self._infos: list[dict | None] = [None] * len(self.chunks)

    # -- opening, locking, closing ------------------------------------------------------------
    def __enter__(self) -> ChunkStore:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> ChunkStore:
        """Create or verify the folder and take its lock (:class:`ChunkStoreBusy` if taken)."""
        if self._fd is not None:
            return self
        for _ in range(5):  # retried only when the folder is removed or replaced while we lock it
            if not os.path.lexists(self.folder):
                self._create()
            meta, lock = self.folder / _META, self.folder / _LOCK
            if not meta.is_file():
                what = "is not a folder" if not self.folder.is_dir() else f"has no {_META}"
                raise ValueError(f"{self.folder} {what}: it was not made by a ChunkStore (perhaps by an older dmmh, or "
                                 f"it is another program's); refusing to adopt its contents: delete it or write elsewhere")
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ChunkStoreBusy(
                    f"{self.folder} is in use: another run (in this or another process) holds its lock {lock} and is "
                    f"writing these chunks; wait for it to finish (the lock is released when that process ends)") from None
            if not _same_file(fd, lock):
                os.close(fd)
                continue
            self._fd = fd
            try:
                self.run_id = self._check_meta(meta)
            except BaseException:
                self.close()
                raise
            return self
        raise RuntimeError(f"{self.folder}: the folder kept being removed or replaced while opening it")

    def close(self) -> None:
        """Release the lock (also done by leaving the ``with`` block)."""
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None

    def _create(self) -> None:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "run_id": secrets.token_hex(16),
                "n_rows": self.n_rows, "chunk_size": self.chunk_size, "record": self.record}
        try:
            with atomic_dir(self.folder) as tmp:
                (tmp / _META).write_text(json.dumps(meta, sort_keys=True, indent=1))
                (tmp / _LOCK).touch()
        except FileExistsError:
            pass  # another run created it first: verified like any existing folder

    def _check_meta(self, path: Path) -> str:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: unreadable chunk folder metadata ({exc}); delete {self.folder} to start over") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not a ChunkStore's metadata (no format {FORMAT!r}); refusing to adopt {self.folder}")
        want = {"format_version": FORMAT_VERSION, "n_rows": self.n_rows, "chunk_size": self.chunk_size}
        found_record = meta.get("record")
        diffs = [(k, meta.get(k), v) for k, v in want.items() if meta.get(k) != v]
        if not diffs and not isinstance(found_record, dict):
            diffs = [("record", found_record, self.record)]
        if not diffs:
            diffs = [(f"record[{k!r}]", found_record.get(k, "<missing>"), self.record.get(k, "<missing>"))
                     for k in sorted(set(found_record) | set(self.record)) if found_record.get(k) != self.record.get(k)]
        if diffs:
            field, there, here = diffs[0]
            raise ValueError(f"{self.folder} was made by another run: {field} is {_short(there)} there but {_short(here)} "
                             f"here{f' ({len(diffs) - 1} more field(s) differ)' if len(diffs) > 1 else ''}; refusing to "
                             f"mix its chunks into this one: delete it or write elsewhere")
        run_id = meta.get("run_id")
        if not isinstance(run_id, str) or not re.fullmatch(r"[0-9a-f]{32}", run_id):
            raise ValueError(f"{path}: run_id is {_short(run_id)}, expected 32 hex digits; delete {self.folder} to start over")
        return run_id

    def _require_open(self, what: str) -> None:
        if self._fd is None:
            raise RuntimeError(f"ChunkStore {self.folder}: {what} needs the store open (use it in a with block)")
        if not _same_file(self._fd, self.folder / _LOCK):
            raise RuntimeError(f"{self.folder} was removed or replaced while this store held it")

    # -- chunks --------------------------------------------------------------------------------
    def path(self, index: int) -> Path:
        """The file of chunk ``index``."""
        return self.folder / f"chunk_{index:06d}.npz"

    def pending(self) -> list[range]:
        """Row ranges of the chunks still to compute, in order: missing ones and bad ones (each bad
        chunk is deleted with a warning naming its file and the reason)."""
        self._require_open("pending()")
        good: dict[int, dict[str, np.ndarray]] = {}
        bad: dict[int, str] = {}
        for i in range(len(self.chunks)):
            if not self.path(i).exists():
                continue
            try:
                good[i] = self._load(i)
            except _BadChunk as exc:
                bad[i] = str(exc)
        schemas = {i: _schema_of(a) for i, a in good.items()}
        if schemas:
            common = Counter(schemas.values()).most_common(1)[0][0]
            first = min(i for i, s in schemas.items() if s == common)
            for i, s in schemas.items():
                if s != common:
                    bad[i] = _schema_mismatch(s, common, f"chunk {first}'s (and most others')")
            self._schema = common
        for i in sorted(bad):
            warnings.warn(f"{self.path(i)}: {bad[i]}; recomputing it", stacklevel=2)
            self.path(i).unlink(missing_ok=True)
            self._infos[i] = None
        return [r for i, r in enumerate(self.chunks) if i not in good or i in bad]

    def write(self, rows: range, arrays: Mapping[str, np.ndarray], info: Mapping[str, Any] | None = None) -> Path:
        """Write the chunk of ``rows`` (one of :attr:`chunks`): each array ``len(rows)`` rows, finite,
        of the dtypes and widths of the other chunks. ``info`` (JSON-able) is stored with it."""
        self._require_open("write()")
        index = rows.start // self.chunk_size if isinstance(rows, range) and rows.step == 1 else -1
        if not 0 <= index < len(self.chunks) or rows != self.chunks[index]:
            raise ValueError(f"ChunkStore {self.folder}: rows {rows!r} are not a chunk (chunks are "
                             f"range(k * {self.chunk_size}, min((k + 1) * {self.chunk_size}, {self.n_rows})))")
        if not arrays:
            raise ValueError(f"ChunkStore {self.folder}: chunk {index} ({_rows(rows)}): no arrays given")
        where = f"ChunkStore {self.folder}: chunk {index} ({_rows(rows)})"
        out: dict[str, np.ndarray] = {}
        for name, a in arrays.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == _ENTRY:
                raise ValueError(f"{where}: array name {name!r} must be letters, digits, '_', '.', '-'")
            a = np.ascontiguousarray(a)
            if a.dtype.kind not in _KINDS:
                raise TypeError(f"{where}: array {name!r} has dtype {a.dtype}; expected numbers or bools")
            if a.ndim < 1 or a.shape[0] != len(rows):
                raise ValueError(f"{where}: array {name!r} has shape {a.shape}, expected {len(rows)} rows")
            _check_finite(a, f"{where}: array {name!r}")
            out[name] = a
        schema = _schema_of(out)
        if self._schema is not None and schema != self._schema:
            raise ValueError(f"{where}: {_schema_mismatch(schema, self._schema, 'the finished chunks')}; the computation "
                             f"changed between runs: delete {self.folder} to start over")
        try:
            info = json.loads(json.dumps(dict(info or {}), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{where}: info must be JSON-able ({exc})") from exc
        entry = {"run_id": self.run_id, "index": index, "start": rows.start, "stop": rows.stop, "count": len(rows),
                 "arrays": {k: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(a)} for k, a in out.items()},
                 "info": info}
        path = write_npz(self.path(index), {**out, _ENTRY: np.array(json.dumps(entry, sort_keys=True))})
        self._schema, self._infos[index] = schema, info
        return path

    def read_all(self) -> dict[str, np.ndarray]:
        """Every chunk, verified, concatenated: name → array of ``n_rows`` rows. A missing or bad
        chunk is an error naming its file."""
        self._require_open("read_all()")
        missing = [i for i in range(len(self.chunks)) if not self.path(i).exists()]
        if missing:
            shown = ", ".join(self.path(i).name for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(f"{self.folder}: {len(missing)} chunk(s) not written yet ({shown}); write every pending() chunk first")
        out: dict[str, np.ndarray] = {}
        first = None
        for i, rows in enumerate(self.chunks):
            try:
                arrays = self._load(i)
                schema = _schema_of(arrays)
                if first is None:
                    first = schema
                    out = {k: np.empty((self.n_rows, *width), dtype=np.dtype(dt)) for k, dt, width in schema}
                elif schema != first:
                    raise _BadChunk(_schema_mismatch(schema, first, "chunk 0's"))
            except _BadChunk as exc:
                raise ValueError(f"{self.path(i)}: {exc}; run again to recompute it") from None
            for k, a in arrays.items():
                out[k][rows.start : rows.stop] = a
        self._schema = first
        return out

    def chunk_infos(self) -> list[dict | None]:
        """The ``info`` of each chunk, in order, as written or verified in this session (``None``:
        not seen yet; call :meth:`pending` or :meth:`read_all` first)."""
        return list(self._infos)

    def remove(self) -> None:
        """Delete the folder (taking its lock if this store does not hold it; :class:`ChunkStoreBusy`
        if another one does). It is first renamed aside, so no half-deleted folder keeps its name."""
        if self._fd is None and not os.path.lexists(self.folder):
            return
        self.open()
        try:
            self._require_open("remove()")
            aside = temp_sibling(self.folder)
            os.rename(self.folder, aside)
        finally:
            self.close()
        shutil.rmtree(aside, ignore_errors=True)
        remove_stale_temporaries(self.folder)  # earlier removals that were killed half-way

    def _load(self, index: int) -> dict[str, np.ndarray]:
        """Chunk ``index``'s arrays, verified against its own record and this run (or _BadChunk)."""
        rows = self.chunks[index]
        try:
            with np.load(self.path(index), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as exc:  # zip, header and npy errors come in many types
            raise _BadChunk(f"unreadable ({type(exc).__name__}: {exc})") from None
        try:
            entry = json.loads(str(arrays.pop(_ENTRY)))
        except (KeyError, ValueError):
            entry = None
        recorded = entry.get("arrays") if isinstance(entry, dict) else None
        if not isinstance(recorded, dict):
            raise _BadChunk(f"no valid {_ENTRY!r} record (not written by a ChunkStore)")
        if entry.get("run_id") != self.run_id:
            raise _BadChunk(f"written by another run (run id {_short(entry.get('run_id'))}, this folder's is {self.run_id!r})")
        got = [entry.get(k) for k in ("index", "start", "stop", "count")]
        if got != [index, rows.start, rows.stop, len(rows)]:
            raise _BadChunk(f"records chunk {got[0]}, rows [{got[1]}, {got[2]}), {got[3]} rows, but this is chunk {index}, "
                            f"{_rows(rows)}")
        if sorted(arrays) != sorted(recorded):
            raise _BadChunk(f"holds arrays {sorted(arrays)} but its record lists {sorted(recorded)}")
        for name, a in arrays.items():
            rec = recorded[name] if isinstance(recorded[name], dict) else {}
            if a.dtype.str != rec.get("dtype"):
                raise _BadChunk(f"array {name!r} has dtype {a.dtype.str}, its record says {rec.get('dtype')}")
            if list(a.shape) != rec.get("shape") or a.ndim < 1 or a.shape[0] != len(rows):
                raise _BadChunk(f"array {name!r} has shape {a.shape}, its record says {rec.get('shape')} and the chunk "
                                f"has {len(rows)} rows")
            if a.dtype.kind not in _KINDS:
                raise _BadChunk(f"array {name!r} has dtype {a.dtype}; expected numbers or bools")
            if _sha256(a) != rec.get("sha256"):
                raise _BadChunk(f"array {name!r} does not match its checksum (edited or corrupted)")
            try:
                _check_finite(a, f"array {name!r}")
            except ValueError as exc:
                raise _BadChunk(str(exc)) from None
        self._infos[index] = entry.get("info") if isinstance(entry.get("info"), dict) else {}
        return arrays


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open ``fd`` is still the file at ``path`` (not removed or replaced)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data).hexdigest()


def _check_finite(a: np.ndarray, what: str) -> None:
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            at = tuple(int(i) for i in np.argwhere(bad)[0])
            rest = at[1:]
            where = f", column {rest[0]}" if len(rest) == 1 else f", position {rest}" if rest else ""
            raise ValueError(f"{what} has {a[at].item()!r} at row {at[0]}{where}; expected finite values")


Schema = tuple  # ((name, dtype, shape without rows), ...) sorted by name


def _schema_of(arrays: Mapping[str, np.ndarray]) -> Schema:
    return tuple(sorted((k, a.dtype.str, tuple(a.shape[1:])) for k, a in arrays.items()))


def _schema_mismatch(got: Schema, want: Schema, other: str) -> str:
    show = lambda s: ", ".join(f"{k} {dt} {('rows', *w)}".replace("'", "") for k, dt, w in s)  # noqa: E731
    return f"its arrays [{show(got)}] differ in dtype or width from {other} [{show(want)}]"


def _rows(rows: range) -> str:
    return f"rows [{rows.start}, {rows.stop})"


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."

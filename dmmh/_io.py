"""Atomic writes: nothing half-written is ever left under the final name.

:func:`atomic_write` (a file) and :func:`atomic_dir` (a folder) build the new content in a
temporary sibling, then rename it into place. Temporaries are named
``.<name>.<host>.<pid>.<random>.tmp`` (``host``: a short hash of the host name), so that the next
write of the same target can remove those left by a killed writer — only those whose process no
longer runs on this host; a live writer's temporary, or another host's (shared file systems), is
never touched.

Modes: a replaced file keeps its mode; a new file or folder gets the usual ``0o666`` / ``0o777``
less the process umask, as ``open()`` / ``mkdir`` would give it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

import numpy as np

__all__ = ["atomic_write", "atomic_dir", "write_npz", "temp_sibling", "remove_stale_temporaries"]

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so that equal arrays give equal .npz bytes


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object] | bytes) -> Path:
    """Write ``path`` through a temporary sibling, fsync it, then ``os.replace`` it into place.

    ``write`` is the bytes to write or a function that writes to the open binary file. On any
    error the temporary file is removed and ``path`` is left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if isinstance(write, (bytes, bytearray, memoryview)):
                f.write(write)
            else:
                write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder atomically: yields an empty temporary sibling folder to fill; when the block
    ends without error, its files are fsynced and it is renamed to ``path``. On error it is removed.

    ``path`` must not exist: :class:`FileExistsError` (before the block runs, or after it when
    another writer got there first — the new content is then discarded).
    """
    path = Path(path)
    if os.path.lexists(path):
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = temp_sibling(path)
    os.mkdir(tmp)  # 0o777 less the umask
    try:
        yield tmp
        for sub, _, files in os.walk(tmp):
            for name in files:
                fd = os.open(os.path.join(sub, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            _fsync_dir(Path(sub))
        try:
            os.rename(tmp, path)  # fails onto a non-empty folder (or a file)
        except OSError as exc:
            if os.path.lexists(path):
                raise FileExistsError(f"{path} already exists (written meanwhile by another process)") from exc
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of ``path`` left by writers that died on this host; returns them."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([0-9a-f]{{8}})\.(\d+)\.[0-9a-f]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or m.group(1) != _HOST or _alive(int(m.group(2))):
            continue
        stale = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        removed.append(stale)
    return removed


def write_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> Path:
    """Uncompressed ``.npz`` with fixed timestamps and sorted entries (equal arrays give equal
    bytes), written atomically; no pickles (object arrays are refused)."""

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for key in sorted(arrays):
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
                with zf.open(info, "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)

    return atomic_write(path, write)


def temp_sibling(path: Path) -> Path:
    """A fresh temporary name beside ``path``, removable by :func:`remove_stale_temporaries` once
    this process has died."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we wrote: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

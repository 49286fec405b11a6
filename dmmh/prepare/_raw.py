"""Reading the official raw releases: errors that name the expected path, its contents and where
the official release provides it; fast, validated parsers for their text formats; source hashes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RawReleaseError", "MissingRawFileError", "Where", "require", "read_lines", "read_binary_matrix", "Sources"]


class RawReleaseError(ValueError):
    """A raw release file is not what the official release holds (its message names the file)."""


class MissingRawFileError(RawReleaseError, FileNotFoundError):
    """A file or folder of the official release is missing."""


@dataclass(frozen=True)
class Where:
    """What a raw path should hold and which official download provides it (for error messages)."""

    what: str
    source: str


def require(path: Path, where: Where, folder: bool = False) -> Path:
    """``path`` if it exists (as a folder when ``folder``), else a :class:`MissingRawFileError`."""
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        kind = "folder" if folder else "file"
        found = " (it exists, but is not a " + kind + ")" if path.exists() else ""
        raise MissingRawFileError(f"{path}: {kind} not found{found}; expected {where.what}. "
                                  f"It comes with {where.source}.")
    return path


def read_lines(path: Path) -> list[str]:
    """The lines of a text file without line ends (``\\n`` or ``\\r\\n``), trailing empty lines
    dropped. Bytes are decoded as UTF-8; bytes that are not UTF-8 are kept (``surrogateescape``)
    so that equal bytes compare equal wherever they appear."""
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


_ALLOWED = np.zeros(256, dtype=bool)
_ALLOWED[[ord("0"), ord("1"), ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True


def read_binary_matrix(path: Path, rows: int, cols: int, where: Where) -> np.ndarray:
    """A ``(rows, cols)`` uint8 matrix from a text file of one line per row holding ``cols``
    whitespace-separated 0/1 values (NUS-WIDE's ``Labels_*.txt`` and ``AllTags1k.txt``).

    Parsed byte-wise (the 1k-tag file is ~0.5 GB); any other character, a value longer than one
    digit, a line with another count or a file with another line count is an error naming the
    file and line."""
    data = np.fromfile(require(path, where), dtype=np.uint8)
    bad = ~_ALLOWED[data]
    if bad.any():
        pos = int(np.argmax(bad))
        raise RawReleaseError(f"{path}, line {_line_of(data, pos)}: unexpected character {chr(data[pos])!r}; "
                              f"expected {where.what} (0/1 values separated by spaces or tabs)")
    digit = (data == ord("0")) | (data == ord("1"))
    joined = digit[:-1] & digit[1:]
    if joined.any():
        pos = int(np.argmax(joined))
        raise RawReleaseError(f"{path}, line {_line_of(data, pos)}: a value with more than one digit; expected "
                              f"{where.what} (0/1 values separated by spaces or tabs)")
    ends = np.flatnonzero(data == ord("\n"))
    if len(data) and data[-1] != ord("\n"):
        ends = np.append(ends, len(data))  # a last line without a line end
    digits_before = np.concatenate([[0], np.cumsum(digit, dtype=np.int64)])  # digits in data[:i]
    per_line = np.diff(np.concatenate([[0], digits_before[ends]]))
    while len(per_line) and per_line[-1] == 0 and len(per_line) > rows:
        per_line = per_line[:-1]  # trailing empty lines
    wrong = np.flatnonzero(per_line != cols)
    if len(wrong):
        line = int(wrong[0])
        raise RawReleaseError(f"{path}, line {line + 1}: {int(per_line[line])} values, expected {cols} ({where.what})")
    if len(per_line) != rows:
        raise RawReleaseError(f"{path}: {len(per_line)} lines, expected {rows} (one per image, {where.what})")
    return (data[digit] - ord("0")).reshape(rows, cols)


def _line_of(data: np.ndarray, pos: int) -> int:
    return int(np.count_nonzero(data[:pos] == ord("\n"))) + 1


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Sources:
    """The raw files a recipe read, with SHA-256 (paths relative to the raw folder), for the manifest.

    A folder of many small files (MIR-Flickr's 25,000 tag files) is one entry: its file count
    and the SHA-256 of the lines ``<name> <sha256>`` of its files in name order."""

    def __init__(self, raw: Path):
        self.raw = raw
        self.entries: list[dict] = []

    def file(self, path: Path) -> Path:
        self.entries.append({"path": self._rel(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)})
        return path

    def folder(self, folder: Path, files: list[Path]) -> None:
        h = hashlib.sha256()
        for p in sorted(files, key=lambda p: p.name):
            h.update(f"{p.name} {sha256_file(p)}\n".encode("utf-8", "surrogateescape"))
        self.entries.append({"path": self._rel(folder) + "/", "files": len(files),
                             "bytes": sum(p.stat().st_size for p in files), "sha256": h.hexdigest()})

    def _rel(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.raw)).as_posix()

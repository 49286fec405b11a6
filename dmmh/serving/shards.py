"""``INDEX.parts/``: the finished shards of an encoding in progress, the unit of resumption.

The items ``0..n-1`` of the split are cut into shards of ``shard_size`` consecutive positions
(a multiple of the batch size, so a batch never spans two shards and every batch holds the same
items whatever the number of processes). Each shard is a :class:`~dmmh.hashing.HammingIndex`
file (codes + ids, checksummed, written atomically) named after the run, whose ``meta.json``
holds the record of what fixes the codes (see :mod:`dmmh.serving.manifest`) and a random run id.

Reuse is verified: a folder with another record, or one without ``meta.json`` (not made here),
is refused, naming the field that differs (``overwrite`` discards it); the folder is created with
its ``meta.json`` in place (:func:`dmmh._io.atomic_dir`); a finished shard is reused only if it loads (checksum), has the
run's bit length and holds exactly its positions as ids, in order. A shard that fails is
encoded again, with a warning naming the file and the reason. Files of other runs are ignored.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from dmmh._io import atomic_dir
from dmmh.hashing.index import HammingIndex, IndexFileError
from dmmh.serving.manifest import record_difference

__all__ = ["ShardStore", "ShardError", "shard_ranges"]

FORMAT = "dmmh-index-parts"
VERSION = 1


class ShardError(ValueError):
    """A shard file cannot be used (unreadable, another bit length, wrong ids)."""


def shard_ranges(n_items: int, shard_size: int) -> list[range]:
    """Consecutive position ranges of ``shard_size`` items (the last one may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [range(s, min(s + shard_size, n_items)) for s in range(0, n_items, shard_size)]


class ShardStore:
    """The parts folder of one encoding (see the module docs).

    ``open`` (one process: rank 0) creates or verifies ``meta.json``; ``pending`` verifies the
    finished shards; any process ``write``s the shards it encodes; ``merge`` streams them all into one file.
    """

    def __init__(self, folder: str | Path, record: Mapping[str, Any], n_items: int, shard_size: int, n_bits: int):
        self.folder, self.record = Path(folder), json.loads(json.dumps(record))
        self.n_bits, self.ranges = int(n_bits), shard_ranges(int(n_items), int(shard_size))
        self.run_id: str | None = None

    @property
    def meta_path(self) -> Path:
        return self.folder / "meta.json"

    def path(self, i: int) -> Path:
        if self.run_id is None:
            raise RuntimeError("ShardStore: open() it (or set run_id) before naming shards")
        return self.folder / f"shard-{self.run_id}-{i:06d}.dmmh"

    def _read_meta(self) -> dict[str, Any] | None:
        if not os.path.lexists(self.folder):
            return None
        if not self.folder.is_dir() or not self.meta_path.exists():
            raise ShardError(f"{self.folder} exists but is not a parts folder of dmmh encode (no meta.json); delete it "
                             f"or pass overwrite (--overwrite)")
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardError(f"{self.meta_path}: unreadable ({exc}); delete {self.folder} or pass overwrite") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION or "run_id" not in meta:
            raise ShardError(f"{self.meta_path}: not a dmmh parts folder of version {VERSION}; delete {self.folder} "
                             f"or pass overwrite")
        return meta

    def check(self, overwrite: bool = False) -> None:
        """Read-only: refuse a folder holding another encoding's shards (unless ``overwrite``)."""
        if overwrite:
            return
        meta = self._read_meta()
        if meta is not None:
            diff = record_difference(meta.get("record"), self.record)
            if diff:
                raise ShardError(f"{self.folder} holds shards of another encoding ({diff}); pass overwrite "
                                 f"(--overwrite) to discard them, or delete the folder")

    def open(self, overwrite: bool = False) -> None:
        """Create the folder and ``meta.json``, or verify them (discarding them first if ``overwrite``)."""
        try:
            self.check(overwrite)
            meta = self._read_meta()
        except ShardError:
            if not overwrite:
                raise
            meta = None
        if meta is not None and record_difference(meta.get("record"), self.record) is None:
            self.run_id = meta["run_id"]
            return
        self.remove()
        self.run_id = secrets.token_hex(8)
        meta = {"format": FORMAT, "version": VERSION, "run_id": self.run_id, "record": self.record}
        with atomic_dir(self.folder) as tmp:  # the folder appears with its meta.json in place
            (tmp / self.meta_path.name).write_text(json.dumps(meta, indent=1) + "\n")

    def load(self, i: int) -> HammingIndex:
        """Shard ``i``, memory-mapped and verified (raises :class:`ShardError`)."""
        path = self.path(i)
        try:
            shard = HammingIndex.load(path, mmap=True)
        except (OSError, IndexFileError) as exc:
            raise ShardError(f"{path}: {exc}") from exc
        self._check(i, shard)
        return shard

    def _check(self, i: int, shard: HammingIndex) -> None:
        """Refuse shard ``i`` unless it has the run's bit length and exactly its positions as ids."""
        path, want = self.path(i), self.ranges[i]
        if shard.n_bits != self.n_bits:
            raise ShardError(f"{path}: {shard.n_bits}-bit codes, this encoding makes {self.n_bits}")
        if not torch.equal(shard.ids, torch.arange(want.start, want.stop)):
            raise ShardError(f"{path}: ids are not the positions {want.start}..{want.stop - 1} of shard {i}")

    def pending(self) -> list[int]:
        """Shards still to encode; finished ones are verified, and a bad one is removed with a warning."""
        todo = []
        for i in range(len(self.ranges)):
            if not self.path(i).exists():
                todo.append(i)
                continue
            try:
                self.load(i)
            except ShardError as exc:
                warnings.warn(f"encoding shard {i} again: {exc}", stacklevel=2)
                self.path(i).unlink()
                todo.append(i)
        return todo

    def write(self, i: int, codes: torch.Tensor, ids: torch.Tensor) -> None:
        """Write shard ``i`` (packed codes, ids = its positions) atomically."""
        want = self.ranges[i]
        if not torch.equal(ids, torch.arange(want.start, want.stop)):
            raise RuntimeError(f"shard {i}: got ids {ids.tolist()[:8]}..., expected positions {want.start}..{want.stop - 1}")
        HammingIndex(self.n_bits).add(codes, ids).save(self.path(i))

    def merge(self, out: str | Path) -> Path:
        """Write every shard, in position order, into the index file ``out``
        (:meth:`HammingIndex.merge_files <dmmh.hashing.HammingIndex.merge_files>`: streaming, each
        shard verified as :meth:`load` does); a missing or bad shard is a :class:`ShardError`."""
        paths = [self.path(i) for i in range(len(self.ranges))]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ShardError(f"{len(missing)} shard(s) missing after encoding, e.g. {missing[0]}: every process must "
                             f"write to a folder the merging process (rank 0) sees (a shared filesystem on several nodes)")
        try:
            return HammingIndex.merge_files(paths, out, check=self._check)
        except IndexFileError as exc:
            raise ShardError(str(exc)) from exc

    def remove(self) -> None:
        if self.folder.is_dir() and not self.folder.is_symlink():
            shutil.rmtree(self.folder)
        elif os.path.lexists(self.folder):
            self.folder.unlink()

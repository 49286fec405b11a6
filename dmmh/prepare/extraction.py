"""Resumable, optionally multi-process image feature extraction for ``dmmh prepare``.

Rows are extracted in chunks of ``chunk_size`` images kept in a :class:`dmmh.chunks.ChunkStore`
(verified and locked; an interrupted run recomputes only unfinished chunks). Within a chunk,
batches of ``batch_size`` rows start at the chunk's first row, so a resumed run computes exactly
the batches an uninterrupted one would.

Processes are Lightning's: a :class:`lightning.fabric.Fabric` with the given accelerator,
devices, strategy and nodes. Rank 0 holds the store and broadcasts the unfinished chunks; rank
``r`` extracts chunks ``r, r + world, ...``; after each round every rank's chunk is gathered to
rank 0 (``Fabric.all_gather``), which writes it. The images must be readable by every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm  # a dependency of lightning

from dmmh.prepare._raw import RawReleaseError
from dmmh.prepare.features import ImageFeatures

__all__ = ["extract_image_features", "fabric_for", "image_list_record"]


class ImageFiles(Dataset):
    """Images as ``transform(PIL RGB image)``; an unreadable file is an error naming it."""

    def __init__(self, paths: Sequence[Path], transform):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as exc:  # PIL raises OSError, UnidentifiedImageError, ValueError, ...
            raise RawReleaseError(f"{path}: unreadable image ({type(exc).__name__}: {exc}); replace the file, or delete "
                                  f"it and rerun with missing_images='drop' (--missing-images drop)") from None
        return self.transform(image)


class ChunkBatches(Sampler[list[int]]):
    """Batches of at most ``batch_size`` rows, each within one chunk, chunk after chunk."""

    def __init__(self, chunks: Sequence[range], batch_size: int):
        self.chunks, self.batch_size = list(chunks), int(batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self.chunks:
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    def __len__(self) -> int:
        return sum(math.ceil(len(r) / self.batch_size) for r in self.chunks)


def fabric_for(device: str = "cpu", devices: int = 1, strategy: str = "auto", num_nodes: int = 1):
    """A launched Fabric for ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...): one process on
    that device, or ``devices`` processes per node (``strategy`` e.g. ``"ddp"``) on its device type."""
    from lightning.fabric import Fabric

    kind, _, index = str(device).partition(":")
    if devices == 1 and num_nodes == 1:
        chosen = [int(index)] if index and kind != "cpu" else 1
        fabric = Fabric(accelerator=kind, devices=chosen, strategy="auto" if strategy == "auto" else strategy)
    else:
        if index:
            raise ValueError(f"device {device!r} names one device; with devices={devices} give its type only (e.g. 'cuda')")
        fabric = Fabric(accelerator=kind, devices=devices, strategy=strategy, num_nodes=num_nodes)
    fabric.launch()
    return fabric


@contextlib.contextmanager
def _exact_cuda():
    """Deterministic cuDNN and no TF32 while extracting (equal runs give equal bytes)."""
    b = torch.backends
    saved = (b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32)
    b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = False, True, False, False
    try:
        yield
    finally:
        b.cudnn.benchmark, b.cudnn.deterministic, b.cudnn.allow_tf32, b.cuda.matmul.allow_tf32 = saved


def extract_image_features(paths: Sequence[Path], features: ImageFeatures, parts: Path, record: dict, fabric,
                           batch_size: int = 64, chunk_size: int = 1024, num_workers: int = 0,
                           progress: bool = True):
    """``(features, store)``: the ``(len(paths), features.dim)`` float32 features of the images at
    ``paths`` and the chunk store at ``parts`` (created or verified with ``record``; call its
    ``remove()`` once the output is written) on rank 0, ``(None, None)`` on the other ranks."""
    from dmmh.chunks import ChunkStore

    if batch_size < 1 or chunk_size < 1:
        raise ValueError(f"batch_size and chunk_size must be >= 1, got {batch_size} and {chunk_size}")
    rank, world = fabric.global_rank, fabric.world_size
    n = len(paths)
    model = features.to(fabric.device).eval()
    store_cm = ChunkStore(parts, record, n, chunk_size) if rank == 0 else contextlib.nullcontext()
    with store_cm as store, _exact_cuda(), torch.inference_mode():
        pending = [(r.start, r.stop) for r in store.pending()] if rank == 0 else None
        pending = [range(a, b) for a, b in fabric.broadcast(pending, src=0)]
        mine = pending[rank::world]
        loader = DataLoader(ImageFiles(paths, features.transform), batch_sampler=ChunkBatches(mine, batch_size),
                            num_workers=num_workers)
        batches = iter(loader)
        info = {"batch_size": batch_size, "device": str(fabric.device), "world_size": world}
        bar = tqdm(disable=not (progress and rank == 0), unit="image", total=n, initial=n - sum(len(r) for r in pending),
                   desc=f"{features.name} features")
        try:
            for k in range(math.ceil(len(pending) / world)):
                feats = torch.zeros(chunk_size, features.dim, device=fabric.device)
                span = torch.zeros(2, dtype=torch.int64, device=fabric.device)
                if k < len(mine):
                    rows, out = mine[k], []
                    for _ in range(math.ceil(len(rows) / batch_size)):
                        out.append(model(next(batches).to(fabric.device)))
                    feats[: len(rows)] = torch.cat(out)
                    span[0], span[1] = rows.start, rows.stop
                gathered = fabric.all_gather((feats, span)) if world > 1 else (feats[None], span[None])
                if rank == 0:
                    for f, (a, b) in zip(gathered[0].cpu().numpy(), gathered[1].tolist()):
                        if b > a:
                            store.write(range(a, b), {"image": np.ascontiguousarray(f[: b - a], dtype=np.float32)},
                                        info=info)
                            bar.update(b - a)
        finally:
            bar.close()
        fabric.barrier()
        return (store.read_all()["image"], store) if rank == 0 else (None, None)


def image_list_record(raw: Path, images: Sequence[str]) -> str:
    """SHA-256 of the image paths (relative to ``raw``) and sizes: the rows a chunk store holds."""
    h = hashlib.sha256()
    for rel in images:
        h.update(f"{rel}\t{os.path.getsize(raw / rel)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()

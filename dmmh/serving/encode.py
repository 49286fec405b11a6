"""``encode_index``: a checkpoint and a collection → one :class:`~dmmh.hashing.HammingIndex` file + manifest.

Lightning's ``Trainer.predict`` does the work, so every strategy, accelerator, device count and
node count Lightning supports works unchanged (``devices=8, num_nodes=4, strategy="ddp"``):

1. every process loads the model and the collection and checks, read-only, that nothing of
   another encoding is in the way;
2. rank 0 opens the parts folder ``INDEX.parts/`` (:class:`~dmmh.serving.shards.ShardStore`),
   verifies the shards a previous run finished and broadcasts the pending ones; rank ``r`` of
   ``W`` encodes pending shards ``r, r + W, ...``, batch by batch;
3. a :class:`~lightning.pytorch.callbacks.BasePredictionWriter` packs each batch's codes and
   writes every completed shard atomically;
4. after a barrier, rank 0 merges the shards in position order into ``INDEX``, writes
   ``INDEX.json`` (:mod:`dmmh.serving.manifest`) and removes the parts folder.

The index's ids are the items' positions in the split. Batches are cut from position order
whatever the process count, so the index is byte-identical for 1 or N processes under the same
batch size and precision. Several nodes must write ``INDEX.parts/`` on a filesystem rank 0 sees.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from dmmh.hashing.packing import pack_bits
from dmmh.serving.collection import Collection, item_descriptions
from dmmh.serving.manifest import (ManifestError, index_digest, manifest_path, read_manifest, record_difference,
                                   record_of, write_manifest)
from dmmh.serving.model import load_model, model_fingerprint, model_modalities
from dmmh.serving.shards import ShardStore

__all__ = ["encode_index", "EncodeResult", "DEFAULT_SHARD_ITEMS"]

DEFAULT_SHARD_ITEMS = 1 << 18  # ~262k items: 2 MB of 64-bit codes + 2 MB of ids per shard file


@dataclass
class EncodeResult:
    """What :func:`encode_index` did (returned on rank 0 only)."""

    path: Path
    manifest: dict[str, Any]
    n_items: int
    items_encoded: int  # by this call (the others were in reused shards)
    shards: int
    shards_reused: int
    world_size: int
    shards_per_rank: list[int]
    seconds: float
    up_to_date: bool = False

    @property
    def items_per_second(self) -> float:
        """Items encoded by this call per second of the whole call (loading and merging included)."""
        return self.items_encoded / self.seconds if self.seconds > 0 else float("nan")


class _Shards(L.LightningDataModule):
    """Serves this rank's pending shards, in position order, as whole batches."""

    def __init__(self, dataset: Dataset, store: ShardStore, batch_size: int, num_workers: int, overwrite: bool):
        super().__init__()
        self.dataset, self.store, self.batch_size = dataset, store, batch_size
        self.num_workers, self.overwrite = num_workers, overwrite
        self.pending: list[int] = []
        self.mine: list[int] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        plan: Any = None
        if trainer.global_rank == 0:
            try:
                self.store.open(self.overwrite)
                plan = (self.store.run_id, self.store.pending())
            except Exception as exc:  # sent to every rank, so that none waits for shards forever
                plan = exc
        plan = trainer.strategy.broadcast(plan, src=0)
        if isinstance(plan, BaseException):
            raise plan
        self.store.run_id, self.pending = plan
        self.mine = self.pending[trainer.global_rank :: trainer.world_size]

    def predict_dataloader(self) -> DataLoader:
        positions = [p for i in self.mine for p in self.store.ranges[i]]
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=positions, shuffle=False,
                          num_workers=self.num_workers, persistent_workers=False)


class _ShardWriter(BasePredictionWriter):
    """Packs each batch's codes and writes a shard as soon as all its items are in."""

    def __init__(self, store: ShardStore):
        super().__init__(write_interval="batch")
        self.store = store
        self.queue: list[int] | None = None
        self.written = 0
        self.codes: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if self.queue is None:
            self.queue = list(trainer.datamodule.mine)
        if not self.queue:
            raise RuntimeError("a batch arrived after this rank's last shard")
        if prediction.get("index") is None:
            raise ValueError("encoding needs batches with an 'index' entry (each item's position in its split), as "
                             "dmmh's datasets give")
        self.codes.append(pack_bits(prediction["codes"]).cpu())
        self.ids.append(prediction["index"].cpu().to(torch.int64))
        have, shard = sum(len(i) for i in self.ids), self.queue[0]
        need = len(self.store.ranges[shard])
        if have > need:
            raise RuntimeError(f"a batch crosses the end of shard {shard} ({have} > {need} items): shard_size must be a "
                               f"multiple of the batch size")
        if have == need:
            self.store.write(shard, torch.cat(self.codes), torch.cat(self.ids))
            self.queue.pop(0)
            self.written += 1
            self.codes, self.ids = [], []

    def check_done(self, trainer) -> None:
        left = self.queue if self.queue is not None else list(trainer.datamodule.mine)
        if left or self.ids:
            raise RuntimeError(f"rank {trainer.global_rank}: predict ended with shard(s) {left} unwritten")


def _default_shard_size(batch_size: int) -> int:
    return batch_size * max(1, round(DEFAULT_SHARD_ITEMS / batch_size))


def _up_to_date(out: Path, record: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    """The manifest of a finished index with this record, ``None`` when there is none to reuse;
    an existing index of another encoding is an error unless ``overwrite``."""
    if not out.exists() and not manifest_path(out).exists():
        return None
    try:
        manifest = read_manifest(out)
        if not out.is_file():
            raise ManifestError(f"{out} is missing")
        if index_digest(out) != manifest["index"]["digest"]:
            raise ManifestError(f"{manifest_path(out)} does not describe {out} (checksum differs)")
        diff = record_difference(record_of(manifest), record)
    except (OSError, ManifestError) as exc:
        diff = f"unusable ({exc})"
        manifest = None
    if diff is None:
        return manifest
    if not overwrite:
        raise FileExistsError(f"{out} holds another encoding ({diff}); pass overwrite (--overwrite) to replace it")
    return None


def encode_index(ckpt: str | Path, collection: Collection, out: str | Path, *, batch_size: int | None = None,
                 shard_size: int | None = None, overwrite: bool = False, accelerator: str = "auto",
                 devices: int | str | Sequence[int] = "auto", num_nodes: int = 1, strategy: str = "auto",
                 precision: str = "32-true", progress: bool = True, callbacks: Sequence = ()) -> EncodeResult | None:
    """Encode ``collection`` with checkpoint ``ckpt`` into the index file ``out`` (+ ``out.json``).

    Args:
        batch_size: items per forward pass (default: the DataModule's ``eval_batch_size``).
        shard_size: items per shard file, a multiple of ``batch_size`` (default about 262k).
        overwrite: replace an index or parts folder of another encoding (else an error names the
            field that differs). A finished index of the same encoding is reused as is.
        accelerator, devices, num_nodes, strategy, precision: passed to ``lightning.Trainer``.
        progress: show Lightning's progress bar. callbacks: more Lightning callbacks.

    Returns the :class:`EncodeResult` on rank 0, ``None`` on the other ranks.
    """
    start, out = time.perf_counter(), Path(out)
    module = load_model(ckpt)
    n_bits = int(module.model.n_bits)
    if n_bits % 8:
        raise ValueError(f"{ckpt}: {n_bits}-bit codes; a HammingIndex holds whole bytes (n_bits a multiple of 8)")
    dm = collection.datamodule(module)
    dataset = dm.dataset(collection.split)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"split {collection.split!r} of {collection.class_path} has no items")
    batch_size = int(batch_size or dm.eval_batch_size)
    shard_size = int(shard_size or _default_shard_size(batch_size))
    if batch_size < 1 or shard_size < 1 or shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a positive multiple of batch_size ({batch_size})")
    manifest: dict[str, Any] = {
        "index": {"file": out.name, "n_items": n, "n_bits": n_bits, "digest": None},
        "model": {"checkpoint": str(Path(ckpt).resolve()), "fingerprint": model_fingerprint(module), "n_bits": n_bits,
                  "modalities": model_modalities(module)},
        "collection": {**collection.to_dict(), "n_items": n},
        "encoding": {"batch_size": batch_size, "shard_size": shard_size, "precision": str(precision)},
    }
    manifest = json.loads(json.dumps(manifest))  # the form it is read back in (tuples → lists)
    record = record_of(manifest)
    done = _up_to_date(out, record, overwrite)
    if done is not None:
        shards = -(-n // shard_size)
        return EncodeResult(out, done, n, 0, shards, shards, done["encoding"].get("world_size", 1), [],
                            time.perf_counter() - start, up_to_date=True)
    store = ShardStore(Path(f"{out}.parts"), record, n, shard_size, n_bits)
    store.check(overwrite)

    module.allow_zero_length_dataloader_with_multiple_devices = True  # a rank may have no shard left to encode
    data = _Shards(dataset, store, batch_size, dm.num_workers, overwrite)
    writer = _ShardWriter(store)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        precision=precision, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=progress, use_distributed_sampler=False, callbacks=[writer, *callbacks])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*all_gather is deprecated.*")  # torch's, about Lightning's all_gather
        trainer.predict(module, datamodule=data, return_predictions=False)
        writer.check_done(trainer)
        # waits for every rank's last shard, and tells rank 0 how many each wrote
        per_rank = trainer.strategy.all_gather(torch.tensor(writer.written)).reshape(-1).tolist()
    if trainer.global_rank != 0:
        return None
    store.merge(out)
    manifest["index"]["digest"] = index_digest(out)
    manifest["encoding"]["world_size"] = trainer.world_size
    items = item_descriptions(dm, collection.split)
    if items is not None:
        manifest["items"] = items
    write_manifest(out, manifest)
    store.remove()
    encoded = sum(len(store.ranges[i]) for i in data.pending)
    return EncodeResult(out, manifest, n, encoded, len(store.ranges), len(store.ranges) - len(data.pending),
                        trainer.world_size, per_rank, time.perf_counter() - start)

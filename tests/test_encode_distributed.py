"""``dmmh encode`` under Lightning's DDP strategy: 2 CPU processes (gloo) give exactly the 1-process index.

Both runs cut batches from position order (batch size 16) and run with one thread each, so every
batch holds the same items with the same settings and the codes are byte-identical, not merely
equal per id. 203 items in shards of 32: 7 shards, the last one short; rank r of 2 encodes pending
shards r, r + 2, ... and rank 0 merges them, so a shard rank 1 failed to write fails the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

import dmmh
from dmmh.hashing import HammingIndex
from dmmh.serving.manifest import manifest_path, record_of
from dmmh.serving.shards import ShardStore

DATA = dict(num_train=64, num_query=16, num_database=203, image_dim=24, text_dim=12, num_classes=5, batch_size=32,
            eval_batch_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "model.ckpt"
    L.seed_everything(0, verbose=False)
    data = dmmh.SyntheticMultiLabel(**DATA)
    # the default Mamba encoder: its scan is the part most sensitive to how batches are cut
    module = dmmh.DMMHModule(image_dim=24, text_dim=12, n_classes=5, n_bits=16, dim=16)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    trainer.save_checkpoint(path)
    return path


def run_encode(ckpt, out, devices: int) -> str:
    env = dict(os.environ, PL_TORCH_DISTRIBUTED_BACKEND="gloo", OMP_NUM_THREADS="1")
    data = [x for k, v in DATA.items() for x in (f"--data.{k}", str(v))]
    cmd = [sys.executable, "-m", "dmmh.cli", "encode", "--ckpt", str(ckpt), "--data", "synthetic", *data, "--out", str(out), "--batch-size", "16", "--shard-size", "32", "--no-progress",
           "--accelerator", "cpu", "--devices", str(devices)] + (["--strategy", "ddp"] if devices > 1 else [])
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def single(ckpt):
    out = ckpt.parent / "one.dmmh"
    assert "7 shard(s), 0 reused, 1 process(es) writing 7," in run_encode(ckpt, out, 1)
    return out


def test_two_process_encode_equals_single_process(ckpt, single, tmp_path):
    two = tmp_path / "two.dmmh"
    # rank 0 wrote shards 0, 2, 4, 6 and rank 1 shards 1, 3, 5
    assert "7 shard(s), 0 reused, 2 process(es) writing 4+3," in run_encode(ckpt, two, 2)
    a, b = HammingIndex.load(single), HammingIndex.load(two)
    assert a.ids.tolist() == list(range(203)) and torch.equal(a.ids, b.ids)
    assert torch.equal(a.codes, b.codes)
    assert single.read_bytes() == two.read_bytes()
    ma, mb = (json.loads(manifest_path(p).read_text()) for p in (single, two))
    assert (ma["encoding"]["world_size"], mb["encoding"]["world_size"]) == (1, 2)
    assert record_of(ma) == record_of(mb) and ma["index"] == {**mb["index"], "file": "one.dmmh"}
    assert not (tmp_path / "two.dmmh.parts").exists()


def test_two_processes_resume_shards_of_a_one_process_run(ckpt, single, tmp_path):
    two = tmp_path / "two.dmmh"
    done = HammingIndex.load(single)
    # shards 0-5 finished earlier (here: planted with the 1-process codes); rank 0 encodes shard 6, rank 1 nothing
    store = ShardStore(f"{two}.parts", record_of(json.loads(manifest_path(single).read_text())), 203, 32, 16)
    store.open()
    for i in range(6):
        r = store.ranges[i]
        store.write(i, done.codes[r.start:r.stop], done.ids[r.start:r.stop])
    assert "7 shard(s), 6 reused, 2 process(es) writing 1+0," in run_encode(ckpt, two, 2)
    assert single.read_bytes() == two.read_bytes()

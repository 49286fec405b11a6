"""The evaluation protocol: held-out validation, fit never reads test data, labels never reach the
codes, every training item is seen each epoch, killed runs resume, short runs log their loss."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

import dmmh
from dmmh.data.base import EpochShuffle, Split, hold_out
from dmmh.data.uci import UCIMultipleFeatures, load_uci_mfeat, stratified_split
from _benchmark_files import make_arrays, write_mat73

CONFIGS = Path(dmmh.__file__).parent / "configs"


def _trainer(tmp_path, **kw):
    opts = dict(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    return L.Trainer(default_root_dir=tmp_path, **(opts | kw))


def _module(dm, **kw):
    return dmmh.DMMHModule(dm.image_dim, dm.text_dim, dm.num_classes, **({"n_bits": 8, "encoder": "mlp", "dim": 8} | kw))


# -- the held-out split ----------------------------------------------------------------------------

@pytest.mark.parametrize(("n", "val_split", "k"), [(5000, 0.1, 500), (21000, 0.1, 2100), (7, 0.1, 1), (1000, 0.25, 250),
                                                   (10, 3, 3), (10, 3.0, 3), (2, 0.5, 1), (9, 0, 0)])
def test_hold_out_is_a_seeded_partition(rng, n, val_split, k):
    seed = int(rng.integers(1 << 31))
    train, val = hold_out(n, val_split, seed)
    assert len(val) == k and len(train) == n - k
    assert sorted({*train.tolist(), *val.tolist()}) == list(range(n)) and not set(train) & set(val)
    assert list(train) == sorted(train) and list(val) == sorted(val)
    again = hold_out(n, val_split, seed)
    assert np.array_equal(again[1], val)
    if 0 < k < n - 1 and n > 20:
        assert not np.array_equal(hold_out(n, val_split, seed + 1)[1], val)


@pytest.mark.parametrize(("val_split", "match"), [
    (1.5, "whole count"), (-0.1, "fraction"), ("train", "or 'test'"), (10, "leaves none to train on"),
])
def test_bad_val_split(val_split, match):
    with pytest.raises(ValueError, match=match):
        dm = dmmh.SyntheticMultiLabel(num_train=10, num_query=4, num_database=20, val_split=val_split)
        dm.rows("fit")


def _ids(loader) -> list[int]:
    return [int(v) for b in loader for v in b["image"][:, 0]]


def _role_ids(loader) -> tuple[list[int], list[int]]:
    """Ids of the query items and of the database items of one evaluation loader (``"role"`` 0 / 1)."""
    out: tuple[list[int], list[int]] = ([], [])
    for b in loader:
        for v, r in zip(b["image"][:, 0], b["role"]):
            out[int(r)].append(int(v))
    return out


def test_benchmark_ids_of_train_validation_and_test_queries_are_disjoint(tmp_path, rng):
    """Every item carries a unique id in feature 0; train items are copies of database items (train ⊂ database)."""
    arrays = make_arrays(rng, 24, sizes=(40, 15, 60))
    arrays["I_db"][:, 0] = np.arange(60)
    train_rows = rng.choice(60, 40, replace=False)
    for part in ("I", "T", "L"):
        arrays[f"{part}_tr"] = arrays[f"{part}_db"][train_rows].copy()
    arrays["I_te"][:, 0] = 1000 + np.arange(15)
    dm = dmmh.data.MIRFlickr25K(root=str(write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)), batch_size=8,
                                eval_batch_size=8, val_seed=int(rng.integers(1 << 31)))
    with pytest.warns(UserWarning, match="published"):
        dm.splits  # noqa: B018
    fit = _ids(dm.train_dataloader())
    val_query, val_db = _role_ids(dm.val_dataloader())
    query, database = _role_ids(dm.test_dataloader())
    assert len(val_query) == 4 and len(fit) == len(set(fit)) == 36
    assert not set(fit) & set(val_query) and set(fit) | set(val_query) == set(train_rows.tolist())
    assert sorted(val_db) == sorted(fit)  # the validation database: the items trained on
    assert not set(query) & (set(fit) | set(val_query) | set(val_db))
    assert sorted(database) == list(range(60)) and sorted(query) == list(range(1000, 1015))


def test_uci_ids_of_train_validation_and_test_queries_are_disjoint(rng):
    val_seed = int(rng.integers(1 << 31))
    dm = UCIMultipleFeatures(val_seed=val_seed)
    _, classes = load_uci_mfeat()
    rows = stratified_split(classes, 20, 100, 0)  # the digits' row ids of each split
    ids = {}
    for role in ("fit", "val_query", "val_database", "query"):
        split, positions = dm.rows(role)
        ids[role] = set(rows[split][positions if positions is not None else slice(None)].tolist())
    assert (len(ids["fit"]), len(ids["val_query"]), len(ids["query"])) == (900, 100, 200)
    assert not ids["fit"] & ids["val_query"] and ids["val_database"] == ids["fit"]
    assert not ids["query"] & (ids["fit"] | ids["val_query"])
    assert ids["fit"] | ids["val_query"] == set(rows["train"].tolist())
    # the batches carry the rows of the split they come from
    batch = next(iter(dm.val_dataloader()))
    np.testing.assert_array_equal(batch["label"].argmax(1).numpy(), classes[rows["train"][batch["index"].numpy()]])


def test_pairs_validation_is_held_out_of_training(tmp_path):
    from PIL import Image

    from dmmh.data.pairs import PairsDataModule

    lines = ["image,caption,tags,split"]
    for i in range(12):
        Image.new("RGB", (4, 4), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,item {i},{'a' if i % 2 else 'b'},{'query' if i >= 10 else 'train'}")
    (tmp_path / "metadata.csv").write_text("\n".join(lines) + "\n")
    dm = PairsDataModule(str(tmp_path), transform=lambda im: torch.zeros(3, 4, 4),
                         tokenizer=lambda texts: np.zeros((len(texts), 5), dtype=np.int64),
                         cache_dir=str(tmp_path / ".hf"), val_split=0.2)
    table_rows = {role: set(dm.dataset(role).rows.tolist()) for role in ("fit", "val_query", "val_database", "query")}
    assert len(table_rows["val_query"]) == 2 and len(table_rows["fit"]) == 8
    assert not table_rows["fit"] & table_rows["val_query"] and table_rows["val_database"] == table_rows["fit"]
    assert table_rows["query"] == {10, 11} and not table_rows["query"] & (table_rows["fit"] | table_rows["val_query"])


# -- fit never reads a test item -------------------------------------------------------------------

class Tracked:
    """An array that records the rows read from it."""

    def __init__(self, array: np.ndarray, log: list):
        self.array, self.log = array, log
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index):
        self.log.extend(np.arange(len(self.array))[index].reshape(-1).tolist())
        return self.array[index]


class TrackedData(dmmh.SyntheticMultiLabel):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.reads = {s: [] for s in ("train", "query", "database")}

    def load_splits(self):
        return {name: Split(*(Tracked(getattr(s, k), self.reads[name]) for k in ("image", "text", "label")))
                for name, s in super().load_splits().items()}


def test_fit_never_iterates_a_test_item(tmp_path):
    dm = TrackedData(num_train=60, num_query=20, num_database=80, batch_size=16, eval_batch_size=32)
    trainer = _trainer(tmp_path, max_epochs=2, num_sanity_val_steps=2)
    trainer.fit(_module(dm), dm)
    assert dm.reads["query"] == [] and dm.reads["database"] == []
    assert set(dm.reads["train"]) == set(range(60))  # trained on 54, validated on 6
    trainer.test(trainer.lightning_module, dm, verbose=False)
    assert set(dm.reads["query"]) == set(range(20)) and set(dm.reads["database"]) == set(range(80))


def test_selected_on_test_is_said_in_the_log_and_the_checkpoint(tmp_path):
    dm = TrackedData(num_train=60, num_query=20, num_database=80, batch_size=16, val_split="test")
    trainer = _trainer(tmp_path, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=True)
    with pytest.warns(UserWarning, match="selected on test: validation uses the test queries"):
        trainer.fit(_module(dm), dm)
    assert dm.reads["query"] and dm.reads["database"]  # the literature's protocol reads the test split
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["validation"].startswith("selected on test")
    hparams = yaml.safe_load((Path(trainer.logger.log_dir) / "hparams.yaml").read_text())
    assert hparams["validation"].startswith("selected on test") and hparams["n_bits"] == 8
    assert dmmh.DMMHModule.load_from_checkpoint(trainer.checkpoint_callback.best_model_path).hparams.n_bits == 8
    held = dmmh.SyntheticMultiLabel(num_train=60, num_query=20, num_database=80)
    assert held.validation.startswith("held out: 6 of the 60 training items")


# -- labels never reach the codes --------------------------------------------------------------------

@pytest.mark.parametrize("encoder", ["mlp", "mamba", "transformer"])
def test_codes_do_not_depend_on_the_labels(tmp_path, rng, encoder):
    """Some published multi-view hashing code feeds ground truth into the encoder (mAP ~0.99): dmmh's
    query and database codes, through predict and test, are bit-identical whatever the labels."""
    L.seed_everything(int(rng.integers(1 << 31)), verbose=False)
    dm = dmmh.SyntheticMultiLabel(num_train=48, num_query=24, num_database=64, batch_size=32, eval_batch_size=16)
    module = _module(dm, encoder=encoder, n_bits=16, dim=16)
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(module, dm)

    def codes():
        seen = []
        original = module.test_map.update
        module.test_map.update = lambda c, *a: (seen.append(c.clone()), original(c, *a))[1]
        trainer.test(module, dm, verbose=False)
        module.test_map.update = original
        predicted = [b["codes"] for batches in trainer.predict(module, dm) for b in batches]
        return torch.cat(seen), torch.cat(predicted)

    before = codes()
    assert set(before[1].unique().tolist()) <= {-1.0, 1.0}
    for change in ("permuted", "zeroed"):
        for split in ("query", "database"):
            y = dm.splits[split].label
            y[...] = y[rng.permutation(len(y))] if change == "permuted" else 0
        after = codes()
        assert all(torch.equal(a, b) for a, b in zip(before, after)), change


# -- every training item, every epoch (#15.11) ------------------------------------------------------

@pytest.mark.parametrize(("n", "batch"), [(4500, 1024), (1025, 1024), (7, 3), (3, 5), (1024, 1024), (2, 1)])
def test_every_training_item_is_seen_each_epoch(n, batch):
    dm = dmmh.SyntheticMultiLabel(num_train=n, num_query=2, num_database=n, image_dim=2, text_dim=2, num_classes=3,
                                  batch_size=batch, val_split=0, seed=3)
    loader = dm.train_dataloader()
    epochs = []
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        batches = [b["index"].tolist() for b in loader]
        assert all(len(b) > 1 for b in batches) or n == 1 or batch == 1
        epochs.append([i for b in batches for i in b])
    lone = n > 1 and n % batch == 1  # a batch of one would break batch norm: that item sits this epoch out
    for seen in epochs:
        assert len(seen) == len(set(seen)) == n - lone and set(seen) <= set(range(n))
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    if lone:
        assert len({tuple(sorted(set(range(n)) - set(seen))) for seen in epochs}) > 1  # not always the same item


def test_mir_size_epoch_uses_every_item():
    """MIR: 5,000 training items, batch 1024, 500 held out: each epoch trains on all 4,500 (main dropped 904)."""
    dm = dmmh.SyntheticMultiLabel(num_train=5000, num_query=2, num_database=5000, image_dim=2, text_dim=2,
                                  num_classes=3, batch_size=1024)
    sizes = [len(b["index"]) for b in dm.train_dataloader()]
    assert sizes == [1024] * 4 + [404]


def test_epoch_order_is_the_same_after_a_resume():
    running = EpochShuffle(50, seed=7)
    orders = [list(running) for _ in range(4)]  # epochs 0..3 without set_epoch: counts on
    resumed = EpochShuffle(50, seed=7)
    resumed.set_epoch(3)
    assert list(resumed) == orders[3] and len({tuple(o) for o in orders}) == 4
    assert list(resumed) == list(running)  # both count on to epoch 4


# -- the shipped configs ---------------------------------------------------------------------------

def _mir_file(tmp_path, rng):
    return str(write_mat73(tmp_path / "mir_cnn_twt.mat", make_arrays(rng, 24, sizes=(60, 20, 80), image_dim=9, text_dim=6)))


def _fit(args, cwd, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "dmmh.cli", "fit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


KILLER = textwrap.dedent("""
    import os, signal
    from lightning.pytorch.callbacks import Callback

    class KillAtEpoch(Callback):
        def __init__(self, epoch: int):
            self.epoch = epoch

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == self.epoch:
                os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_run_resumes_from_last_ckpt(tmp_path, rng):
    """Killed (SIGKILL) as epoch 3 starts, long before the first validation (every 10 epochs): the
    configs' last.ckpt holds epoch 2, and --ckpt_path resumes there and finishes."""
    (tmp_path / "killer.py").write_text(KILLER)
    args = ["-c", str(CONFIGS / "mirflickr" / "dmmh_16.yaml"), "--data.root", _mir_file(tmp_path, rng),
            "--model.encoder", "mlp", "--model.dim", "8", "--trainer.max_epochs", "6",
            "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"]
    killed = _fit([*args, '--trainer.callbacks+={"class_path": "killer.KillAtEpoch", "init_args": {"epoch": 3}}'], tmp_path)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(str(p) for p in (tmp_path / "run").rglob("*"))
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 2
    resumed = _fit([*args, "--ckpt_path", str(last)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(tmp_path / "run" / "lightning_logs" / "version_1" / "metrics.csv") as f:
        epochs = {int(row["epoch"]) for row in csv.DictReader(f)}
    assert epochs == {3, 4, 5}
    final = tmp_path / "run" / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert torch.load(final, map_location="cpu", weights_only=False)["epoch"] == 5


def test_a_short_run_records_its_training_loss(tmp_path, rng):
    """#15.8: a 2-epoch run with a shipped config writes metrics.csv with the training loss of each epoch."""
    run = _fit(["-c", str(CONFIGS / "mirflickr" / "dmmh_64.yaml"), "--data.root", _mir_file(tmp_path, rng),
                "--model.encoder", "mlp", "--model.dim", "8", "--trainer.max_epochs", "2",
                "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false"], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "smaller than the logging interval" not in run.stderr
    metrics = list(csv.DictReader(open(tmp_path / "run" / "lightning_logs" / "version_0" / "metrics.csv")))
    losses = [(int(r["epoch"]), float(r["train/loss"])) for r in metrics if r.get("train/loss")]
    assert {epoch for epoch, _ in losses} == {0, 1} and all(np.isfinite(v) for _, v in losses)


@pytest.mark.parametrize("config", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml")))
def test_shipped_config_defaults(config):
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    t = cfg["trainer"]
    assert t["log_every_n_steps"] == 1 and t["num_sanity_val_steps"] == 1
    best, latest = t["callbacks"]
    assert best["init_args"] == {"monitor": "val/mAP", "mode": "max", "filename": "best"}
    assert latest["init_args"]["every_n_epochs"] == 1 and latest["init_args"]["save_last"] is True
    assert latest["init_args"]["save_on_train_epoch_end"] is True
    assert "val_split" not in cfg["data"]["init_args"]  # the held-out default
    assert cfg["model"]["n_bits"] == int(config.split("_")[-1].split(".")[0])
    if not config.startswith("uci"):  # measured (docs/reproducing.md, "Evaluation batch size"); UCI is tiny
        assert cfg["data"]["init_args"]["eval_batch_size"] == 256

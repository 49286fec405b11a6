"""The DMMH model and its LightningModule: composition by name, learning, bad input."""

import importlib.util
import math
from pathlib import Path

import lightning as L
import pytest
import torch

import dmmh
from dmmh.metrics import mean_average_precision

ROOT = Path(__file__).resolve().parents[1]


def trainer(tmp_path, **kw):
    opts = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, accelerator="cpu", devices=1)
    opts.update(kw)
    return L.Trainer(**opts)


def small_data(**kw):
    opts = dict(num_train=256, num_query=64, num_database=512, image_dim=48, text_dim=24, num_classes=6, batch_size=64)
    opts.update(kw)
    return dmmh.SyntheticMultiLabel(**opts)


def module_for(data, **kw):
    opts = dict(n_bits=16, encoder="mlp", dim=32)
    opts.update(kw)
    return dmmh.DMMHModule(image_dim=data.image_dim, text_dim=data.text_dim, n_classes=data.num_classes, **opts)


@pytest.mark.parametrize("fusion", ["additive", "cnn_deep"])
@pytest.mark.parametrize("head", ["tanh", "straight_through"])
def test_training_beats_untrained_model(tmp_path, fusion, head):
    L.seed_everything(1, verbose=False)
    data = small_data(num_train=512)
    module = module_for(data, fusion=fusion, head=head, lr=3e-3)
    t = trainer(tmp_path, max_epochs=10)
    before = t.validate(module, data, verbose=False)[0]["val/mAP"]
    t.fit(module, data)
    after = t.validate(module, data, verbose=False)[0]["val/mAP"]
    assert after > before + 0.15, (before, after)
    assert after > 0.75


@pytest.mark.parametrize("options", [{}, {"map_top_k": 5, "map_normalizer": "relevant", "map_empty": "exclude"}, {"map_top_k": 20, "map_normalizer": "min"}])
def test_logged_map_equals_direct_computation(tmp_path, options):
    L.seed_everything(2, verbose=False)
    data = small_data(num_query=37, num_database=101, num_train=50, batch_size=16, val_split="test")
    data.eval_batch_size = 16  # several eval batches per split
    module = module_for(data, **options)
    logged = trainer(tmp_path).validate(module, data, verbose=False)[0]["val/mAP"]
    q, db = data.splits["query"], data.splits["database"]
    qc = module.encode(torch.from_numpy(q.image), torch.from_numpy(q.text))
    dc = module.encode(torch.from_numpy(db.image), torch.from_numpy(db.text))
    direct = mean_average_precision(
        qc, dc, torch.from_numpy(q.label), torch.from_numpy(db.label), top_k=options.get("map_top_k"),
        empty=options.get("map_empty", "zero"), normalizer=options.get("map_normalizer", "retrieved"),
    )
    assert math.isclose(logged, direct, rel_tol=1e-6)


def test_compose_every_registered_part():
    x, t = torch.randn(4, 20), torch.randn(4, 10)
    for enc in ["mlp"]:
        for fusion in dmmh.list_fusions():
            for head in dmmh.list_hash_heads():
                m = dmmh.create_model(image_dim=20, text_dim=10, n_bits=8, dim=16, encoder=enc, fusion=fusion, head=head).eval()
                assert m(x, t).shape == (4, 8)
                assert m.encode(image=x).shape == (4, 8)
                assert m.encode(text=t).shape == (4, 8)


def test_per_modality_encoder_overrides():
    m = dmmh.create_model(image_dim=20, text_dim=10, n_bits=8, dim=16, encoder="mlp", text_encoder_kwargs={"hidden": (7,)})
    assert m.encoders["text"].net[0][0].out_features == 7
    assert m.encoders["image"].net[0][0].out_features == 512
    with pytest.raises(ValueError, match="tokens of shape"):
        dmmh.create_model(image_dim=20, text_dim=10, n_bits=8, dim=16, encoder="mlp", text_encoder_kwargs={"num_tokens": 3})


def test_misspelt_names_in_model_suggest_the_right_one():
    with pytest.raises(KeyError, match="cnn_deep"):
        dmmh.create_model(image_dim=4, text_dim=4, fusion="cnn_dee")
    with pytest.raises(KeyError, match="straight_through"):
        dmmh.create_model(image_dim=4, text_dim=4, encoder="mlp", head="straight_trough")


def test_bad_input_errors():
    data = small_data()
    module = module_for(data)
    good = next(iter(data.train_dataloader()))
    bad = dict(good, text=good["text"][:-1])
    with pytest.raises(ValueError, match="batch sizes differ"):
        module.training_step(bad, 0)
    bad = dict(good, image=good["image"][:, :-2])
    with pytest.raises(ValueError, match="feature width 46 differs from the 48"):
        module.training_step(bad, 0)
    img = good["image"].clone()
    img[3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        module.training_step(dict(good, image=img), 0)
    lab = good["label"].clone()
    lab[2, 1] = 0.5
    with pytest.raises(ValueError, match="labels must be 0/1.*row 2, column 1"):
        module.training_step(dict(good, label=lab), 0)
    with pytest.raises(ValueError, match="5 classes, expected 6"):
        module.training_step(dict(good, label=good["label"][:, :5]), 0)
    with pytest.raises(ValueError, match="at least one"):
        module.model(None, None)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_training(tmp_path, precision):
    L.seed_everything(0, verbose=False)
    data = small_data(num_train=128)
    module = module_for(data)
    t = trainer(tmp_path, max_epochs=1, precision=precision, limit_val_batches=1)
    t.fit(module, data)
    assert torch.isfinite(t.callback_metrics["train/loss"])
    assert 0.0 <= t.callback_metrics["val/mAP"] <= 1.0


def test_checkpoint_reloads_by_name(tmp_path):
    data = small_data()
    module = module_for(data, fusion="additive", head="straight_through", losses={"central_similarity": 1.0, "quantization": 0.1})
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    t.fit(module, data)
    t.save_checkpoint(tmp_path / "m.ckpt")
    again = dmmh.DMMHModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert again.hparams.fusion == "additive" and type(again.model.head).__name__ == "StraightThroughHead"
    x = torch.randn(5, data.image_dim)
    y = torch.randn(5, data.text_dim)
    assert torch.equal(module.encode(x, y), again.encode(x, y))


def test_custom_head_example(tmp_path):
    """examples/custom_hash_head.py: a downstream head used by name, saved and reloaded."""
    spec = importlib.util.spec_from_file_location("custom_hash_head_example", ROOT / "examples" / "custom_hash_head.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "soft_sign" in dmmh.list_hash_heads()
    out = mod.main(tmp_path, epochs=3)
    assert out["identical"] == 1.0
    assert out["mAP"] > 0.6


def test_modality_dropout_only_in_training():
    torch.manual_seed(0)
    m = dmmh.create_model(image_dim=6, text_dim=5, n_bits=8, dim=8, encoder="mlp", fusion="additive", modality_dropout=1.0)
    x, t = torch.randn(64, 6), torch.randn(64, 5)
    m.eval()
    both = m(x, t)
    img_only, txt_only = m(image=x), m(text=t)
    m.train()
    for enc in m.encoders.values():  # disable the encoders' own dropout to compare exactly
        enc.eval()
    dropped = m(x, t)
    matches_img = torch.isclose(dropped, img_only).all(1)
    matches_txt = torch.isclose(dropped, txt_only).all(1)
    assert bool((matches_img | matches_txt).all())  # p=1: every item lost one modality
    assert 0 < int(matches_img.sum()) < 64  # and which one is random
    assert not torch.allclose(both, img_only)
    with pytest.raises(ValueError, match="modality_dropout"):
        dmmh.create_model(image_dim=6, text_dim=5, modality_dropout=1.5)


def test_single_validation_loader_serves_as_query_and_database_in_fit(tmp_path):
    """fit's sanity check runs validation_step outside the VALIDATING stage; one loader must still fill both roles."""
    data = small_data(num_train=32, num_query=12, num_database=40)
    data.setup("fit")

    class OneLoader(L.LightningDataModule):
        def train_dataloader(self):
            return data.train_dataloader()

        def val_dataloader(self):
            return data.predict_dataloader()[1]  # one loader without roles

    module = module_for(data)
    t = trainer(tmp_path, max_epochs=1, num_sanity_val_steps=2)
    t.fit(module, OneLoader())
    assert 0.0 <= float(t.callback_metrics["val/mAP"]) <= 1.0


@pytest.mark.parametrize("n_bits", [0, -8, 12, 7, 1, 8.0, "16", True])
def test_n_bits_must_be_a_positive_multiple_of_8(n_bits):
    with pytest.raises(ValueError, match=r"n_bits must be a positive multiple of 8, got .*whole bytes"):
        dmmh.DMMHModule(image_dim=6, text_dim=5, n_classes=3, n_bits=n_bits, encoder="mlp", dim=8)


@pytest.mark.parametrize("n_bits", [8, 24, 128])
def test_n_bits_multiples_of_8_are_accepted(n_bits):
    import numpy as np

    for value in (n_bits, np.int64(n_bits)):
        m = dmmh.create_model(image_dim=6, text_dim=5, n_bits=value, encoder="mlp", dim=8, fusion="additive")
        assert m.eval().encode(torch.randn(3, 6), torch.randn(3, 5)).shape == (3, n_bits)


def test_test_logs_map_once_and_returns_one_dict(tmp_path, capsys):
    """``trainer.test`` over a DataModule: one dataloader, one ``test/mAP`` (printed once), equal to the
    functional mAP of the codes computed here, with several batches straddling the query/database boundary."""
    L.seed_everything(3, verbose=False)
    data = small_data(num_query=37, num_database=101, num_train=50, batch_size=16)
    data.eval_batch_size = 16  # 37 queries: the third batch holds 5 queries and 11 database items
    module = module_for(data)
    results = trainer(tmp_path).test(module, data, verbose=True)
    assert len(results) == 1 and set(results[0]) == {"test/mAP"}
    assert capsys.readouterr().out.count("test/mAP") == 1
    q, db = data.splits["query"], data.splits["database"]
    direct = mean_average_precision(module.encode(torch.from_numpy(q.image), torch.from_numpy(q.text)),
                                    module.encode(torch.from_numpy(db.image), torch.from_numpy(db.text)),
                                    torch.from_numpy(q.label), torch.from_numpy(db.label))
    assert math.isclose(results[0]["test/mAP"], direct, rel_tol=1e-6)


@pytest.mark.parametrize("sizes", [(5, 9), (0, 4), (3, 0), (1, 1)])
def test_query_database_dataset_tags_roles_in_order(rng, sizes):
    from dmmh.data.query_database import QueryDatabaseDataset

    class Items(torch.utils.data.Dataset):  # no __getitems__: the per-item path
        def __init__(self, tag, n):
            self.tag, self.n = tag, n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            if not 0 <= i < self.n:
                raise IndexError(i)
            return {"tag": self.tag, "index": torch.tensor(i)}

    nq, ndb = sizes
    both = QueryDatabaseDataset(Items("q", nq), Items("db", ndb))
    expected = [("q", i, 0) for i in range(nq)] + [("db", i, 1) for i in range(ndb)]
    assert len(both) == nq + ndb
    assert [(x["tag"], int(x["index"]), int(x["role"])) for x in (both[i] for i in range(len(both)))] == expected
    order = rng.permutation(len(both)).tolist()
    assert [(x["tag"], int(x["index"]), int(x["role"])) for x in both.__getitems__(order)] == [expected[i] for i in order]
    with pytest.raises(IndexError):
        both[len(both)]


def test_query_database_dataset_reads_feature_splits_batched():
    """Over FeatureDatasets (their batched ``__getitems__``): the same rows as indexing each split."""
    from dmmh.data.query_database import QueryDatabaseDataset

    data = small_data(num_train=8, num_query=7, num_database=11)
    both = QueryDatabaseDataset(data.dataset("query"), data.dataset("database"))
    batch = torch.utils.data.default_collate(both.__getitems__([12, 0, 6, 7, 17]))
    s = data.splits
    rows = [("query", 0), ("query", 6), ("database", 0), ("database", 10)]
    assert batch["role"].tolist() == [1, 0, 0, 1, 1] and batch["index"].tolist() == [5, 0, 6, 0, 10]
    for k, (split, row) in zip([1, 2, 3, 4], rows):
        assert torch.equal(batch["image"][k], torch.from_numpy(s[split].image[row]).float())
    assert torch.equal(batch["text"][0], torch.from_numpy(s["database"].text[5]).float())

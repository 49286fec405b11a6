"""The torchmetrics class: padding duplicates, database order, DDP (2 CPU processes, gloo), Lightning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dmmh.metrics import RetrievalMAP, mean_average_precision, retrieval_metrics


def make_data(seed=0, n_q=13, n_db=41, n_bits=16, n_classes=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_q, n_bits, generator=g)
    d = torch.randn(n_db, n_bits, generator=g).round()  # many exact zeros and repeats → ties
    yq = (torch.rand(n_q, n_classes, generator=g) < 0.3).float()
    yd = (torch.rand(n_db, n_classes, generator=g) < 0.3).float()
    yq[0] = 0  # a query with no relevant item
    return q, d, yq, yd


def shard(n, rank, world):
    """DistributedSampler(shuffle=False) order: pad by repeating the first indices, then stride."""
    idx = list(range(n))
    idx += idx[: (-n) % world]
    return torch.tensor(idx[rank::world])


def feed(metric, q, d, yq, yd, rank=0, world=1, batch=4):
    for role, codes, labels in (("database", d, yd), ("query", q, yq)):  # database first: order must not matter
        idx = shard(len(codes), rank, world).flip(0)  # reversed within the rank: compute restores index order
        for s in range(0, len(idx), batch):
            i = idx[s : s + batch]
            metric.update(codes[i], labels[i], i, role)


@pytest.mark.parametrize("empty", ["zero", "exclude"])
def test_metric_equals_functional_despite_duplicates_and_order(empty):
    q, d, yq, yd = make_data()
    for top_k in (None, 5):
        m = RetrievalMAP(top_k=top_k, empty=empty)
        feed(m, q, d, yq, yd, rank=0, world=1)
        feed(m, q[:3], d[:3], yq[:3], yd[:3])  # duplicates of already-seen indexes are dropped
        expected = mean_average_precision(q, d, yq, yd, top_k=top_k, empty=empty)
        assert m.compute().item() == pytest.approx(expected, abs=1e-12)
    assert m.compute_all(radius=1)["recall@radius"] == retrieval_metrics(q, d, yq, yd, radius=1, empty=empty)["recall@radius"]


def test_metric_errors():
    m = RetrievalMAP()
    with pytest.raises(ValueError, match="role"):
        m.update(torch.ones(2, 8), torch.ones(2, 1), torch.arange(2), "train")
    with pytest.raises(ValueError, match="differ in length"):
        m.update(torch.ones(2, 8), torch.ones(3, 1), torch.arange(2), "query")
    m.update(torch.ones(2, 8), torch.ones(2, 1), torch.arange(2), "query")
    with pytest.raises(ValueError, match="no database items"):
        m.compute()
    with pytest.raises(ValueError, match="empty must be"):
        RetrievalMAP(empty="skip")
    with pytest.raises(ValueError, match=r"labels must be 0/1.*row 1, column 0"):  # not truncated to 0 by a cast
        m.update(torch.ones(2, 8), torch.tensor([[1.0], [0.5]]), torch.arange(2), "database")


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        q, d, yq, yd = make_data()
        m = RetrievalMAP(top_k=7, empty="exclude", normalizer="min")
        feed(m, q, d, yq, yd, rank=rank, world=world)
        value = m.compute().item()
        every = m.compute_all()
        if rank == 0:
            torch.save({"value": value, "all": every}, out_file)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    q, d, yq, yd = make_data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: byte-equal results need identical settings
    try:
        single = RetrievalMAP(top_k=7, empty="exclude", normalizer="min")
        feed(single, q, d, yq, yd)
        assert got["value"] == single.compute().item() == mean_average_precision(q, d, yq, yd, 7, "exclude", normalizer="min")
        assert got["all"] == single.compute_all()
    finally:
        torch.set_num_threads(threads)


def test_lightning_validation_logs_functional_map():
    import lightning as L

    from dmmh import DMMHModule, SyntheticMultiLabel

    torch.manual_seed(0)
    dm = SyntheticMultiLabel(num_train=32, num_query=12, num_database=40, image_dim=6, text_dim=5, num_classes=4, eval_batch_size=16, val_split="test")
    model = DMMHModule(image_dim=6, text_dim=5, n_classes=4, n_bits=8, dim=8, fusion="additive")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(model, dm, verbose=False)[0]["val/mAP"]
    s = dm.splits
    codes = [model.encode(torch.from_numpy(s[k].image), torch.from_numpy(s[k].text)) for k in ("query", "database")]
    expected = mean_average_precision(codes[0], codes[1], torch.from_numpy(s["query"].label), torch.from_numpy(s["database"].label))
    assert not math.isnan(expected) and logged == pytest.approx(expected, abs=1e-6)  # logged as float32

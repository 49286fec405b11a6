"""Retrieval metrics against a plain per-query stable-argsort reference written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dmmh.metrics import functional as F

KS = (1, 50, 1000, None)


# --- the independent reference: one query at a time, a plain loop over the ranked list -----------
def reference(qbits, dbits, yq, yd, ks, radius, empty, normalizer):
    n = len(dbits)
    per_query = []
    for i in range(len(qbits)):
        dist = np.array([int(np.sum(qbits[i] != dbits[j])) for j in range(n)])
        rel = np.array([bool(np.any(yq[i].astype(bool) & yd[j].astype(bool))) for j in range(n)])
        ranked = rel[np.argsort(dist, kind="stable")]
        total = int(rel.sum())
        row = {"R": total}
        for k in ks:
            kk = n if k is None else min(k, n)
            hits, s = 0, 0.0
            for rank in range(1, kk + 1):
                if ranked[rank - 1]:
                    hits += 1
                    s += hits / rank
            norm = {"retrieved": hits, "min": min(kk, total), "relevant": total}[normalizer]
            row["ap", k] = s / norm if norm else 0.0
            row["hits", k] = hits
            row["p", k] = hits / kk
            row["r", k] = hits / total if total else 0.0
        for r in range(qbits.shape[1] + 1):
            inside = dist <= r
            found = int(np.sum(inside & rel))
            row["pr_p", r] = found / inside.sum() if inside.sum() else 0.0
            row["pr_r", r] = found / total if total else 0.0
        per_query.append(row)

    def kept(q, key):
        if empty == "zero":
            return True
        if empty == "exclude_top_k" and key[0] == "ap":  # HashNet: `if relevant_num != 0: APx.append(...)`
            return q["hits", key[1]] > 0
        return q["R"] > 0

    def mean(key):
        vals = [q[key] for q in per_query if kept(q, key)]
        return float(np.mean(vals)) if vals else float("nan")

    return mean, radius


def random_case(rng, n_q=None, n_db=None, n_bits=None, n_classes=None, distinct=None, no_relevant=0.2):
    n_q = n_q or int(rng.integers(1, 7))
    n_db = n_db or int(rng.integers(1, 60))
    n_bits = n_bits or int(rng.choice([8, 16, 24, 64, 72, 136]))
    n_classes = n_classes or int(rng.choice([1, 3, 7, 21, 70]))
    distinct = distinct or int(rng.integers(1, 6))  # few distinct codes → heavy ties
    pool = rng.random((distinct, n_bits)) < 0.5
    dbits = pool[rng.integers(0, distinct, n_db)]
    qbits = np.concatenate([pool[rng.integers(0, distinct, n_q)][: n_q // 2], rng.random((n_q - n_q // 2, n_bits)) < 0.5])
    yd = (rng.random((n_db, n_classes)) < 0.3).astype(np.float32)
    yq = (rng.random((n_q, n_classes)) < 0.3).astype(np.float32)
    yq[rng.random(n_q) < no_relevant] = 0  # queries with no relevant item
    return qbits, dbits, yq, yd


def pm1(bits):
    return torch.from_numpy(np.where(bits, 1.0, -1.0))


def check_all(case, backend, empty, normalizer, radius=2, chunk=None):
    qbits, dbits, yq, yd = case
    got = F.retrieval_metrics(pm1(qbits), pm1(dbits), torch.from_numpy(yq), torch.from_numpy(yd), map_ks=KS,
                              precision_ks=KS, radius=radius, empty=empty, normalizer=normalizer, chunk=chunk, backend=backend)
    mean, _ = reference(qbits, dbits, yq, yd, KS, radius, empty, normalizer)
    key = lambda k: "all" if k is None else k  # noqa: E731
    pairs = [(got["mAP"], mean(("ap", None)))]
    for k in KS:
        pairs += [(got["mAP@k"][key(k)], mean(("ap", k))), (got["precision@k"][key(k)], mean(("p", k))),
                  (got["recall@k"][key(k)], mean(("r", k)))]
    for r in range(qbits.shape[1] + 1):
        pairs += [(got["pr_curve"]["precision"][r], mean(("pr_p", r))), (got["pr_curve"]["recall"][r], mean(("pr_r", r)))]
    r = min(radius, qbits.shape[1])
    pairs += [(got["precision@radius"], mean(("pr_p", r))), (got["recall@radius"], mean(("pr_r", r)))]
    for a, b in pairs:
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-12, (a, b)
    assert got["queries_without_relevant"] == int(sum(not np.any(yq[i] @ yd.T) for i in range(len(yq))))
    for k in KS:
        kk, no_hit = len(dbits) if k is None else min(k, len(dbits)), 0
        for i in range(len(qbits)):
            order = np.argsort((qbits[i] != dbits).sum(1), kind="stable")
            no_hit += not np.any((yq[i] @ yd.T > 0)[order][:kk])
        assert got["queries_without_relevant_in_top_k"][key(k)] == no_hit
    return got


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("seed", range(12))
def test_every_metric_matches_reference(seed, backend):
    rng = np.random.default_rng(seed)
    case = random_case(rng)
    for empty in F.EMPTY_POLICIES:
        for normalizer in F.NORMALIZERS:
            check_all(case, backend, empty, normalizer, radius=int(rng.integers(0, 4)), chunk=int(rng.integers(1, 4)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_edge_cases(backend):
    rng = np.random.default_rng(100)
    # a database of one item; one query; one class; all queries without a relevant item
    for shape in [dict(n_db=1), dict(n_q=1, n_db=1), dict(n_classes=1), dict(n_db=2000, n_bits=8, distinct=3)]:
        for empty in F.EMPTY_POLICIES:
            check_all(random_case(rng, **shape), backend, empty, "retrieved")
    qbits, dbits, yq, yd = random_case(rng, n_q=3, n_db=5)
    got = check_all((qbits, dbits, np.zeros_like(yq), yd), backend, "exclude", "min")
    assert math.isnan(got["mAP"]) and got["queries_without_relevant"] == 3
    assert check_all((qbits, dbits, np.zeros_like(yq), yd), backend, "zero", "min")["mAP"] == 0.0


def hashnet_map(qbits, dbits, yq, yd, R):
    """HashNet's mean_average_precision (thuml/HashNet pytorch/src/test.py), loop for loop, with a stable
    ranking by Hamming distance: a query with no relevant item in its top R is not appended to APx."""
    APx = []
    for i in range(len(qbits)):
        idx = np.argsort((qbits[i] != dbits).sum(1), kind="stable")
        imatch = (yd[idx[0:R]] @ yq[i]) > 0
        relevant_num = np.sum(imatch)
        Px = np.cumsum(imatch) / np.arange(1, len(imatch) + 1)
        if relevant_num != 0:
            APx.append(np.sum(Px * imatch) / relevant_num)
    return float(np.mean(APx)) if APx else float("nan")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_exclude_top_k_is_hashnets_convention(backend, rng):
    distinguishing = 0
    for _ in range(20):
        qbits, dbits, yq, yd = random_case(rng, n_q=8, n_db=int(rng.integers(20, 80)), n_classes=int(rng.choice([3, 7])))
        args = (pm1(qbits), pm1(dbits), torch.from_numpy(yq), torch.from_numpy(yd))
        for R in (1, 3, 10, 5000):
            got = F.mean_average_precision(*args, top_k=R, empty="exclude_top_k", backend=backend)
            want = hashnet_map(qbits, dbits, yq, yd, R)
            assert (math.isnan(got) and math.isnan(want)) or abs(got - want) <= 1e-12, (R, got, want)
            excluded = F.mean_average_precision(*args, top_k=R, empty="exclude", backend=backend)
            distinguishing += not (math.isnan(got) and math.isnan(excluded)) and got != excluded
        whole = F.mean_average_precision(*args, empty="exclude_top_k", backend=backend)
        assert whole == F.mean_average_precision(*args, empty="exclude", backend=backend) or math.isnan(whole)
    assert distinguishing  # the cases did include queries with relevant items, none in the top R


def test_tie_order_is_database_index():
    # every item at distance 0; only the last is relevant → AP = 1/N, not 1 (an unstable or reversed tie order differs)
    codes = torch.ones(5, 8)
    labels = torch.tensor([[0.0]] * 4 + [[1.0]])
    assert F.mean_average_precision(codes[:1], codes, labels[-1:], labels) == pytest.approx(1 / 5, abs=1e-15)
    assert F.mean_average_precision(codes[:1], codes.flip(0), labels[-1:], labels.flip(0)) == 1.0


def test_single_metric_functions_agree_with_reference():
    rng = np.random.default_rng(7)
    qbits, dbits, yq, yd = case = random_case(rng, n_q=5, n_db=40, n_bits=16)
    args = (pm1(qbits), pm1(dbits), torch.from_numpy(yq), torch.from_numpy(yd))
    for empty in F.EMPTY_POLICIES:
        for normalizer in F.NORMALIZERS:
            mean, _ = reference(*case, KS, 2, empty, normalizer)
            for k in KS:
                assert F.mean_average_precision(*args, top_k=k, empty=empty, normalizer=normalizer) == pytest.approx(mean(("ap", k)), abs=1e-12)
        mean, _ = reference(*case, (3,), 2, empty, "retrieved")
        assert F.precision_at_k(*args, 3, empty=empty) == pytest.approx(mean(("p", 3)), abs=1e-12)
        assert F.recall_at_k(*args, 3, empty=empty) == pytest.approx(mean(("r", 3)), abs=1e-12)
        assert F.precision_within_radius(*args, radius=5, empty=empty) == pytest.approx(mean(("pr_p", 5)), abs=1e-12)
        p, r = F.precision_recall_curve(*args, empty=empty)
        assert p.shape == r.shape == (17,)
        assert np.allclose(r.numpy(), [mean(("pr_r", i)) for i in range(17)], atol=1e-12, rtol=0)


def test_code_forms_give_the_same_map():
    rng = np.random.default_rng(3)
    qbits, dbits, yq, yd = random_case(rng, n_q=6, n_db=50, n_bits=24, distinct=50)
    labels = torch.from_numpy(yq), torch.from_numpy(yd)
    relaxed = lambda b: torch.from_numpy(np.where(b, 1, -1) * rng.uniform(0.01, 1, b.shape))  # noqa: E731
    packed = lambda b: torch.from_numpy(np.packbits(b, axis=1, bitorder="little"))  # noqa: E731
    forms = [(pm1(qbits), pm1(dbits)), (relaxed(qbits), relaxed(dbits)), (packed(qbits), packed(dbits)),
             (torch.from_numpy(qbits), torch.from_numpy(dbits)), (packed(qbits), pm1(dbits))]
    values = {F.mean_average_precision(q, d, *labels) for q, d in forms}
    assert len(values) == 1
    mean, _ = reference(qbits, dbits, yq, yd, (None,), 2, "zero", "retrieved")
    assert values.pop() == pytest.approx(mean(("ap", None)), abs=1e-12)


def test_relaxed_zero_counts_as_bit_one():
    q = torch.tensor([[0.0, -0.5]])
    assert F.hamming_distance(q, torch.tensor([[1.0, -1.0], [-1.0, 1.0]])).tolist() == [[0, 2]]


def test_hamming_distance_matches_plain_count():
    rng = np.random.default_rng(5)
    q, d = rng.standard_normal((4, 70)), rng.standard_normal((9, 70))
    plain = [[int(np.sum((a >= 0) != (b >= 0))) for b in d] for a in q]
    got = F.hamming_distance(torch.from_numpy(q), torch.from_numpy(d))
    assert got.dtype == torch.int64 and got.tolist() == plain


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(yd=np.zeros((10, 4), np.float32)), "label widths differ"),
        (dict(d=np.ones((10, 16))), "code lengths differ"),
        (dict(yq=np.full((3, 3), 2.0, np.float32)), "row 0, column 0"),
        (dict(q=np.ones((0, 8)), yq=np.zeros((0, 3), np.float32)), "query set is empty"),
        (dict(d=np.ones((0, 8)), yd=np.zeros((0, 3), np.float32)), "database is empty"),
        (dict(yq=np.zeros((2, 3), np.float32)), "3 codes but 2 label rows"),
        (dict(q=np.eye(3, 8)), "all 0/1"),
        (dict(q=np.full((3, 8), np.nan)), "NaN"),
        (dict(q=np.ones(8)), "expected a matrix"),
    ],
)
def test_bad_input_errors(change, message):
    base = dict(q=np.ones((3, 8)), d=-np.ones((10, 8)), yq=np.ones((3, 3), np.float32), yd=np.ones((10, 3), np.float32))
    base.update(change)
    with pytest.raises(ValueError, match=message):
        F.mean_average_precision(*(torch.from_numpy(base[k]) for k in ("q", "d", "yq", "yd")))


@pytest.mark.parametrize("kwargs, message", [(dict(empty="skip"), "empty must be"), (dict(normalizer="k"), "normalizer must be"),
                                             (dict(top_k=0), "positive integer"), (dict(backend="jax"), "backend must be")])
def test_bad_options(kwargs, message):
    x, y = torch.ones(2, 8), torch.ones(2, 1)
    with pytest.raises(ValueError, match=message):
        F.mean_average_precision(x, x, y, y, **kwargs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_torch_backend_matches_cpu():
    rng = np.random.default_rng(11)
    qbits, dbits, yq, yd = random_case(rng, n_q=50, n_db=3000, n_bits=64, distinct=40)
    cpu = [pm1(qbits), pm1(dbits), torch.from_numpy(yq), torch.from_numpy(yd)]
    for empty in F.EMPTY_POLICIES:
        a = F.retrieval_metrics(*cpu, empty=empty)
        b = F.retrieval_metrics(*(x.cuda() for x in cpu), empty=empty, chunk=7)
        assert a.keys() == b.keys()
        for key in ("mAP", "precision@radius", "recall@radius"):
            assert abs(a[key] - b[key]) <= 1e-12 or (math.isnan(a[key]) and math.isnan(b[key]))
        for key in ("mAP@k", "precision@k", "recall@k"):
            assert all(abs(a[key][k] - b[key][k]) <= 1e-12 for k in a[key])

"""Retrieval metrics of Hamming ranking, exact as in the literature (DESIGN.md §3).

Codes: ±1, relaxed (bit = ``x >= 0``), ``bool`` bits, or packed ``uint8`` ``(N, K/8)`` LSB-first
(every ``uint8`` input is read as packed). Other integer codes, floats holding only 0/1 and NaN are
refused (dmmh's one rule for codes, :func:`dmmh._checks.check_codes`); to map NaN to bit 0, pack
with ``pack_bits(codes, nan="zero")`` and pass the packed codes. Labels: multi-hot {0, 1}; an item is relevant to a query
when they share at least one label. Ranking: ascending Hamming distance, ties broken by database
index (a stable sort), as the MATLAB code behind the published tables does.

Options, named identically in every function:

* ``empty`` — what a query with no relevant item in the database counts as: ``"zero"`` (default;
  AP, recall, precision all 0, kept in the mean, as DeepHash-pytorch's ``CalcTopMap`` does),
  ``"exclude"`` (left out of every mean, as the MATLAB code; ``nan`` if every query is left out), or
  ``"exclude_top_k"``: mAP@k leaves out each query with no relevant item in its top k (HashNet's
  ``mean_average_precision`` and thulab DeepHash's ``get_mAPs``); every other metric, and mAP@all,
  reads it as ``"exclude"``.
* ``normalizer`` — the denominator of AP@k: ``"retrieved"`` (default; relevant items found in the
  top k, DeepHash's ``CalcTopMap``, torchmetrics' AP@k), ``"min"`` (``min(k, R)``) or
  ``"relevant"`` (all ``R`` relevant items). They coincide for k >= database size.
* ``k`` larger than the database is clamped to its size; ``None`` means the whole database.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dmmh._checks import check_codes, check_labels
from dmmh.hashing.packing import unpack_bits_ref
from dmmh.metrics._ranking import RankingStats, distances, ranking_stats

__all__ = [
    "hamming_distance",
    "mean_average_precision",
    "precision_at_k",
    "recall_at_k",
    "precision_recall_curve",
    "precision_within_radius",
    "retrieval_metrics",
    "as_bits",
    "EMPTY_POLICIES",
    "NORMALIZERS",
]

EMPTY_POLICIES = ("zero", "exclude", "exclude_top_k")
NORMALIZERS = ("retrieved", "min", "relevant")


def as_bits(codes, what: str = "codes", nan: str = "error") -> Tensor:
    """Codes in any accepted form → bool bits ``(N, K)`` (packed ``uint8`` is unpacked LSB-first).

    Unpacked codes follow dmmh's one rule (:func:`dmmh._checks.check_codes`): floats (±1 or relaxed)
    or bool; integer codes, 0/1 floats and NaN (unless ``nan="zero"``: bit 0) are refused.
    """
    x = torch.as_tensor(codes)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a matrix (items, bits), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return unpack_bits_ref(x) > 0
    check_codes(x, what, nan, packed_ok=True)
    return x if x.dtype == torch.bool else x >= 0


def _code_pair(query_codes, database_codes) -> tuple[Tensor, Tensor]:
    """Both code sets as bool bits, checked to have the same length."""
    q, d = as_bits(query_codes, "query codes"), as_bits(database_codes, "database codes")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"code lengths differ: query {q.shape[1]} bits, database {d.shape[1]} bits")
    return q, d


def _prepare(query_codes, database_codes, query_labels, database_labels):
    q, d = _code_pair(query_codes, database_codes)
    yq, yd = torch.as_tensor(query_labels), torch.as_tensor(database_labels)
    if len(q) == 0:
        raise ValueError("the query set is empty: need at least one query")
    if len(d) == 0:
        raise ValueError("the database is empty: need at least one database item")
    check_labels(yq, "query labels")
    check_labels(yd, "database labels")
    if yq.shape[1] != yd.shape[1]:
        raise ValueError(f"label widths differ: query {yq.shape[1]} classes, database {yd.shape[1]} classes")
    for what, codes, labels in (("query", q, yq), ("database", d, yd)):
        if len(codes) != len(labels):
            raise ValueError(f"{what}: {len(codes)} codes but {len(labels)} label rows")
    return q, d, yq, yd


def _check_options(empty: str, normalizer: str) -> None:
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    if normalizer not in NORMALIZERS:
        raise ValueError(f"normalizer must be one of {NORMALIZERS}, got {normalizer!r}")


def _k(k, n: int) -> int:
    if k is None:
        return n
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer or None (whole database), got {k!r}")
    return min(int(k), n)


def _safe_div(a: Tensor, b: Tensor) -> Tensor:
    """``a / b`` in float64, 0 where ``b == 0``."""
    a, b = a.double(), b.double()
    return torch.where(b > 0, a / b.clamp(min=1e-300), torch.zeros_like(a))


def _mean(values: Tensor, relevant: Tensor, empty: str) -> float:
    """Mean over queries; a query whose ``relevant`` count is 0 counts as 0 or is left out (``empty``)."""
    has = relevant > 0
    if empty == "zero":
        return float(torch.where(has, values, torch.zeros_like(values)).mean())
    return float(values[has].mean()) if bool(has.any()) else float("nan")


def _stats(query_codes, database_codes, query_labels, database_labels, ks=(), ap_ks=(), radii=False, chunk=None, backend=None):
    q, d, yq, yd = _prepare(query_codes, database_codes, query_labels, database_labels)
    n = len(d)
    hit_ks = sorted({_k(k, n) for k in ks} | {_k(k, n) for k in ap_ks})
    ap = sorted({_k(k, n) for k in ap_ks} - {n})
    return ranking_stats(q, d, yq, yd, tuple(hit_ks), tuple(ap), radii, chunk, backend)


def _ap_at(s: RankingStats, k: int, normalizer: str) -> Tensor:
    if k >= s.n_database:
        return _safe_div(s.ap_sum, s.relevant)
    denominator = {"retrieved": s.hits[k], "min": s.relevant.clamp(max=k), "relevant": s.relevant}[normalizer]
    return _safe_div(s.ap_sum_at[k], denominator)


def _map_at(s: RankingStats, k: int, normalizer: str, empty: str) -> float:
    """mAP@k; under ``"exclude_top_k"`` a query counts as empty when its top k holds no relevant item."""
    if empty == "exclude_top_k":
        return _mean(_ap_at(s, k, normalizer), s.hits[k], "exclude")
    return _mean(_ap_at(s, k, normalizer), s.relevant, empty)


def hamming_distance(query: Tensor, database: Tensor) -> Tensor:
    """Integer Hamming distances ``(Q, N)`` (int64) between two code matrices of any accepted form."""
    q, d = _code_pair(query, database)
    return distances(q, d.to(q.device)).to(torch.int64)


def mean_average_precision(
    query_codes: Tensor,
    database_codes: Tensor,
    query_labels: Tensor,
    database_labels: Tensor,
    top_k: int | None = None,
    empty: str = "zero",
    chunk: int | None = None,
    normalizer: str = "retrieved",
    backend: str | None = None,
) -> float:
    """mAP@``top_k`` of Hamming ranking (mAP@all when ``None``).

    ``chunk`` (queries per pass) and ``backend`` (``"numpy"``/``"torch"``) tune the computation only.
    """
    _check_options(empty, normalizer)
    s = _stats(query_codes, database_codes, query_labels, database_labels, ap_ks=(top_k,), chunk=chunk, backend=backend)
    return _map_at(s, _k(top_k, s.n_database), normalizer, empty)


def precision_at_k(query_codes, database_codes, query_labels, database_labels, k: int, empty: str = "zero", chunk: int | None = None, backend: str | None = None) -> float:
    """Mean fraction of relevant items among the top ``k`` (k clamped to the database size)."""
    _check_options(empty, "retrieved")
    s = _stats(query_codes, database_codes, query_labels, database_labels, ks=(k,), chunk=chunk, backend=backend)
    kk = _k(k, s.n_database)
    return _mean(s.hits[kk].double() / kk, s.relevant, empty)


def recall_at_k(query_codes, database_codes, query_labels, database_labels, k: int, empty: str = "zero", chunk: int | None = None, backend: str | None = None) -> float:
    """Mean fraction of each query's relevant items found in the top ``k``."""
    _check_options(empty, "retrieved")
    s = _stats(query_codes, database_codes, query_labels, database_labels, ks=(k,), chunk=chunk, backend=backend)
    return _mean(_safe_div(s.hits[_k(k, s.n_database)], s.relevant), s.relevant, empty)


def _radius_curves(s: RankingStats, empty: str) -> tuple[Tensor, Tensor]:
    precision = _safe_div(s.rel_within, s.within)
    recall = _safe_div(s.rel_within, s.relevant[:, None].expand_as(s.rel_within))
    mean = lambda v: torch.tensor([_mean(v[:, r], s.relevant, empty) for r in range(v.shape[1])], dtype=torch.float64)  # noqa: E731
    return mean(precision), mean(recall)


def precision_recall_curve(query_codes, database_codes, query_labels, database_labels, empty: str = "zero", chunk: int | None = None, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """Mean precision and recall of retrieving every item within Hamming radius r, for r = 0..K.

    Returns two float64 tensors of length ``K + 1`` indexed by radius. A query that retrieves
    nothing at radius r has precision 0 there (the convention of "precision within radius 2").
    """
    _check_options(empty, "retrieved")
    s = _stats(query_codes, database_codes, query_labels, database_labels, radii=True, chunk=chunk, backend=backend)
    return _radius_curves(s, empty)


def precision_within_radius(query_codes, database_codes, query_labels, database_labels, radius: int = 2, empty: str = "zero", chunk: int | None = None, backend: str | None = None) -> float:
    """Mean precision of the items within Hamming distance ``radius`` (0 for a query retrieving none)."""
    precision, _ = precision_recall_curve(query_codes, database_codes, query_labels, database_labels, empty, chunk, backend)
    return float(precision[_radius(radius, len(precision) - 1)])


def _radius(radius: int, n_bits: int) -> int:
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise ValueError(f"radius must be a non-negative integer, got {radius!r}")
    return min(int(radius), n_bits)


def retrieval_metrics(
    query_codes,
    database_codes,
    query_labels,
    database_labels,
    map_ks=(None, 1000, 50),
    precision_ks=(1, 10, 50, 100, 500, 1000),
    radius: int = 2,
    empty: str = "zero",
    normalizer: str = "retrieved",
    chunk: int | None = None,
    backend: str | None = None,
) -> dict:
    """Every metric from one ranking pass, as a JSON-ready dict.

    Keys: ``mAP`` (mAP@all), ``mAP@k``, ``precision@k``, ``recall@k`` (dicts keyed by k, ``"all"``
    for None), ``precision@radius`` / ``recall@radius`` at ``radius``, ``pr_curve`` (radius,
    precision, recall lists), the set sizes, ``queries_without_relevant`` and the options used.
    """
    _check_options(empty, normalizer)
    s = _stats(query_codes, database_codes, query_labels, database_labels, ks=precision_ks, ap_ks=map_ks, radii=True, chunk=chunk, backend=backend)
    n = s.n_database
    key = lambda k: "all" if k is None else int(k)  # noqa: E731
    precision, recall = _radius_curves(s, empty)
    r = _radius(radius, s.n_bits)
    return {
        "mAP": _mean(_safe_div(s.ap_sum, s.relevant), s.relevant, empty),
        "mAP@k": {key(k): _map_at(s, _k(k, n), normalizer, empty) for k in map_ks},
        "precision@k": {key(k): _mean(s.hits[_k(k, n)].double() / _k(k, n), s.relevant, empty) for k in precision_ks},
        "recall@k": {key(k): _mean(_safe_div(s.hits[_k(k, n)], s.relevant), s.relevant, empty) for k in precision_ks},
        "radius": r,
        "precision@radius": float(precision[r]),
        "recall@radius": float(recall[r]),
        "pr_curve": {"radius": list(range(s.n_bits + 1)), "precision": precision.tolist(), "recall": recall.tolist()},
        "n_queries": int(len(s.relevant)),
        "n_database": n,
        "n_bits": s.n_bits,
        "queries_without_relevant": int((s.relevant == 0).sum()),
        "queries_without_relevant_in_top_k": {key(k): int((s.hits[_k(k, n)] == 0).sum()) for k in map_ks},
        "empty": empty,
        "normalizer": normalizer,
    }

"""Invariants of packing, Hamming search, the metrics and the index file, on inputs drawn by hypothesis.

Every property runs a few dozen examples in the default run and 1,000 under ``-m slow``
(``pytest -m slow tests/test_properties.py``). The references are written here: numpy's packbits,
bit-by-bit distance counts, a sort by (distance, index), HashingIndex files re-saved byte for byte.
"""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dmmh._optional import available
from dmmh.hashing import HammingIndex, IndexFileError, MultiIndex, hamming_distance_packed, hamming_knn, multi_index, pack_bits, unpack_bits
from dmmh.hashing.index import _HEADER, MAGIC
from dmmh.hashing.packing import pack_bits_ref
from dmmh.metrics import functional as F

PROFILES = ["fast", pytest.param("slow", marks=pytest.mark.slow)]
EXAMPLES = {"fast": 30, "slow": 1000}
SEARCH_BACKENDS = ["numpy", "torch"] + (["faiss"] if available("faiss") else [])


def check(profile: str, strategy, prop) -> None:
    """Run ``prop`` on examples of ``strategy``: a few in the default run, 1,000 under ``-m slow``."""
    run = settings(max_examples=EXAMPLES[profile], deadline=None, database=None, derandomize=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(prop))
    run()


def bits_of(packed: np.ndarray) -> np.ndarray:
    return np.unpackbits(packed, axis=1, bitorder="little").astype(bool)


def plain_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit-by-bit count, no popcount tricks."""
    return (bits_of(a)[:, None, :] != bits_of(b)[None, :, :]).sum(-1)


# ---------------------------------------------------------------- strategies

float_codes = st.tuples(st.integers(0, 12), st.integers(1, 12)).flatmap(
    lambda s: hnp.arrays(np.float32, (s[0], 8 * s[1]), elements=st.floats(width=32, allow_nan=False))
    | hnp.arrays(np.float32, (s[0], 8 * s[1]), elements=st.sampled_from([-1.0, 1.0, 0.0, -0.0]))
    | hnp.arrays(np.float32, (s[0], 8 * s[1]), elements=st.sampled_from([0.0, 1.0]))  # bits stored as floats
)


def packed_sets(count: int, max_items: int = 25, few_values: bool = True):
    """``count`` packed code sets of one code length; bytes often from a few values, so distances tie."""
    def sets(n_bytes: int):
        byte = st.sampled_from([0, 1, 3, 255]) if few_values else st.integers(0, 255)
        one = st.integers(0, max_items).flatmap(lambda n: hnp.arrays(np.uint8, (n, n_bytes), elements=st.one_of(byte, st.integers(0, 255))))
        return st.tuples(*[one] * count)
    return st.integers(1, 9).flatmap(sets)


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("profile", PROFILES)
def test_pack_matches_numpy_and_round_trips(profile):
    def prop(x):
        mixed01 = x.size and np.isin(x, (0.0, 1.0)).all() and (x == 0).any() and (x == 1).any()
        t = torch.from_numpy(x)
        for pack in (pack_bits, lambda c: pack_bits(c, "torch"), pack_bits_ref):
            if mixed01:  # bits stored as floats: refused, never packed as all ones
                with pytest.raises(ValueError, match="all 0/1"):
                    pack(t)
                continue
            got = pack(t)
            np.testing.assert_array_equal(got.numpy(), np.packbits(x >= 0, axis=1, bitorder="little"))
            np.testing.assert_array_equal(unpack_bits(got).numpy(), np.where(x >= 0, 1.0, -1.0))
        bits = torch.from_numpy(x >= 0)
        np.testing.assert_array_equal(pack_bits(bits).numpy(), np.packbits(x >= 0, axis=1, bitorder="little"))
        raw = np.packbits(x < 0, axis=1, bitorder="little")
        assert torch.equal(pack_bits(unpack_bits(torch.from_numpy(raw))), torch.from_numpy(raw))

    check(profile, float_codes, prop)


# ---------------------------------------------------------------- distances


@pytest.mark.parametrize("profile", PROFILES)
def test_hamming_distance_is_a_metric(profile):
    def prop(sets):
        a, b, c = sets
        ref_ab = plain_distances(a, b)
        for backend in SEARCH_BACKENDS:
            ab, ba = (hamming_distance_packed(x, y, backend=backend).numpy() for x, y in ((a, b), (b, a)))
            bc, ac = (hamming_distance_packed(x, y, backend=backend).numpy() for x, y in ((b, c), (a, c)))
            np.testing.assert_array_equal(ab, ref_ab)
            np.testing.assert_array_equal(ab, ba.T)  # symmetry
            assert (ac[:, None, :] <= ab[:, :, None] + bc[None, :, :]).all()  # triangle inequality, every triple
            assert (np.diagonal(hamming_distance_packed(a, a, backend=backend).numpy()) == 0).all()
        np.testing.assert_array_equal(F.hamming_distance(torch.from_numpy(a), torch.from_numpy(b)).numpy(), ref_ab)

    check(profile, packed_sets(3), prop)


# ---------------------------------------------------------------- k-NN


def brute_force_knn(q: np.ndarray, db: np.ndarray, k: int):
    d = plain_distances(q, db)
    rows = [sorted(range(len(db)), key=lambda j: (d[i, j], j))[:k] for i in range(len(q))]
    idx = np.array(rows, dtype=np.int64).reshape(len(q), min(k, len(db)))
    return np.take_along_axis(d, idx, 1), idx


@pytest.mark.parametrize("profile", PROFILES)
def test_knn_is_the_sort_by_distance_then_index(profile):
    """Every scan backend, the index (auto, numpy, mih) and the multi-index enumeration alone."""
    def prop(case):
        (q, db), k, random = case
        want_d, want_i = brute_force_knn(q, db, k)
        for backend in SEARCH_BACKENDS:
            d, i = hamming_knn(q, db, k, backend=backend)
            np.testing.assert_array_equal(i.numpy(), want_i, err_msg=backend)
            np.testing.assert_array_equal(d.numpy(), want_d, err_msg=backend)
        ids = np.arange(len(db), dtype=np.int64) * 7 - 3  # arbitrary ids, mapped through
        for backend in ("auto", "numpy", "mih"):
            index = HammingIndex(q.shape[1] * 8, backend=backend).add(db, ids)
            d, i = index.search(q, k)
            np.testing.assert_array_equal(i.numpy(), ids[want_i], err_msg=backend)
            np.testing.assert_array_equal(d.numpy(), want_d, err_msg=backend)
        if len(db):  # multi-index hashing by enumeration alone (no scan fallback), any substring count
            m = random.randint(-(-q.shape[1] * 8 // 12), q.shape[1] * 8)
            d, i = MultiIndex(db, m=m).knn(q, k)
            np.testing.assert_array_equal(i.numpy(), want_i, err_msg=f"m={m}")
            np.testing.assert_array_equal(d.numpy(), want_d, err_msg=f"m={m}")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(multi_index, "PROBE_COST", 0.0)
        patch.setattr(multi_index, "CANDIDATE_COST", 0.0)
        check(profile, st.tuples(packed_sets(2), st.integers(1, 30), st.randoms(use_true_random=False)), prop)


# ---------------------------------------------------------------- mAP


def metric_cases():
    def build(shape):
        n_q, n_db, n_bits, n_classes, distinct = shape
        pool = hnp.arrays(bool, (distinct, n_bits))
        pick = lambda n: hnp.arrays(np.int64, n, elements=st.integers(0, distinct - 1))  # noqa: E731
        labels = lambda n: hnp.arrays(np.float32, (n, n_classes), elements=st.sampled_from([0.0, 1.0]))  # noqa: E731
        return st.tuples(pool, pick(n_q), pick(n_db), labels(n_q), labels(n_db), st.randoms(use_true_random=False))
    return st.tuples(st.integers(1, 4), st.integers(1, 25), st.sampled_from([8, 16]), st.integers(1, 4), st.integers(1, 5)).flatmap(build)


def tie_preserving_permutation(qbits, dbits, random) -> np.ndarray:
    """A random order of the database that keeps every pair of items tied for some query in its original
    relative order: a random linear extension of 'j before l' for tied pairs j < l."""
    d = (qbits[:, None, :] != dbits[None, :, :]).sum(-1)
    tied = (d[:, :, None] == d[:, None, :]).any(0)
    remaining, order = list(range(len(dbits))), []
    while remaining:
        free = [j for j in remaining if not any(tied[l, j] for l in remaining if l < j)]
        pick = random.choice(free)
        order.append(pick)
        remaining.remove(pick)
    return np.array(order, dtype=np.int64)


@pytest.mark.parametrize("profile", PROFILES)
def test_map_is_bounded_and_depends_on_the_database_only_through_tie_order(profile):
    """mAP lies in [0, 1]. Ties are broken by database index, so reordering the database may change mAP,
    but (1) not when every pair tied for some query keeps its relative order, and (2) for any order, each
    query's AP lies between its values with relevant items last and first within ties."""

    def prop(case):
        pool, qi, di, yq, yd, random = case
        qbits, dbits = pool[qi], pool[di]
        t = lambda b: torch.from_numpy(np.where(b, 1.0, -1.0))  # noqa: E731
        k = random.randint(1, len(dbits) + 2)
        options = dict(empty=random.choice(F.EMPTY_POLICIES), normalizer=random.choice(F.NORMALIZERS))
        base = [F.mean_average_precision(t(qbits), t(dbits), torch.from_numpy(yq), torch.from_numpy(yd), top_k=top, **options)
                for top in (None, k)]
        for value in base:
            assert np.isnan(value) or 0.0 <= value <= 1.0
        perm = tie_preserving_permutation(qbits, dbits, random)
        moved = [F.mean_average_precision(t(qbits), t(dbits[perm]), torch.from_numpy(yq), torch.from_numpy(yd[perm]), top_k=top, **options)
                 for top in (None, k)]
        for a, b in zip(base, moved):
            assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-12, (a, b)
        shuffle = np.array(random.sample(range(len(dbits)), len(dbits)), dtype=np.int64)
        for i in range(len(qbits)):
            rel = (yd @ yq[i]) > 0
            one = lambda order: F.mean_average_precision(  # noqa: E731
                t(qbits[i : i + 1]), t(dbits[order]), torch.from_numpy(yq[i : i + 1]), torch.from_numpy(yd[order]))
            best, worst = one(np.argsort(~rel, kind="stable")), one(np.argsort(rel, kind="stable"))
            assert worst - 1e-12 <= one(shuffle) <= best + 1e-12

    check(profile, metric_cases(), prop)


# ---------------------------------------------------------------- index files


index_cases = st.tuples(st.integers(1, 32), st.integers(0, 40)).flatmap(
    lambda s: st.tuples(hnp.arrays(np.uint8, (s[1], s[0])), hnp.arrays(np.int64, s[1], elements=st.integers(-(2**63), 2**63 - 1)))
)


@pytest.mark.parametrize("profile", PROFILES)
def test_index_save_load_round_trip(profile, tmp_path):
    def prop(case):
        codes, ids = case
        index = HammingIndex(codes.shape[1] * 8).add(codes, ids)
        path = index.save(tmp_path / "index.dmmh")
        loaded = HammingIndex.load(path)
        assert loaded.n_bits == index.n_bits and len(loaded) == len(codes)
        np.testing.assert_array_equal(loaded.codes.numpy(), codes)
        np.testing.assert_array_equal(loaded.ids.numpy(), ids)
        assert loaded.save(tmp_path / "again.dmmh").read_bytes() == path.read_bytes()

    check(profile, index_cases, prop)


def _with_digest(data: bytes) -> bytes:
    """Recompute the trailing sha256 so that an edit reaches the checks behind the checksum."""
    if len(data) < len(MAGIC) + 32:
        return data
    return data[:-32] + hashlib.sha256(data[len(MAGIC) : -32]).digest()


mutations = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8)),
    st.tuples(st.just("header"), st.tuples(st.integers(0, 3), st.one_of(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 300)), st.booleans())),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("foreign"), st.binary(max_size=128)),
)


def mutate(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "flip":
        out = bytearray(data)
        for where, bit in arg:
            out[int(where * len(out))] ^= 1 << bit
        return bytes(out)
    if kind == "header":
        field, value, redigest = arg
        fields = list(_HEADER.unpack_from(data, len(MAGIC)))
        fmt = "<IIQQ"[1 + field]
        fields[field] = value % (2**32 if fmt == "I" else 2**64)
        out = data[: len(MAGIC)] + _HEADER.pack(*fields) + data[len(MAGIC) + _HEADER.size :]
        return _with_digest(out) if redigest else out
    if kind == "append":
        return data + arg
    return arg


@pytest.mark.parametrize("profile", PROFILES)
def test_index_load_fuzz(profile, tmp_path):
    """Damaged files give an IndexFileError or a faithful result (re-saving gives the same bytes), never
    another exception, and never allocate more than the file's size."""

    def prop(case):
        (codes, ids), mutation = case
        data = HammingIndex(codes.shape[1] * 8).add(codes, ids).save(tmp_path / "good.dmmh").read_bytes()
        bad = mutate(data, mutation)
        path = tmp_path / "bad.dmmh"
        path.write_bytes(bad)
        tracemalloc.start()
        try:
            loaded = HammingIndex.load(path)
        except IndexFileError as e:
            assert str(path) in str(e)
            loaded = None
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak <= len(bad) + (1 << 16), (peak, len(bad))
        if loaded is not None:
            assert loaded.save(tmp_path / "resaved.dmmh").read_bytes() == bad

    check(profile, st.tuples(index_cases, mutations), prop)

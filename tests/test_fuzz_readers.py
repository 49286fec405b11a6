"""Byte-level fuzz of the feature-file readers: small valid files of every format, randomly
truncated, bit-flipped or with header bytes overwritten, must give either a ``ValueError`` naming
the file or exactly what an independent reader (h5py, scipy, numpy, safetensors) finds in the
damaged file; never another exception type, never an allocation beyond a small bound.

A few examples per format run by default; ``pytest -m slow`` runs 1,000 per format.
"""

from __future__ import annotations

import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from _benchmark_files import WRITERS, make_arrays, write
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmmh.data.readers import ALL_KEYS, read_feature_file, validate_feature_file

FORMATS = ["mat73", "mat73_gzip", "mat5", "mat5_zlib", "npz", "npy", "safetensors"]
ALLOCATION_BOUND = 32 << 20  # bytes: the valid files hold a few KB
HEADER_BYTES = 2048  # "header edits" land in the first (or last, for zip's directory) bytes
SPECIAL = [b"\xff" * 8, b"\x7f\xff\xff\xff", b"\x00" * 8, b"\x01\x00\x00\x00\x00\x01\x00\x00", b"{", b'"', b"9" * 8]

MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("header"), st.floats(0, 1, exclude_max=True), st.booleans(),
              st.one_of(st.sampled_from(SPECIAL), st.binary(min_size=1, max_size=8))),
)


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """One small valid file (or .npy folder) per format, with its arrays."""
    root = tmp_path_factory.mktemp("fuzz")
    arrays = make_arrays(np.random.default_rng(7), classes=6, sizes=(6, 3, 8), image_dim=5, text_dim=4)
    out = {}
    for fmt in FORMATS:
        (root / fmt).mkdir()
        out[fmt] = write(fmt, root / fmt, arrays)
    return out


def _mutate(raw: bytes, mutation) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return raw[: int(mutation[1] * len(raw))]
    b = bytearray(raw)
    if kind == "flip":
        for where, bit in mutation[1]:
            b[int(where * len(b))] ^= 1 << bit
        return bytes(b)
    _, where, at_end, patch = mutation
    span = min(HEADER_BYTES, len(b))
    start = int(where * span) + (len(b) - span if at_end else 0)
    b[start : start + len(patch)] = patch[: len(b) - start]
    return bytes(b)


def _reference(fmt: str, path: Path) -> dict[str, np.ndarray]:
    """The nine arrays as an independent reader finds them."""
    if fmt.startswith("mat73"):
        import h5py

        with h5py.File(path, "r") as f:
            return {k: np.asarray(f[k][()]).T for k in ALL_KEYS}
    if fmt.startswith("mat5"):
        import scipy.io

        return scipy.io.loadmat(str(path), variable_names=list(ALL_KEYS), mat_dtype=True)  # as MATLAB loads them
    if fmt == "npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ALL_KEYS}
    if fmt == "npy":
        return {k: np.load(path / f"{k}.npy", allow_pickle=False) for k in ALL_KEYS}
    from safetensors.numpy import load_file

    return load_file(str(path))


def _check(fmt: str, original: Path, mutation, npy_key: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dmmh-fuzz-"))
    try:
        if original.is_dir():  # an .npy folder: damage one of its files
            path = work / original.name
            shutil.copytree(original, path)
            target = path / f"{ALL_KEYS[npy_key]}.npy"
        else:
            path = target = work / original.name
            shutil.copyfile(original, path)
        target.write_bytes(_mutate(target.read_bytes(), mutation))
        tracemalloc.start()
        try:
            ff = read_feature_file(path)
            validate_feature_file(ff)
            got = {k: np.asarray(ff.arrays[k]) for k in ALL_KEYS}
        except ValueError as exc:
            assert str(path) in str(exc), str(exc)
            return
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert peak < ALLOCATION_BOUND, (peak, mutation)
        want = _reference(fmt, path)  # read without error: it must be what the damaged file holds
        for k in ALL_KEYS:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fuzz(max_examples: int):
    @pytest.mark.parametrize("fmt", FORMATS)
    @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(mutation=MUTATIONS, npy_key=st.integers(0, len(ALL_KEYS) - 1))
    def test(originals, fmt, mutation, npy_key):
        _check(fmt, originals[fmt], mutation, npy_key)

    return test


test_damaged_files_give_a_clear_error_or_what_the_file_holds = _fuzz(max_examples=12)
test_damaged_files_many = pytest.mark.slow(_fuzz(max_examples=1000))


def test_the_fuzz_covers_every_format_the_readers_know():
    assert {WRITERS[f][2] for f in FORMATS} == {"mat-v7.3", "mat-v5", "npz", "npy", "safetensors"}

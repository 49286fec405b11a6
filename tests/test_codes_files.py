"""Codes files for ``dmmh report --codes`` (:func:`dmmh.metrics.report.load_codes`): every format
round-trips; damaged, mistyped or misshapen files are errors naming the file and key, found
before the data is read; a missing safetensors package names the dmmh extra."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from _benchmark_files import npy_header

from dmmh._arrayfiles import FileFormatError
from dmmh.metrics.report import CODE_KEYS, load_codes


def _codes(rng, n_q=6, n_db=30, bits=16, classes=5) -> dict[str, np.ndarray]:
    return {
        "query_codes": rng.standard_normal((n_q, bits)).astype(np.float32),
        "database_codes": np.packbits(rng.random((n_db, bits)) < 0.5, axis=1, bitorder="little"),
        "query_labels": (rng.random((n_q, classes)) < 0.4).astype(np.float32),
        "database_labels": (rng.random((n_db, classes)) < 0.4).astype(np.uint8),
    }


def _save(suffix: str, path, data: dict) -> None:
    if suffix == ".npz":
        np.savez(path, **data)
    elif suffix == ".pt":
        torch.save({k: torch.as_tensor(v) for k, v in data.items()}, path)
    else:
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in data.items()}, str(path))


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_every_codes_format_round_trips(tmp_path, rng, suffix):
    data = _codes(rng)
    _save(suffix, tmp_path / f"c{suffix}", {**data, "extra": np.zeros(3)})
    loaded = load_codes(tmp_path / f"c{suffix}")
    assert list(loaded) == list(CODE_KEYS)
    for k in CODE_KEYS:
        assert isinstance(loaded[k], torch.Tensor)
        np.testing.assert_array_equal(loaded[k].numpy(), data[k], err_msg=k)


def _bad(case: str, data: dict) -> tuple[dict, str]:
    d = dict(data)
    if case == "string_labels":
        d["query_labels"] = np.array([["cat", "dog"]] * len(d["query_codes"]))
        return d, r"key 'query_labels' has dtype <U3; expected numbers"
    if case == "one_dim":
        d["database_codes"] = d["database_codes"][:, 0]
        return d, r"key 'database_codes' has shape \(30,\); expected 2-D"
    if case == "rows":
        d["query_labels"] = d["query_labels"][:-1]
        return d, r"key 'query_codes' has 6 rows but 'query_labels' has 5"
    if case == "classes":
        d["database_labels"] = d["database_labels"][:, :4]
        return d, r"key 'query_labels' has 5 classes but 'database_labels' has 4"
    if case == "missing":
        del d["database_labels"]
        return d, r"missing key\(s\) \['database_labels'\]"
    raise AssertionError(case)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
@pytest.mark.parametrize("case", ["string_labels", "one_dim", "rows", "classes", "missing"])
def test_bad_codes_files_name_the_file_and_key(tmp_path, rng, suffix, case):
    if case == "string_labels" and suffix != ".npz":
        pytest.skip("only .npz stores text arrays")
    data, needle = _bad(case, _codes(rng))
    path = tmp_path / f"c{suffix}"
    _save(suffix, path, data)
    with pytest.raises(FileFormatError, match=re.escape(str(path)) + ": " + needle):
        load_codes(path)


@pytest.mark.parametrize("suffix", [".npz", ".pt", ".safetensors"])
def test_truncated_codes_files_are_errors_naming_the_file(tmp_path, rng, suffix):
    full = tmp_path / f"full{suffix}"
    _save(suffix, full, _codes(rng))
    raw = full.read_bytes()
    for n in sorted({0, 7, 100, len(raw) // 2, len(raw) - 1}):
        cut = tmp_path / f"cut{n}{suffix}"
        cut.write_bytes(raw[:n])
        with pytest.raises(FileFormatError, match=re.escape(str(cut))):
            load_codes(cut)


def test_codes_member_declaring_64_gib_fails_before_reading(tmp_path, rng):
    path = tmp_path / "c.npz"
    np.savez(path, **{k: v for k, v in _codes(rng).items() if k != "database_codes"})
    with zipfile.ZipFile(path, "a") as z:
        z.writestr("database_codes.npy", npy_header((1 << 33, 8), "u1") + bytes(16))
    with pytest.raises(FileFormatError, match=r"key 'database_codes' declares uint8 \(8589934592, 8\)"):
        load_codes(path)


def test_pt_codes_must_be_a_dict_of_tensors(tmp_path, rng):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(FileFormatError, match=r"list\.pt: expected a dict of tensors"):
        load_codes(tmp_path / "list.pt")
    data = {k: torch.as_tensor(v) for k, v in _codes(rng).items()} | {"query_labels": [[0, 1]]}
    torch.save(data, tmp_path / "d.pt")
    with pytest.raises(FileFormatError, match=r"d\.pt: key 'query_labels' is a list; expected a tensor"):
        load_codes(tmp_path / "d.pt")


def test_missing_safetensors_names_the_dmmh_extra(tmp_path, rng):
    _save(".safetensors", tmp_path / "c.safetensors", _codes(rng))
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["safetensors"] = None  # as if not installed
        from dmmh._optional import MissingDependencyError, require
        from dmmh.metrics.report import load_codes
        for call in (lambda: load_codes({str(tmp_path / "c.safetensors")!r}), lambda: require("safetensors.torch", "x")):
            try:
                call()
            except MissingDependencyError as e:
                print(e)
            else:
                raise AssertionError("no error")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert "optional package 'safetensors': pip install 'dmmh[data]'" in line, line


def test_report_command_names_a_truncated_or_text_labelled_codes_file(tmp_path, rng):
    """``dmmh report --codes``: the reader's errors reach the user with the file's name, before any output."""
    from dmmh.cli import main as dmmh_main

    good = tmp_path / "good.npz"
    codes = _codes(rng)
    np.savez(good, **codes)
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    text = tmp_path / "text.npz"
    np.savez(text, **{**codes, "query_labels": np.array([["a", "b"]] * len(codes["query_labels"]))})
    for path, what in ((cut, "could not be read"), (text, "query_labels")):
        with pytest.raises(FileFormatError, match=re.escape(str(path)) + ".*" + what):
            dmmh_main(["report", "--codes", str(path), "--out", str(tmp_path / "r"), "--no-plots", "--no-progress"])
        assert not (tmp_path / "r").exists()

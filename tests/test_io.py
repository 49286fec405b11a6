"""Atomic writes: modes, failure leaves the old content, temporaries of dead writers removed."""

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from dmmh import _io
from dmmh._io import atomic_dir, atomic_write, write_npz


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test (restored after)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda m: os.umask(m)
    os.umask(old)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def temp_of(path, pid, host=None, token="0a1b2c3d"):
    return path.with_name(f".{path.name}.{host or _io._HOST}.{pid}.{token}.tmp")


def test_atomic_write_bytes_and_callable(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    assert atomic_write(path, b"abc") == path
    assert path.read_bytes() == b"abc"
    atomic_write(path, lambda f: f.write(b"xyz"))
    assert path.read_bytes() == b"xyz"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.bin"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write(tmp_path / "f.bin", b"x")
    assert mode(tmp_path / "f.bin") == 0o666 & ~mask
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_bytes(b"a")
    assert mode(tmp_path / "d") == 0o777 & ~mask


@pytest.mark.parametrize("kept", [0o600, 0o640, 0o755])
def test_replacing_a_file_keeps_its_mode(tmp_path, umask, kept):
    umask(0o022)
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    os.chmod(path, kept)
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == kept


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    path = tmp_path / "f.bin"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = temp_of(path, dead_pid())
        stale_dir = temp_of(path, dead_pid(), token="ffff")
        kept = [temp_of(path, live.pid), temp_of(path, os.getpid()),  # live writers (another process, this one)
                temp_of(path, dead_pid(), host="0123abcd"),  # another host's writer: its pid means nothing here
                tmp_path / f".{path.name}.x1y2z3.tmp",  # not our naming scheme
                temp_of(tmp_path / "other.bin", dead_pid())]  # another target's
        stale.write_bytes(b"half")
        stale_dir.mkdir()
        (stale_dir / "inner").write_bytes(b"half")
        for k in kept:
            k.write_bytes(b"busy")
        atomic_write(path, b"new")
        assert not stale.exists() and not stale_dir.exists()
        assert all(k.read_bytes() == b"busy" for k in kept)
        assert path.read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()


def test_atomic_dir_builds_then_renames(tmp_path):
    target = tmp_path / "sub" / "cache"
    with atomic_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "a.npy").write_bytes(b"a")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b").write_bytes(b"b")
    assert (target / "a.npy").read_bytes() == b"a" and (target / "nested" / "b").read_bytes() == b"b"
    assert sorted(p.name for p in target.parent.iterdir()) == ["cache"]
    with pytest.raises(FileExistsError, match="cache already exists"):
        with atomic_dir(target):
            pass


def test_atomic_dir_error_leaves_nothing_and_stale_folders_go(tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_bytes(b"a")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    stale = temp_of(target, dead_pid())
    stale.mkdir()
    (stale / "half.npy").write_bytes(b"half")
    live = temp_of(target, os.getpid())
    live.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "a").write_bytes(b"a")
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", live.name])


def test_atomic_dir_loses_cleanly_to_a_concurrent_writer(tmp_path):
    target = tmp_path / "cache"
    with pytest.raises(FileExistsError, match="meanwhile"):
        with atomic_dir(target) as tmp:
            (tmp / "mine").write_bytes(b"1")
            target.mkdir()
            (target / "theirs").write_bytes(b"2")
    assert [p.name for p in target.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_write_npz_is_reproducible_and_readable(tmp_path, rng):
    arrays = {"b": rng.standard_normal((3, 4)).astype(np.float32), "a": rng.integers(0, 9, (5,))}
    write_npz(tmp_path / "x.npz", arrays)
    write_npz(tmp_path / "y.npz", dict(reversed(list(arrays.items()))))
    assert (tmp_path / "x.npz").read_bytes() == (tmp_path / "y.npz").read_bytes()
    with np.load(tmp_path / "x.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["a", "b"]
        for k, a in arrays.items():
            assert z[k].dtype == a.dtype and np.array_equal(z[k], a)
    with pytest.raises(ValueError, match="pickle"):
        write_npz(tmp_path / "z.npz", {"o": np.array([object()])})
    assert not (tmp_path / "z.npz").exists()

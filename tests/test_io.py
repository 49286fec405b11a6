import os
import stat

import pytest

from dmmh._io import atomic_write


def test_atomic_write_bytes_and_callable(tmp_path):
    path = tmp_path / "sub" / "f.bin"
    assert atomic_write(path, b"abc") == path
    assert path.read_bytes() == b"abc"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    atomic_write(path, lambda f: f.write(b"xyz"))
    assert path.read_bytes() == b"xyz"


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

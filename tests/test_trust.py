"""What docs/trust.md says, checked: checkpoints are pickles and dmmh loads them weights-only; a memory-mapped
feature file truncated under a reader kills it (SIGBUS), while a file replaced by a rename does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from _benchmark_files import make_arrays, write_npy
from test_cli import cli, expand_cli


class _Planted:
    """Unpickling it runs ``open(marker, "w")``: what a malicious checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_checkpoint(path):
    import torch

    marker = path.parent / "code-ran"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "hyper_parameters": {}, "extra": _Planted(str(marker))}, path)
    return path, marker


def test_checkpoints_load_weights_only_even_under_torch_force_no_weights_only(tmp_path, monkeypatch):
    """With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, Lightning's default load runs a pickle's code; dmmh's loads
    (``dmmh report --ckpt``, ``dmmh fit|test --ckpt_path``, also ``last``) pass weights_only=True and refuse it."""
    import pickle

    import dmmh
    from dmmh.metrics.report import encode_checkpoint

    ckpt, marker = planted_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    data = dmmh.SyntheticMultiLabel(num_train=16, num_query=4, num_database=16)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        dmmh.DMMHModule.load_from_checkpoint(ckpt)  # torch's default is weights_only=True ...
    assert not marker.exists()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        encode_checkpoint(ckpt, data)
    args = ["--data=synthetic", "--data.num_train=16", "--data.num_query=4", "--data.num_database=16", "--model.encoder=mlp",
            "--model.n_bits=8", "--trainer.logger=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    for command, path in (("test", ckpt), ("fit", "last")):  # "last": the newest last*.ckpt of the checkpoint folder
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            cli(expand_cli([command, *args, f"--ckpt_path={path}"]))
    assert not marker.exists()
    with pytest.raises(Exception):
        dmmh.DMMHModule.load_from_checkpoint(ckpt)  # ... which the variable turns off: the code runs
    assert marker.exists()


def test_truncating_a_memory_mapped_feature_file_kills_the_reader(tmp_path, rng):
    """A reader of a memory-mapped ``.npy`` folder keeps the old file when it is replaced by a rename
    (``mv``, dmmh's atomic writes) and dies of SIGBUS when it is truncated in place (``cp`` over it)."""
    folder = write_npy(tmp_path / "mir_npy", make_arrays(rng, 24, sizes=(12, 5, 4096), image_dim=512))
    target = folder / "I_db.npy"
    reader = textwrap.dedent(f"""
        import sys
        from dmmh.data import MIRFlickr25K

        def database_image():
            return MIRFlickr25K({str(folder)!r}, mmap=True).splits["database"].image

        image = database_image()
        last = float(image[-1, 0])
        print("ready", flush=True); sys.stdin.readline()
        print("after rename, old data:", float(image[-1, 0]) == last != 1.0, flush=True)
        image = database_image()  # the new file (all ones)
        print("ready", flush=True); sys.stdin.readline()
        print("after truncate", float(image[-1, 0]), flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", reader], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert proc.stdout.readline() == "ready\n", proc.stderr.read()[-3000:]
        replacement = tmp_path / "new.npy"
        np.save(replacement, np.ones((4096, 512), dtype=np.float32))
        os.replace(replacement, target)  # a rename: the reader's mapping keeps the old inode
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "after rename, old data: True\n"
        assert proc.stdout.readline() == "ready\n"
        os.truncate(target, 256)  # in place: the mapped pages are gone
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=120) == -signal.SIGBUS
        assert proc.stdout.read() == ""  # it died reading, without a Python exception
    finally:
        proc.kill()

"""What a pip user gets: the built wheel, installed into a fresh virtualenv (no clone on the path), trains
with a config shipped in the package on a MIR-format file.

The new environment takes its dependencies (torch, lightning, ...) from the running one through a
``.pth`` line instead of installing them: a path added that way is not a site directory, so the
editable install of this clone (a ``.pth`` hook there) stays out, and ``dmmh`` resolves to the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from _benchmark_files import make_arrays, write_mat73

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> tuple[Path, str]:
    """The wheel of a copy of the sources (the build writes ``build/`` and ``*.egg-info`` beside them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "dmmh", src / "dmmh", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("dmmh-*.whl")
    return wheel, proc.stdout + proc.stderr


def test_wheel_installs_and_fits_with_a_shipped_config(tmp_path, rng):
    wheel, build_log = build_wheel(tmp_path)
    assert "deprecated" not in build_log.lower()  # e.g. setuptools' warning about a `project.license` table
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "License-Expression: Apache-2.0" in z.read(f"{info}/METADATA").decode()
        shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "dmmh" / "configs").glob("*/*.yaml")}
        assert shipped and shipped <= names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, env=env).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, timeout=300, env=env)

    work = tmp_path / "work"  # neither the clone nor its parent
    work.mkdir()
    mat = write_mat73(work / "mir_cnn_twt.mat", make_arrays(rng, 24))
    where = subprocess.run([str(python), "-c", "import dmmh; print(dmmh.__file__)"], capture_output=True, text=True,
                           check=True, env=env, cwd=work).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    proc = subprocess.run(
        [str(venv / "bin" / "dmmh"), "fit", "-c", "mirflickr/dmmh_64", "--data.root", str(mat), "--trainer.fast_dev_run=1",
         "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu"],
        capture_output=True, text=True, timeout=600, env=env, cwd=work)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es)" in out
    assert "Tip:" not in out and "LeafSpec" not in out

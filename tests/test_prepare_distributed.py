"""``dmmh prepare --devices 2 --strategy ddp`` on CPU (gloo): two Lightning processes extract
disjoint chunks; the file equals a single-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from _raw_releases import make_mirflickr, tiny_clip_spec

from dmmh.data.readers import read_feature_file
from dmmh.prepare import SplitSizes, check, prepare
from dmmh.prepare.features import image_features

TESTS = Path(__file__).resolve().parent


def test_two_processes_extract_disjoint_chunks_into_the_same_file(tmp_path, rng):
    make_mirflickr(tmp_path / "raw", rng)
    spec, config = tiny_clip_spec(tmp_path)
    (tmp_path / "arch.json").write_text(json.dumps(config))
    single = prepare("mirflickr", tmp_path / "raw", tmp_path / "one" / "mir.npz", image_features(spec, model_config=config),
                     split_sizes=SplitSizes(4, None, 6), recipe_params={"n_images": 30, "min_tag_count": 3},
                     chunk_size=3, batch_size=2, progress=False)
    script = tmp_path / "run.py"  # Lightning's launcher reruns this script as rank 1
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from dmmh.cli import main
        main(sys.argv[1:])
    """))
    out = tmp_path / "two" / "mir.npz"
    args = ["prepare", "mirflickr", "--raw", str(tmp_path / "raw"), "--out", str(out), "--image-features", spec,
            "--model-config", str(tmp_path / "arch.json"), "--recipe", "n_images=30", "--recipe", "min_tag_count=3",
            "--query", "4", "--train", "6", "--chunk-size", "3", "--batch-size", "2", "--num-workers", "0",
            "--no-progress", "--device", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(f"wrote {out}") == 1  # rank 0 alone writes and reports
    m = check(out)
    assert m["extraction"]["world_size"] == 2
    a, b = read_feature_file(single).arrays, read_feature_file(out).arrays
    for key in a:
        if key.startswith("I_"):  # other processes, other thread counts: float results may differ in the last bits
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(b[key], a[key])

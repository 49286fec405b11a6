"""Time and peak memory of ``dmmh test`` at several ``eval_batch_size`` values (how the configs' value was picked).

Writes a generated feature folder of MIR-Flickr25K's size (5,000 train, 2,243 queries, 17,772 database items,
4096-D image and 1386-D text features, 24 classes; `.npy`, memory-mapped as the benchmark files are) and an
untrained checkpoint of the 64-bit config, then runs ``dmmh test -c configs/mirflickr/dmmh_64.yaml`` once per
batch size, each in its own process, and reports wall time, CPU time (user + sys, less sensitive to other
load on the machine) and peak resident memory, with ratios to the first batch size. Runs are interleaved
over ``--repeats`` rounds. Takes about 3 × (a few minutes) per round on 2 CPU cores.

    python benchmarks/bench_eval_batch.py [--batches 256 1024 4096] [--repeats 1] [--work /tmp/dmmh_eval_batch]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from _report import Report

CONFIG = Path(__file__).resolve().parent.parent / "dmmh" / "configs" / "mirflickr" / "dmmh_64.yaml"
# runs one command in a child and prints that child's wall time, CPU time and peak RSS (its own rusage only)
MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - t
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"rc": rc.returncode, "err": rc.stderr[-2000:], "wall": wall, "cpu": r.ru_utime + r.ru_stime,
                  "peak_mb": r.ru_maxrss / 1024}))
"""


def prepare(work: Path, sizes: tuple[int, int, int]) -> tuple[Path, Path]:
    import lightning as L

    import dmmh
    from dmmh.data.readers import write_npy_folder

    folder, ckpt = work / "mir_npy", work / "mir64.ckpt"
    if not folder.exists():
        rng = np.random.default_rng(0)
        arrays = {}
        for (i, t, lab), n in zip((("I_tr", "T_tr", "L_tr"), ("I_te", "T_te", "L_te"), ("I_db", "T_db", "L_db")), sizes):
            arrays[i] = rng.standard_normal((n, 4096), dtype=np.float32)
            arrays[t] = rng.integers(0, 3, (n, 1386)).astype(np.float32)
            labels = (rng.random((n, 24)) < 0.2).astype(np.float32)
            labels[np.arange(n), rng.integers(0, 24, n)] = 1
            arrays[lab] = labels
        write_npy_folder(arrays, folder)
    if not ckpt.exists():
        data = dmmh.data.MIRFlickr25K(root=str(folder), batch_size=16)
        model = dmmh.DMMHModule(data.image_dim, data.text_dim, data.num_classes, n_bits=64)
        trainer = L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, data)
        trainer.save_checkpoint(ckpt)
    return folder, ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--sizes", type=int, nargs=3, default=[5000, 2243, 17772], metavar=("TRAIN", "QUERY", "DATABASE"))
    p.add_argument("--work", default="/tmp/dmmh_eval_batch", help="where the generated data and checkpoint live (reused)")
    p.add_argument("--out", help="results folder (default benchmarks/results)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, ckpt = prepare(work, tuple(a.sizes))
    report = Report("eval_batch", "cpu", a.out, f"dmmh test, 64-bit MIR config, {a.sizes[1]} queries + {a.sizes[2]} "
                    f"database items, eval_batch_size {a.batches}")
    runs: dict[int, list[dict]] = {b: [] for b in a.batches}
    for _ in range(a.repeats):
        for b in a.batches:
            cmd = [sys.executable, "-m", "dmmh.cli", "test", "-c", str(CONFIG), "--data.root", str(folder),
                   "--ckpt_path", str(ckpt), "--data.init_args.eval_batch_size", str(b), "--trainer.logger", "false",
                   "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(work / "run")]
            out = json.loads(subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                                            check=True).stdout)
            if out["rc"] != 0:
                raise SystemExit(f"dmmh test failed at eval_batch_size {b}:\n{out['err']}")
            runs[b].append(out)
    first = a.batches[0]
    med = {b: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "peak_mb")} for b, rs in runs.items()}
    report(f"{'eval_batch_size':>15} {'wall s':>8} {'cpu s':>8} {'peak MB':>8}   (ratio to {first}: wall, cpu, peak)")
    for b, m in med.items():
        report(f"{b:>15} {m['wall']:>8.1f} {m['cpu']:>8.1f} {m['peak_mb']:>8.0f}   "
               f"{m['wall'] / med[first]['wall']:.2f}x {m['cpu'] / med[first]['cpu']:.2f}x {m['peak_mb'] / med[first]['peak_mb']:.2f}x")
    report.save()


if __name__ == "__main__":
    main()

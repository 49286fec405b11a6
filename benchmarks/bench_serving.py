"""Serving: ``dmmh encode`` throughput against a plain encoding loop, and search latency.

    python benchmarks/bench_serving.py [--items 2048] [--bits 64] [--batch-size 256] [--big 1000000 10000000]
                                       [--repeats 5] [--out DIR]

Encode: the default DMMH model (Mamba encoders, ``--bits``) over ``--items`` synthetic items of the
benchmark feature widths (4096-D image, 1386-D text), one thread per process, batches of
``--batch-size``. The baseline is a plain in-process loop (``module.encode`` per batch, pack, one
``HammingIndex`` saved); ``dmmh encode`` runs as a subprocess with 1 and with 2 processes (DDP,
gloo). Items/s count the command's whole call (model load, shards, merge, manifest) and, in
brackets, the process's wall time (interpreter start and imports included); the ratio is to the
plain loop. All three must give byte-identical codes.

Search: one query through :class:`dmmh.serving.Searcher` over that index (encoding the query +
k-NN, k=10), then the index search alone over ``--big`` random codes (flat search does not depend
on how codes were made), for 1 and 100 queries; and ``dmmh search`` end to end as a process.
Writes ``<out>/serving_cpu.txt``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from _report import Report, median_times

import dmmh
from dmmh.hashing import HammingIndex, pack_bits
from dmmh.serving import Searcher

ROOT = Path(__file__).resolve().parents[1]


def checkpoint(path: Path, bits: int) -> None:
    L.seed_everything(0, verbose=False)
    data = dmmh.SyntheticMultiLabel(num_train=8, num_query=8, num_database=8, image_dim=4096, text_dim=1386, num_classes=24,
                                    batch_size=8)
    module = dmmh.DMMHModule(image_dim=4096, text_dim=1386, n_classes=24, n_bits=bits)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    trainer.save_checkpoint(path)


def encode_cmd(ckpt: Path, data_args: dict, out: Path, batch: int, devices: int) -> tuple[float, float, str]:
    """(seconds the command reports, process wall seconds, its last line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PL_TORCH_DISTRIBUTED_BACKEND="gloo",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    data = [x for k, v in data_args.items() for x in (f"--data.{k}", str(v))]
    cmd = [sys.executable, "-m", "dmmh.cli", "encode", "--ckpt", str(ckpt), "--data", "synthetic", *data, "--out", str(out), "--batch-size", str(batch), "--no-progress", "--accelerator", "cpu",
           "--devices", str(devices)] + (["--strategy", "ddp"] if devices > 1 else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    line = proc.stdout.strip().splitlines()[-1]
    return float(re.search(r"([\d.]+) s \(", line).group(1)), wall, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=2048)
    p.add_argument("--bits", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--big", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    torch.set_num_threads(1)
    rep = Report("serving", "cpu", a.out, "dmmh encode / dmmh search (bench_serving.py)")
    rep("# load average (1, 5, 15 min) at the start: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()))
    n, batch = a.items, a.batch_size
    data_args = dict(num_train=256, num_query=64, num_database=n, image_dim=4096, text_dim=1386, num_classes=24)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "model.ckpt"
        checkpoint(ckpt, a.bits)
        rep(f"## encode: default DMMH (mamba, {a.bits} bits), {n:,} items of 4096 + 1386 features, batch {batch}, "
            f"1 thread/process")
        module = dmmh.DMMHModule.load_from_checkpoint(str(ckpt), map_location="cpu").eval()
        split = dmmh.SyntheticMultiLabel(**data_args).splits["database"]
        t = time.perf_counter()
        packed = torch.cat([pack_bits(module.encode(torch.from_numpy(split.image[s:s + batch]),
                                                    torch.from_numpy(split.text[s:s + batch]))) for s in range(0, n, batch)])
        HammingIndex(a.bits).add(packed).save(tmp / "loop.dmmh")
        base = time.perf_counter() - t
        rep(f"{'path':<34} {'seconds':>8} {'items/s':>16} {'ratio':>6}")
        rep(f"{'plain loop (in process)':<34} {base:>8.1f} {n / base:>16.0f} {1:>6.2f}")
        for devices in (1, 2):
            out = tmp / f"enc{devices}.dmmh"
            secs, wall, _ = encode_cmd(ckpt, data_args, out, batch, devices)
            same = out.read_bytes()[:-32] == (tmp / "loop.dmmh").read_bytes()[:-32]
            label = f"dmmh encode, {devices} process(es)"
            rep(f"{label:<34} {secs:>8.1f} {n / secs:>7.0f} ({n / wall:>5.0f}) {base / secs:>6.2f}"
                + ("" if same else "  CODES DIFFER"))
            assert same, "dmmh encode must give the plain loop's codes"

        rep()
        rep(f"## search: one query (features), k=10; medians of {a.repeats}")
        t = time.perf_counter()
        searcher = Searcher(tmp / "enc1.dmmh")
        rep(f"open Searcher ({n:,} items: index, manifest, model, fingerprint): {time.perf_counter() - t:.2f} s")
        q = searcher.features({"image": split.image[:1], "text": split.text[:1]})
        codes = searcher.encode(**q)
        times = median_times({"encode": lambda: searcher.encode(**q), "knn": lambda: searcher.index.search(codes, 10),
                              "search": lambda: searcher.search(**q, k=10)}, a.repeats, "cpu")
        rep(f"query encoding {times['encode'] * 1e3:.1f} ms + k-NN {times['knn'] * 1e3:.2f} ms; Searcher.search "
            f"{times['search'] * 1e3:.1f} ms")
        rng = np.random.default_rng(0)
        for big in a.big:
            random_codes = rng.integers(0, 256, (big, a.bits // 8), dtype=np.uint8)
            index = HammingIndex(a.bits, backend="faiss").add(torch.from_numpy(random_codes))
            q1 = torch.from_numpy(rng.integers(0, 256, (1, a.bits // 8), dtype=np.uint8))
            q100 = torch.from_numpy(rng.integers(0, 256, (100, a.bits // 8), dtype=np.uint8))
            index.search(q1, 10)  # builds the faiss copy
            t = median_times({"1": lambda: index.search(q1, 10), "100": lambda: index.search(q100, 10)}, a.repeats, "cpu")
            rep(f"HammingIndex.search over {big:>11,} random {a.bits}-bit codes (flat, faiss): "
                f"1 query {t['1'] * 1e3:.1f} ms, 100 queries {t['100'] * 1e3:.0f} ms ({t['100'] * 10:.2f} ms/query)")
            del index
        np.savez(tmp / "q.npz", image=split.image[:1], text=split.text[:1])
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dmmh.cli", "search", "--index", str(tmp / "enc1.dmmh"), "--features",
                        str(tmp / "q.npz")], env=env, capture_output=True, check=True)
        rep(f"dmmh search --features (a new process: imports, load, one query): {time.perf_counter() - t:.1f} s")
    rep.save()


if __name__ == "__main__":
    main()

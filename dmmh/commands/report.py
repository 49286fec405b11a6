"""``dmmh report``: evaluate codes files or checkpoints and write a report (:mod:`dmmh.metrics.report`).

From saved codes::

    dmmh report --codes run64.npz run128.npz --out reports/nus

Each codes file (``.npz``, ``.pt`` dict or ``.safetensors``) holds ``query_codes``,
``database_codes``, ``query_labels`` and ``database_labels``. From trained checkpoints::

    dmmh report --ckpt a.ckpt b.ckpt --data synthetic --data-args '{"num_query": 64}' --out reports/x

``--data`` is a registered DataModule name or a class path ``pkg.module.Class``. The report holds
``metrics.json``, ``metrics.csv`` (``run, n_bits, metric, k, value``), ``pr_curve.png``,
``precision_at_k.png`` and, with several runs, ``map_vs_bits.png``.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from dmmh.metrics.functional import EMPTY_POLICIES, NORMALIZERS
from dmmh.metrics.report import CODE_KEYS, CURVE_KS, encode_checkpoint, evaluate, load_codes, write_report


def _datamodule(name: str, kwargs: dict):
    from dmmh.registry import DATAMODULES

    if "." not in name:
        return DATAMODULES.create(name, **kwargs)
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)(**kwargs)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmh report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--codes", nargs="+", help="codes files (.npz/.pt/.safetensors) with keys " + ", ".join(CODE_KEYS))
    src.add_argument("--ckpt", nargs="+", help="trained DMMHModule checkpoints (needs --data)")
    p.add_argument("--data", help="DataModule name (see dmmh.list_datamodules()) or class path pkg.module.Class")
    p.add_argument("--data-args", default="{}", help="JSON dict of DataModule keyword arguments")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", nargs="+", help="run names (default: file stems)")
    p.add_argument("--map-k", nargs="+", default=["all", "1000", "50"], help="k of mAP@k ('all' = whole database)")
    p.add_argument("--precision-k", nargs="+", type=int, default=list(CURVE_KS), help="k of precision@k / recall@k")
    p.add_argument("--radius", type=int, default=2, help="Hamming radius of precision@radius")
    p.add_argument("--empty", choices=EMPTY_POLICIES, default="zero", help="queries without relevant items")
    p.add_argument("--normalizer", choices=NORMALIZERS, default="retrieved", help="denominator of AP@k")
    p.add_argument("--no-plots", action="store_true", help="write JSON and CSV only")
    return p


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``dmmh report``: evaluate codes files or checkpoints and write the report."""
    p = _parser()
    a = p.parse_args(argv)
    sources = a.codes or a.ckpt
    names = a.name or [Path(s).stem for s in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        p.error(f"--name needs {len(sources)} distinct names, got {names}")
    if a.ckpt:
        if not a.data:
            p.error("--ckpt needs --data (a DataModule name or class path)")
        try:
            data_args = json.loads(a.data_args)
        except json.JSONDecodeError as exc:
            p.error(f"--data-args is not valid JSON: {exc}")
        dm = _datamodule(a.data, data_args)
    try:
        map_ks = [None if k == "all" else int(k) for k in a.map_k]
    except ValueError:
        p.error(f"--map-k takes integers or 'all', got {a.map_k}")
    options = dict(map_ks=map_ks, precision_ks=a.precision_k, radius=a.radius, empty=a.empty, normalizer=a.normalizer)
    runs = {}
    for name, src in zip(names, sources):
        codes = load_codes(src) if a.codes else encode_checkpoint(src, dm)
        runs[name] = evaluate(codes, **options)
        print(f"{name}: {runs[name]['n_bits']} bits, mAP@all {runs[name]['mAP']:.4f}")
    written = write_report(runs, a.out, plots=not a.no_plots)
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return written

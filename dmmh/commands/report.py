"""``dmmh report``: evaluate codes files or checkpoints and write a report (:mod:`dmmh.metrics.report`).

From trained checkpoints, with the data settings of ``dmmh fit`` (a config's ``data:`` section,
``--data NAME|CLASS``, ``--data.ARG VALUE``)::

    dmmh report --ckpt runs/mir64/last.ckpt -c mirflickr/dmmh_64 --data.root mir_cnn_twt.mat --out reports/mir
    dmmh report --ckpt a.ckpt --data synthetic --data.num_query 64 --out reports/x --save-codes codes/

``--save-codes DIR`` writes each checkpoint's codes to ``DIR/<name>.npz``; from such codes files
(``.npz``, ``.pt`` dict or ``.safetensors`` holding ``query_codes``, ``database_codes``,
``query_labels`` and ``database_labels``) a report needs no model and no data::

    dmmh report --codes codes/run64.npz codes/run128.npz --out reports/nus

The report holds ``metrics.json``, ``metrics.csv`` (``run, n_bits, metric, k, value``),
``pr_curve.png``, ``precision_at_k.png`` and, with several runs, ``map_vs_bits.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dmmh._optional import require_all
from dmmh.metrics.functional import EMPTY_POLICIES, NORMALIZERS
from dmmh.metrics.report import CODE_KEYS, CURVE_KS, encode_checkpoint, evaluate, load_codes, save_codes, write_report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmh report", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--codes", nargs="+", help="codes files (.npz/.pt/.safetensors) with keys " + ", ".join(CODE_KEYS))
    src.add_argument("--ckpt", nargs="+", help="trained DMMHModule checkpoints (with data settings, as for dmmh fit)")
    p.add_argument("-c", "--config", help="with --ckpt: a config file or shipped config name; its data: section is used")
    p.add_argument("--data", metavar="NAME|CLASS", help="with --ckpt: a registered DataModule name or class path; "
                   "--data.ARG VALUE sets its arguments (as for dmmh fit)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", nargs="+", help="run names (default: file stems)")
    p.add_argument("--save-codes", metavar="DIR", help="with --ckpt: also write each run's codes to DIR/<name>.npz")
    p.add_argument("--map-k", nargs="+", default=["all", "1000", "50"], help="k of mAP@k ('all' = whole database)")
    p.add_argument("--precision-k", nargs="+", type=int, default=list(CURVE_KS), help="k of precision@k / recall@k")
    p.add_argument("--radius", type=int, default=2, help="Hamming radius of precision@radius")
    p.add_argument("--empty", choices=EMPTY_POLICIES, default="zero", help="queries without relevant items")
    p.add_argument("--normalizer", choices=NORMALIZERS, default="retrieved", help="denominator of AP@k")
    p.add_argument("--no-plots", action="store_true", help="write JSON and CSV only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while encoding")
    return p


def main(argv: list[str] | None = None) -> dict[str, Path]:
    """``dmmh report``: evaluate codes files or checkpoints and write the report."""
    p = _parser()
    a, data_args = p.parse_known_args(argv)
    unknown = [x for x in data_args if x.startswith("-") and not x.startswith("--data.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    sources = a.codes or a.ckpt
    names = a.name or [Path(s).stem for s in sources]
    if len(names) != len(sources) or len(set(names)) != len(names):
        p.error(f"--name needs {len(sources)} distinct names, got {names}")
    if a.ckpt and not (a.config or a.data):
        p.error("--ckpt needs data settings: -c CONFIG (its data: section) or --data NAME|CLASS")
    if a.codes and (a.config or a.data or data_args or a.save_codes):
        p.error("-c, --data and --save-codes go with --ckpt (codes files hold their own labels)")
    try:
        map_ks = [None if k == "all" else int(k) for k in a.map_k]
    except ValueError:
        p.error(f"--map-k takes integers or 'all', got {a.map_k}")
    # every optional package this run needs, checked before any work
    needs = {"matplotlib": "the plots (--no-plots skips them)"} if not a.no_plots else {}
    if any(Path(s).suffix == ".safetensors" for s in a.codes or []):
        needs["safetensors"] = ".safetensors codes files"
    require_all(needs, ", ".join(needs.values()))
    if a.ckpt:
        from dmmh.cli import datamodule_from_args

        dm = datamodule_from_args([*(["-c", a.config] if a.config else []), *(["--data", a.data] if a.data else []), *data_args])
    options = dict(map_ks=map_ks, precision_ks=a.precision_k, radius=a.radius, empty=a.empty, normalizer=a.normalizer)
    runs = {}
    for name, src in zip(names, sources):
        if a.codes:
            codes = load_codes(src)
        else:
            codes = encode_checkpoint(src, dm, progress=not a.no_progress)
            if a.save_codes:
                print(f"wrote {save_codes(codes, Path(a.save_codes) / f'{name}.npz')}")
        runs[name] = evaluate(codes, **options)
        # the protocol the checkpoint was selected under (codes files do not record it)
        runs[name]["validation"] = codes.get("validation") if a.ckpt else "not recorded (codes file)"
        print(f"{name}: {runs[name]['n_bits']} bits, mAP@all {runs[name]['mAP']:.4f}; validation: {runs[name]['validation']}")
    written = write_report(runs, a.out, plots=not a.no_plots)
    print("wrote " + ", ".join(str(path) for path in written.values()))
    return written

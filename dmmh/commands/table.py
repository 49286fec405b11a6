"""``dmmh table``: fit + test every dataset × code length × encoder × seed and write the table
(:func:`dmmh.table.run_table`)::

    dmmh table --data uci_mfeat --bits 16 32 64 --encoders mamba transformer --seeds 0 1 2 --out results/uci
    dmmh table --data mirflickr=/data/mir_cnn_twt.mat nuswide=/data/nus_cnn_twt.mat --out results/paper

``--data NAME[=ROOT]`` names a config family (``<configs>/NAME/dmmh_<bits>.yaml``; the packaged
ones are mirflickr, nuswide, coco, uci_mfeat) and its data file or folder. Finished cells are
reused (a second run recomputes nothing); ``--quick`` makes a 2-epoch smoke run. Writes
``table.md``, ``table.csv``, ``table.json`` and ``map_vs_bits.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys

from dmmh._optional import MissingDependencyError


def _dataset(text: str) -> tuple[str, str | None]:
    name, sep, root = text.partition("=")
    if not name or (sep and not root):
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=ROOT, got {text!r}")
    return name, root or None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmh table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", type=_dataset, required=True, metavar="NAME[=ROOT]",
                   help="config families and their data roots (uci_mfeat needs none)")
    p.add_argument("--bits", nargs="+", type=int, default=[16, 32, 64, 128], help="code lengths (default 16 32 64 128)")
    p.add_argument("--encoders", nargs="+", default=["mamba", "transformer"], help="encoder names (default mamba transformer)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--out", required=True, help="output folder (cells/ holds each cell's run and result)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 epochs per cell, validated every epoch")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a LightningCLI setting for every cell, e.g. --set trainer.max_epochs=50 (repeatable)")
    p.add_argument("--configs", help="folder of config families (default: dmmh's packaged configs)")
    p.add_argument("--threads", type=int, help="torch CPU threads during the cells (default: torch's choice)")
    p.add_argument("--no-plot", action="store_true", help="skip map_vs_bits.png (no matplotlib needed)")
    return p


def main(argv: list[str] | None = None) -> dict:
    """``dmmh table``: see the module docs and ``dmmh table --help``."""
    p = _parser()
    a = p.parse_args(argv)
    datasets = dict(a.data)
    if len(datasets) != len(a.data):
        p.error(f"--data names a dataset twice: {[name for name, _ in a.data]}")
    bad = [o for o in a.overrides if "=" not in o or o.startswith("-")]
    if bad:
        p.error(f"--set takes KEY=VALUE (e.g. trainer.max_epochs=50), got {bad}")
    from dmmh.table import run_table

    try:
        status = run_table(a.out, datasets, a.bits, a.encoders, a.seeds, quick=a.quick, overrides=a.overrides,
                           config_dir=a.configs, threads=a.threads, plots=not a.no_plot,
                           log=lambda message: print(message, flush=True))
    except (MissingDependencyError, FileNotFoundError, ValueError) as exc:
        sys.exit(f"dmmh table: {exc}")
    print(f"{len(status['computed'])} cell(s) computed, {len(status['reused'])} reused, {len(status['failed'])} failed")
    print("wrote " + ", ".join(str(path) for path in status["outputs"].values()))
    if status["failed"]:
        sys.exit(f"dmmh table: {len(status['failed'])} cell(s) failed (see each cell's error.txt); rerun to retry them")
    return status

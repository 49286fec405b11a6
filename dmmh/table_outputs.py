"""The files ``dmmh table`` writes: ``table.md``, ``table.csv``, ``table.json``, ``map_vs_bits.png``.

:func:`write_outputs` aggregates the cells' results (see :mod:`dmmh.table`) into one row per
dataset × method × code length — mean and sample standard deviation of test mAP over the seeds
that finished, and the mean time per cell — and prints the published reference rows of
:data:`PUBLISHED` beside them, each with its citation and, unless the measured cells were also
selected on the test set, the mark "published, other protocol".
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib
import io
import json
import math
import platform
import subprocess
from pathlib import Path
from typing import Sequence

from dmmh._io import atomic_write
from dmmh.data.base import SELECTED_ON_TEST

__all__ = ["PUBLISHED", "DATASET_NAMES", "aggregate", "published_rows", "write_outputs", "mean_std", "environment"]

DATASET_NAMES = {"mirflickr": "MIR-Flickr25K", "nuswide": "NUS-WIDE", "coco": "MS-COCO 2014",
                 "uci_mfeat": "UCI Multiple Features (embedded digits)"}

# Published mAP@all of DMMH's predecessors as printed in the CLIPMH paper's comparison table (VGG
# image and bag-of-words text features on BSTH's splits); not re-run here. Those methods select
# their model on the test queries, as their code does, and report single runs.
PUBLISHED = {
    "citation": "J. Zhu, M. Sheng, M. Ke, Z. Huang, J. Chang, \"CLIP Multi-modal Hashing: A new baseline CLIPMH\", "
                "arXiv:2308.11797 (2023), comparison table (VGG image + bag-of-words text features)",
    "protocol": "as published: a single run, model selected on the test queries; not re-run here",
    "bits": (16, 32, 64, 128),
    "methods": {
        "DMMVH": {"mirflickr": (0.8587, 0.8707, 0.8798, 0.8827), "nuswide": (0.7714, 0.7820, 0.7879, 0.7916),
                  "coco": (0.6716, 0.7030, 0.7122, 0.7244)},
        "BSTH": {"mirflickr": (0.8145, 0.8340, 0.8482, 0.8571), "nuswide": (0.6990, 0.7340, 0.7505, 0.7704),
                 "coco": (0.5831, 0.6245, 0.6459, 0.6654)},
    },
}
CSV_COLUMNS = ("dataset", "method", "source", "n_bits", "mAP_mean", "mAP_std", "n_seeds", "seeds", "mAP_per_seed",
               "seconds_per_cell", "protocol", "citation")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


def aggregate(cells: Sequence, results: Sequence[dict]) -> list[dict]:
    """One row per planned dataset × encoder × code length, in plan order, over the seeds that finished."""
    by_cell = {(r["spec"]["cell"]["dataset"], r["spec"]["cell"]["n_bits"], r["spec"]["cell"]["encoder"],
                r["spec"]["cell"]["seed"]): r for r in results}
    rows: dict[tuple, dict] = {}
    for c in cells:
        row = rows.setdefault((c.dataset, c.encoder, c.n_bits), {
            "dataset": c.dataset, "method": c.encoder, "source": "measured", "n_bits": c.n_bits, "seeds": [],
            "mAP_per_seed": [], "seconds": [], "missing_seeds": [], "validation": set()})
        r = by_cell.get((c.dataset, c.n_bits, c.encoder, c.seed))
        if r is None:
            row["missing_seeds"].append(c.seed)
            continue
        row["seeds"].append(c.seed)
        row["mAP_per_seed"].append(r["test_mAP"])
        row["seconds"].append(r["fit_seconds"] + r["test_seconds"])
        row["validation"].add(r["validation"])
    out = []
    for row in rows.values():
        done = bool(row["mAP_per_seed"])
        mean, std = mean_std(row["mAP_per_seed"]) if done else (None, None)
        out.append({**row, "mAP_mean": mean, "mAP_std": std, "n_seeds": len(row["seeds"]),
                    "seconds_per_cell": sum(row.pop("seconds")) / len(row["seeds"]) if done else None,
                    "protocol": "; ".join(sorted(row.pop("validation"))), "citation": ""})
    return out


def published_rows(datasets: Sequence[str], bits: Sequence[int], selected_on_test: bool) -> list[dict]:
    """The :data:`PUBLISHED` values for the planned datasets and code lengths."""
    source = "published" if selected_on_test else "published, other protocol"
    rows = []
    for method, values in PUBLISHED["methods"].items():
        for dataset in datasets:
            for b in bits:
                if dataset in values and b in PUBLISHED["bits"]:
                    rows.append({"dataset": dataset, "method": method, "source": source, "n_bits": b,
                                 "mAP_mean": values[dataset][PUBLISHED["bits"].index(b)], "mAP_std": None,
                                 "n_seeds": 1, "seeds": [], "mAP_per_seed": [], "missing_seeds": [],
                                 "seconds_per_cell": None, "protocol": PUBLISHED["protocol"],
                                 "citation": PUBLISHED["citation"]})
    return rows


def _fmt(row: dict) -> str:
    if row["mAP_mean"] is None:
        return "—"
    if row["source"] != "measured":
        return f"{row['mAP_mean']:.4f}"
    planned = row["n_seeds"] + len(row["missing_seeds"])
    text = f"{row['mAP_mean']:.4f} ± {row['mAP_std']:.4f}"
    return text if row["n_seeds"] == planned else f"{text} ({row['n_seeds']} of {planned} seeds)"


def _seconds(s: float) -> str:
    return f"{s:.1f}" if s < 10 else f"{s:.0f}"


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# dmmh table: test mAP by code length", ""]
    if meta["quick"]:
        lines += ["**Quick smoke run (`--quick`: 2 epochs per cell): these numbers are not results.**", ""]
    for item in meta["environments"]:
        env, n = item["environment"], item["cells"]
        several = len(meta["environments"]) > 1
        lines.append(("- " if several else "") + f"dmmh {env['dmmh']} (git {env['git_commit'] or 'unknown'}), torch "
                     f"{env['torch']}, lightning {env['lightning']}; {env['machine']} ({env['device']})"
                     + (f": {n} cell(s)" if several else ""))
    lines += ["", f"Written {meta['written']}.", "",
              "Each measured entry is the mean ± sample standard deviation of test mAP over seeds "
              f"{', '.join(map(str, meta['seeds']))} (the seed of `seed_everything` and of the training shuffle; "
              "the validation split is the same for every seed).", ""]
    for dataset in meta["datasets"]:
        mine = [r for r in rows if r["dataset"] == dataset]
        bits = sorted({r["n_bits"] for r in mine if r["source"] == "measured"})
        lines += [f"## {DATASET_NAMES.get(dataset, dataset)} (`{dataset}`)", "",
                  "| method | " + " | ".join(f"{b} bits" for b in bits) + " |",
                  "|---|" + "---:|" * len(bits)]
        methods = list(dict.fromkeys((r["method"], r["source"]) for r in mine))
        for method, source in methods:
            cells = {r["n_bits"]: r for r in mine if (r["method"], r["source"]) == (method, source)}
            label = f"{method} (dmmh, measured)" if source == "measured" else f"{method} [1] ({source})"
            lines.append(f"| {label} | " + " | ".join(_fmt(cells[b]) if b in cells else "—" for b in bits) + " |")
        lines += ["", "Seconds per cell (fit + test, mean over seeds):", "",
                  "| encoder | " + " | ".join(f"{b} bits" for b in bits) + " |", "|---|" + "---:|" * len(bits)]
        for method, source in methods:
            if source == "measured":
                cells = {r["n_bits"]: r for r in mine if r["method"] == method and r["source"] == source}
                lines.append(f"| {method} | " + " | ".join(
                    _seconds(cells[b]["seconds_per_cell"]) if b in cells and cells[b]["seconds_per_cell"] is not None
                    else "—" for b in bits) + " |")
        validation = sorted({r["protocol"] for r in mine if r["source"] == "measured" and r["protocol"]})
        lines += ["", "Validation (model selection): " + ("; ".join(validation) or "—") + ".", ""]
    p = meta["protocol"]
    lines += ["## Protocol", "",
              f"- Test: mAP{'@all' if p['top_k'] is None else '@' + str(p['top_k'])} of each test query against the "
              "test database, Hamming ranking with ties broken by database index; queries with no relevant item "
              + ("count as AP 0" if p["empty"] == "zero" else "are left out of the mean")
              + f" (map_empty={p['empty']!r}, map_normalizer={p['normalizer']!r}).",
              f"- Tested checkpoint: {p['tested']}.",
              f"- Cells: {', '.join(f'`{c}`' for c in meta['configs'])} per dataset and code length, "
              f"with `--model.encoder` set per row" + (f"; overrides: {', '.join(f'`{o}`' for o in meta['overrides'])}"
                                                       if meta["overrides"] else "") + ".",
              ]
    if meta["failed"]:
        lines.append(f"- Failed cells (rerun `dmmh table` to retry them): {', '.join(sorted(meta['failed']))}.")
    if any(r["source"] != "measured" for r in rows):
        lines += ["", f"[1] {PUBLISHED['citation']}. {PUBLISHED['protocol'].capitalize()}; "
                      "\"other protocol\": the measured rows select their checkpoint on held-out training items."]
    return "\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        values = {**r, "seeds": ";".join(map(str, r["seeds"])),
                  "mAP_per_seed": ";".join(f"{v:.6f}" for v in r["mAP_per_seed"])}
        writer.writerow(["" if values[k] is None else values[k] for k in CSV_COLUMNS])
    return text.getvalue()


def _plot(rows: list[dict], datasets: Sequence[str], quick: bool) -> bytes:
    from dmmh._optional import require

    require("matplotlib", "dmmh table's map_vs_bits.png")
    figure = importlib.import_module("matplotlib.figure").Figure
    fig = figure(figsize=(4.2 * len(datasets), 3.8))
    for i, dataset in enumerate(datasets):
        ax = fig.add_subplot(1, len(datasets), i + 1)
        mine = [r for r in rows if r["dataset"] == dataset and r["mAP_mean"] is not None]
        for method, source in dict.fromkeys((r["method"], r["source"]) for r in mine):
            line = sorted((r["n_bits"], r["mAP_mean"], r["mAP_std"] or 0.0) for r in mine
                          if (r["method"], r["source"]) == (method, source))
            x, y, err = zip(*line)
            if source == "measured":
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=f"{method} (measured)")
            else:
                ax.plot(x, y, linestyle="--", marker="x", label=f"{method} ({source})")
        bits = sorted({r["n_bits"] for r in mine})
        ax.set_xscale("log", base=2)
        if bits:
            ax.set_xticks(bits, [str(b) for b in bits])
        ax.set(xlabel="code length (bits)", ylabel="test mAP", title=DATASET_NAMES.get(dataset, dataset))
        ax.legend(fontsize="x-small")
    if quick:
        fig.suptitle("quick smoke run: not results", color="red")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _git_commit() -> str | None:
    """The commit of the dmmh checkout this module runs from (``+modified`` if it has local changes)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")


def environment(threads: int | None = None) -> dict:
    import lightning
    import torch

    import dmmh

    return {"dmmh": dmmh.__version__, "git_commit": _git_commit(), "torch": torch.__version__,
            "lightning": lightning.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {_cpu_name()}, {torch.get_num_threads() if threads is None else threads} torch thread(s)",
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "CPU"


def _environments(results: Sequence[dict]) -> list[dict]:
    """The distinct environments the cells ran in (reused cells may come from earlier runs), with counts."""
    seen: dict[str, dict] = {}
    for r in results:
        key = json.dumps(r["environment"], sort_keys=True)
        seen.setdefault(key, {"environment": r["environment"], "cells": 0})["cells"] += 1
    return list(seen.values())


def write_outputs(out: str | Path, cells: Sequence, results: Sequence[dict], quick: bool = False,
                  overrides: Sequence[str] = (), failed: dict | None = None, threads: int | None = None,
                  plots: bool = True) -> dict[str, Path]:
    """Write the four outputs into ``out`` (atomically); returns file name → path."""
    datasets = list(dict.fromkeys(c.dataset for c in cells))
    measured = aggregate(cells, results)
    selected_on_test = bool(results) and all(r["validation"].startswith(SELECTED_ON_TEST) for r in results)
    rows = measured + published_rows(datasets, sorted({c.n_bits for c in cells}), selected_on_test)
    maps = {json.dumps(r["map"], sort_keys=True) for r in results} or {json.dumps({"top_k": None, "empty": "zero", "normalizer": "retrieved"})}
    if len(maps) > 1:
        raise ValueError(f"dmmh table: the cells were evaluated with different mAP options {sorted(maps)}; "
                         "make them agree (map_top_k, map_empty, map_normalizer) to compare them in one table")
    tested = sorted({r["tested"].split(" (")[0] for r in results})
    meta = {
        "quick": quick, "overrides": list(overrides), "datasets": datasets, "seeds": sorted({c.seed for c in cells}),
        "configs": sorted({f"{c.dataset}/dmmh_{c.n_bits}.yaml" for c in cells}), "failed": dict(failed or {}),
        "protocol": {**json.loads(maps.pop()), "tested": ", ".join(tested) or "—"},
        "environments": _environments(results) or [{"environment": environment(threads), "cells": 0}],
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    files = {
        "table.md": _markdown(rows, meta).encode(),
        "table.csv": _csv(rows).encode(),
        "table.json": json.dumps({**meta, "rows": rows, "cells": list(results), "published": PUBLISHED},
                                 indent=1, default=list).encode(),
    }
    if plots:
        files["map_vs_bits.png"] = _plot(rows, datasets, quick)
    out = Path(out)
    for name, data in files.items():
        atomic_write(out / name, data)
    return {name: out / name for name in files}

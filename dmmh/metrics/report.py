"""Evaluation reports: every retrieval metric as JSON and CSV, plus PNG plots.

:func:`evaluate` computes the metrics of one run's codes (a dict of :data:`CODE_KEYS`, e.g. from
:func:`load_codes` or :func:`encode_checkpoint`); :func:`write_report` writes ``metrics.json``,
``metrics.csv`` (``run, n_bits, metric, k, value``), ``pr_curve.png``, ``precision_at_k.png`` and,
with several runs, ``map_vs_bits.png``. The command is ``dmmh report`` (:mod:`dmmh.commands.report`).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dmmh._arrayfiles import ArrayHeader, FileFormatError, NpzArrays, SafetensorsArrays, read_arrays, reading
from dmmh._io import atomic_write
from dmmh._optional import require
from dmmh.metrics.functional import retrieval_metrics

__all__ = ["evaluate", "write_report", "load_codes", "save_codes", "encode_checkpoint", "CODE_KEYS", "CURVE_KS"]

CODE_KEYS = ("query_codes", "database_codes", "query_labels", "database_labels")
CURVE_KS = (1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def evaluate(codes: dict[str, Tensor], map_ks=(None, 1000, 50), precision_ks=CURVE_KS, **options) -> dict:
    """:func:`~dmmh.metrics.functional.retrieval_metrics` of a dict holding :data:`CODE_KEYS`."""
    return retrieval_metrics(*(codes[k] for k in CODE_KEYS), map_ks=map_ks, precision_ks=precision_ks, **options)


def _csv_rows(name: str, m: dict) -> list[list]:
    rows = [[name, m["n_bits"], "mAP", "all", m["mAP"]]]
    for metric in ("mAP@k", "precision@k", "recall@k"):
        rows += [[name, m["n_bits"], metric, k, v] for k, v in m[metric].items()]
    rows += [[name, m["n_bits"], f"{what}@radius", m["radius"], m[f"{what}@radius"]] for what in ("precision", "recall")]
    curve = m["pr_curve"]
    for what in ("precision", "recall"):
        rows += [[name, m["n_bits"], f"pr_curve_{what}", r, v] for r, v in zip(curve["radius"], curve[what])]
    return rows


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _plots(runs: dict[str, dict]) -> dict[str, bytes]:
    require("matplotlib", "dmmh report plots")
    figure = importlib.import_module("matplotlib.figure").Figure
    pngs = {}
    fig = figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for name, m in runs.items():
        ax.plot(m["pr_curve"]["recall"], m["pr_curve"]["precision"], marker=".", label=name)
    ax.set(xlabel="recall", ylabel="precision", title="Precision-recall over Hamming radii", xlim=(0, 1.02), ylim=(0, 1.02))
    ax.legend(fontsize="small")
    pngs["pr_curve.png"] = _png(fig)
    fig = figure(figsize=(5, 4))
    ax = fig.add_subplot()
    for name, m in runs.items():
        ks = [k for k in m["precision@k"] if k != "all" and int(k) <= m["n_database"]]  # larger k are clamped to N
        ax.plot(ks, [m["precision@k"][k] for k in ks], marker=".", label=name)
    ax.set(xscale="log", xlabel="number of retrieved items k", ylabel="precision@k", title="Precision at top k", ylim=(0, 1.02))
    ax.legend(fontsize="small")
    pngs["precision_at_k.png"] = _png(fig)
    if len(runs) > 1:
        fig = figure(figsize=(5, 4))
        ax = fig.add_subplot()
        points = sorted((m["n_bits"], m["mAP"], name) for name, m in runs.items())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        for bits, value, name in points:
            ax.annotate(name, (bits, value), fontsize="x-small", textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log", base=2)
        ax.set(xlabel="code length (bits)", ylabel="mAP@all", title="mAP vs code length")
        ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
        pngs["map_vs_bits.png"] = _png(fig)
    return pngs


def write_report(runs: dict[str, dict], out_dir: str | os.PathLike, plots: bool = True) -> dict[str, Path]:
    """Write ``runs`` (name → :func:`evaluate` result) to ``out_dir``; returns name → path written."""
    if not runs:
        raise ValueError("write_report: no runs given")
    out = Path(out_dir)
    files = {"metrics.json": json.dumps({"runs": runs}, indent=2).encode()}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["run", "n_bits", "metric", "k", "value"])
    for name, m in runs.items():
        writer.writerows(_csv_rows(name, m))
    files["metrics.csv"] = text.getvalue().encode()
    if plots:
        files |= _plots(runs)
    for name, data in files.items():
        atomic_write(out / name, data)
    return {name: out / name for name in files}


def load_codes(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read :data:`CODE_KEYS` from a ``.npz``, ``.pt`` or ``.safetensors`` file: 2-D numeric
    arrays, codes and labels of a side with equal rows, labels of equal width. Headers are checked
    before data is read; errors (:class:`~dmmh._arrayfiles.FileFormatError`) name the file and key."""
    path = Path(path)
    where = str(path)
    if path.suffix in (".pt", ".pth"):
        with reading(where):
            data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict):
            raise FileFormatError(f"{where}: expected a dict of tensors with keys {CODE_KEYS}, got {type(data).__name__}")
        for k in CODE_KEYS:
            if k in data and not isinstance(data[k], Tensor):
                raise FileFormatError(f"{where}: key {k!r} is a {type(data[k]).__name__}; expected a tensor")
        _check_codes(where, {k: _torch_header(data[k]) for k in CODE_KEYS if k in data}, data)
        return {k: data[k] for k in CODE_KEYS}
    if path.suffix == ".safetensors":
        require("safetensors", "reading .safetensors codes")
        open_source = SafetensorsArrays
    elif path.suffix == ".npz":
        open_source = NpzArrays
    else:
        raise ValueError(f"{path}: unknown codes file type {path.suffix!r} (use .npz, .pt or .safetensors)")
    with reading(where):
        source = open_source(path)
        try:
            arrays = read_arrays(source, CODE_KEYS, lambda h: _check_codes(where, h, source.names), where=where)
        finally:
            getattr(source, "close", lambda: None)()
    return {k: torch.from_numpy(np.ascontiguousarray(arrays[k])) for k in CODE_KEYS}


def _torch_header(t: Tensor) -> ArrayHeader:
    """A stand-in header (shape and dtype kind) of a tensor, whose dtype numpy may lack (bf16)."""
    kind = np.bool_ if t.dtype == torch.bool else np.float32 if t.is_floating_point() else np.complex64 if t.is_complex() else np.int64
    return ArrayHeader(tuple(t.shape), np.dtype(kind))


def _check_codes(where: str, headers: dict[str, ArrayHeader], found) -> None:
    missing = [k for k in CODE_KEYS if k not in headers]
    if missing:
        raise FileFormatError(f"{where}: missing key(s) {missing}; found {sorted(found)}")
    for k, h in headers.items():
        if len(h.shape) != 2:
            raise FileFormatError(f"{where}: key {k!r} has shape {h.shape}; expected 2-D (items, bits or classes)")
        if h.dtype.kind not in "biuf":
            raise FileFormatError(
                f"{where}: key {k!r} has dtype {h.dtype}; expected numbers (codes: bool bits, ±1 floats or packed "
                f"uint8; labels: multi-hot 0/1)"
            )
    for side in ("query", "database"):
        codes, labels = headers[f"{side}_codes"], headers[f"{side}_labels"]
        if codes.shape[0] != labels.shape[0]:
            raise FileFormatError(
                f"{where}: key '{side}_codes' has {codes.shape[0]} rows but '{side}_labels' has {labels.shape[0]}; "
                f"expected one row per {side} item in both"
            )
    if headers["query_labels"].shape[1] != headers["database_labels"].shape[1]:
        raise FileFormatError(
            f"{where}: key 'query_labels' has {headers['query_labels'].shape[1]} classes but 'database_labels' has "
            f"{headers['database_labels'].shape[1]}; expected the same classes"
        )


@torch.no_grad()
def encode_checkpoint(ckpt: str | os.PathLike, datamodule, batch_size: int | None = None,
                      progress: bool = False) -> dict[str, Tensor]:
    """Codes (bool bits) and labels of the query and database splits of ``datamodule`` under a trained
    checkpoint, encoded on the CPU in batches of ``batch_size`` (default: the DataModule's
    ``eval_batch_size``), with a progress bar over items when ``progress``. The dict also holds
    ``"validation"``: how the run selected its checkpoint (its ``hparams.validation``, e.g.
    "selected on test: ..."), or ``None`` for a checkpoint that does not record it.

    The checkpoint is loaded with ``weights_only=True``: tensors and plain containers only, never
    pickled code, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says (see docs/trust.md).
    """
    from tqdm.auto import tqdm  # a dependency of lightning
    from torch.utils.data import DataLoader

    from dmmh.models.lit import DMMHModule

    module = DMMHModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=True)
    size = batch_size or datamodule.eval_batch_size
    loaders = {split: DataLoader(datamodule.dataset(split), batch_size=size, num_workers=datamodule.num_workers)
               for split in ("query", "database")}
    out = {}
    with tqdm(total=sum(len(d.dataset) for d in loaders.values()), unit="item", desc=f"encode {Path(ckpt).name}",
              disable=not progress) as bar:
        for split, loader in loaders.items():
            codes, labels = [], []
            for batch in loader:
                codes.append(module.encode(batch["image"], batch["text"]) >= 0)
                labels.append(batch["label"])
                bar.update(len(batch["label"]))
            out[f"{split}_codes"], out[f"{split}_labels"] = torch.cat(codes), torch.cat(labels)
    out["validation"] = module.hparams.get("validation")
    return out


def save_codes(codes: dict[str, Tensor], path: str | os.PathLike) -> Path:
    """Write :data:`CODE_KEYS` of ``codes`` to a compressed ``.npz`` that :func:`load_codes` reads (atomically)."""
    arrays = {k: torch.as_tensor(codes[k]).cpu().numpy() for k in CODE_KEYS}
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))

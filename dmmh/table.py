"""``dmmh table``: the paper's table — fit + test for datasets × code lengths × encoders × seeds.

Each *cell* (one dataset, code length, encoder and seed) is one ``dmmh fit`` and one
``dmmh test`` of a config file, run in this process through LightningCLI, so a cell trains
exactly as ``dmmh fit -c CONFIG`` would. The config of dataset ``D`` at ``B`` bits is
``<configs>/D/dmmh_B.yaml`` (the packaged configs by default: ``mirflickr``, ``nuswide``,
``coco``, ``uci_mfeat``); the cell sets the encoder (``--model.encoder``), the seed (of
``seed_everything`` and of the training shuffle) and the data root, plus any ``overrides``.
The test uses the checkpoint with the best ``val/mAP`` (the configs' protocol: validation on
held-out training items), or the last epoch when the run did not validate.

Resumable: a cell's result is ``out/cells/<cell>-<spec hash>/result.json``, written atomically
with a checksum of its content and the full spec of the cell (config text, root, overrides);
a cell whose result verifies against the planned spec is skipped, so a second invocation with
the same settings recomputes nothing, and changed settings (another config, ``--quick``) make
new cells. A cell killed during training resumes from the ``last.ckpt`` its run saved after
each epoch (its result is then not bit-identical to an uninterrupted run: dropout draws differ).

Outputs (rewritten atomically after every run, see :func:`~dmmh.table_outputs.write_outputs`):
``table.md``, ``table.csv``, ``table.json`` and ``map_vs_bits.png`` — mean ± sample standard
deviation of test mAP over seeds per cell, the protocol, time per cell, dmmh version and git
commit, and the published reference rows of :data:`~dmmh.table_outputs.PUBLISHED`.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from dmmh._io import atomic_write
from dmmh.table_outputs import PUBLISHED, environment, write_outputs

__all__ = ["Cell", "plan", "cell_spec", "run_table", "run_cell", "verify_result", "write_outputs", "PUBLISHED",
           "QUICK_OVERRIDES", "CONFIG_DIR"]

CONFIG_DIR = Path(__file__).parent / "configs"
QUICK_OVERRIDES = ("trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1", "trainer.num_sanity_val_steps=0")


@dataclass(frozen=True)
class Cell:
    """One table cell: a dataset (a config family), a code length, an encoder, a seed."""

    dataset: str
    n_bits: int
    encoder: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.dataset}-{self.n_bits}bit-{self.encoder}-seed{self.seed}"


def plan(datasets: Sequence[str], bits: Sequence[int], encoders: Sequence[str], seeds: Sequence[int]) -> list[Cell]:
    """Every combination, datasets outermost; duplicates are an error."""
    for what, values in (("datasets", datasets), ("bits", bits), ("encoders", encoders), ("seeds", seeds)):
        if not values:
            raise ValueError(f"dmmh table: no {what} given")
        if len(set(values)) != len(values):
            raise ValueError(f"dmmh table: {what} repeat a value: {list(values)}")
    return [Cell(d, int(b), e, int(s)) for d in datasets for b in bits for e in encoders for s in seeds]


def config_path(cell: Cell, config_dir: str | Path | None = None) -> Path:
    """``<config_dir>/<dataset>/dmmh_<bits>.yaml`` (the packaged configs by default)."""
    folder = Path(config_dir) if config_dir is not None else CONFIG_DIR
    path = folder / cell.dataset / f"dmmh_{cell.n_bits}.yaml"
    if not path.is_file():
        have = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise FileNotFoundError(f"dmmh table: no config {path} for {cell.dataset} at {cell.n_bits} bits "
                                f"(config families in {folder}: {', '.join(have) or 'none'})")
    return path


def cell_spec(cell: Cell, root: str | None, overrides: Sequence[str] = (), config_dir: str | Path | None = None) -> dict:
    """What determines a cell's result (its checksum names the cell's folder): the cell, the
    config's text (by checksum), the data root (path and file sizes) and the overrides."""
    path = config_path(cell, config_dir)
    return {"cell": asdict(cell), "config": f"{cell.dataset}/{path.name}",
            "config_dir": None if config_dir is None else str(Path(config_dir).resolve()),
            "config_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "root": None if root is None else str(Path(root).resolve()), "root_sizes": _sizes(root),
            "overrides": list(overrides)}


def _sizes(root: str | None) -> dict[str, int] | None:
    """Byte sizes of the root file, or of the files directly in the root folder (a cheap fingerprint)."""
    if root is None:
        return None
    path = Path(root)
    if not path.exists():
        raise FileNotFoundError(f"dmmh table: data root {root} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {p.name: p.stat().st_size for p in files}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def cell_dir(out: str | Path, spec: dict) -> Path:
    return Path(out) / "cells" / f"{Cell(**spec['cell']).name}-{_digest(spec)[:10]}"


def verify_result(path: Path, spec: dict) -> dict | None:
    """The stored result if ``path`` holds one for ``spec`` whose checksum matches, else ``None``."""
    try:
        result = json.loads(path.read_text())
        body = {k: v for k, v in result.items() if k != "sha256"}
        ok = (result.get("sha256") == _digest(body) and result.get("spec") == spec
              and isinstance(result.get("test_mAP"), float) and 0 <= result["test_mAP"] <= 1)
    except (OSError, ValueError, AttributeError):
        return None
    return result if ok else None


@contextlib.contextmanager
def _cell_context(threads: int | None):
    """Torch threads and Lightning's console chatter for the duration of a cell, then restored."""
    import torch

    previous = torch.get_num_threads()
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    try:
        if threads:
            torch.set_num_threads(threads)
        for lg in loggers:
            lg.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            yield
    finally:
        torch.set_num_threads(previous)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def run_cell(spec: dict, folder: Path, threads: int | None = None, env: dict | None = None) -> dict:
    """Fit and test one cell in this process (see the module docs); returns its result record.
    ``env``: :func:`~dmmh.table_outputs.environment` as of the start of the run (default: now)."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from dmmh.cli import cli

    cell = Cell(**spec["cell"])
    config = (Path(spec["config_dir"]) if spec["config_dir"] else CONFIG_DIR) / spec["config"]
    args = ["-c", str(config), f"--seed_everything={cell.seed}", f"--model.encoder={cell.encoder}",
            f"--data.init_args.seed={cell.seed}", f"--trainer.default_root_dir={folder}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if spec["root"] is not None:
        args.append(f"--data.init_args.root={spec['root']}")
    args += [f"--{o}" for o in spec["overrides"]]
    lasts = sorted(folder.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    resume = str(lasts[-1]) if lasts else None
    with _cell_context(threads):
        try:
            run = cli(args, run=False)
        except SystemExit as exc:  # jsonargparse printed why to stderr
            raise ValueError(f"LightningCLI rejected the cell's settings (exit status {exc.code}; its message is "
                             f"above): dmmh fit {' '.join(args)}") from None
        trainer, model, data = run.trainer, run.model, run.datamodule
        start = time.perf_counter()
        trainer.fit(model, datamodule=data, ckpt_path=resume, weights_only=True)
        fit_seconds = time.perf_counter() - start
        best = next((cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor), None)
        best_path = best.best_model_path if best is not None and best.best_model_path else None
        start = time.perf_counter()
        trainer.test(model, datamodule=data, ckpt_path=best_path, verbose=False, weights_only=True)
        test_seconds = time.perf_counter() - start
        test_map = float(trainer.callback_metrics["test/mAP"])
    best_epoch = best_score = None
    if best_path:  # read from the checkpoint: a resumed run's callback does not reload the score
        saved = torch.load(best_path, map_location="cpu", weights_only=True)
        best_epoch, best_score = saved["epoch"], saved.get("callbacks", {}).get(best.state_key, {}).get("best_model_score")
    h = model.hparams
    return {
        "spec": spec, "test_mAP": test_map, "best_val_mAP": None if best_score is None else float(best_score),
        "tested": f"best val/mAP checkpoint (after epoch {best_epoch + 1} of {trainer.current_epoch})" if best_path
        else "last epoch (no validation ran)",
        "validation": data.validation, "epochs": int(trainer.current_epoch), "resumed_from": resume,
        "items": {role: data.num_items(role) for role in ("fit", "val_query", "val_database", "query", "database")}
        if data.val_split != 0 else {role: data.num_items(role) for role in ("fit", "query", "database")},
        "map": {"top_k": h.get("map_top_k"), "empty": h.get("map_empty", "zero"), "normalizer": h.get("map_normalizer", "retrieved")},
        "fit_seconds": fit_seconds, "test_seconds": test_seconds,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env or environment(threads),
    }


def run_table(out: str | Path, datasets: Mapping[str, str | None], bits: Sequence[int], encoders: Sequence[str],
              seeds: Sequence[int], quick: bool = False, overrides: Sequence[str] = (),
              config_dir: str | Path | None = None, threads: int | None = None, plots: bool = True,
              log: Callable[[str], None] | None = None) -> dict:
    """Run (or reuse) every cell and write the table; ``datasets`` maps a config family to its
    data root (``None`` for data the DataModule finds itself, e.g. ``uci_mfeat``). Returns
    ``{"outputs": {name: path}, "computed": [...], "reused": [...], "failed": {cell: error}}``.
    ``quick`` adds :data:`QUICK_OVERRIDES` (a smoke run: 2 epochs, marked as such)."""
    if plots:
        from dmmh._optional import require

        require("matplotlib", "dmmh table's map_vs_bits.png (or pass plots=False / --no-plot)")
    say = log or (lambda message: None)
    out = Path(out)
    overrides = [*(QUICK_OVERRIDES if quick else ()), *overrides]
    cells = plan(list(datasets), bits, encoders, seeds)
    specs = [cell_spec(c, datasets[c.dataset], overrides, config_dir) for c in cells]  # config errors before any work
    env = environment(threads)  # the code this process runs (the checkout may change during a long run)
    results, status = [], {"computed": [], "reused": [], "failed": {}}
    for i, (cell, spec) in enumerate(zip(cells, specs), 1):
        folder = cell_dir(out, spec)
        path = folder / "result.json"
        result = verify_result(path, spec)
        if result is not None:
            status["reused"].append(cell.name)
            say(f"[{i}/{len(cells)}] {cell.name}: reused {path} (test mAP {result['test_mAP']:.4f})")
        else:
            if path.exists():
                say(f"[{i}/{len(cells)}] {cell.name}: {path} does not verify against this cell's spec; recomputing")
            say(f"[{i}/{len(cells)}] {cell.name}: fit + test ...")
            try:
                result = run_cell(spec, folder, threads, env)
            except Exception as exc:  # one broken cell must not lose the others; the run reports it
                status["failed"][cell.name] = f"{type(exc).__name__}: {exc}"
                atomic_write(folder / "error.txt", traceback.format_exc().encode())
                say(f"[{i}/{len(cells)}] {cell.name}: FAILED ({type(exc).__name__}: {exc}); traceback in {folder / 'error.txt'}")
                continue
            result["sha256"] = _digest(result)
            atomic_write(path, json.dumps(result, indent=1, sort_keys=True).encode())
            status["computed"].append(cell.name)
            say(f"[{i}/{len(cells)}] {cell.name}: test mAP {result['test_mAP']:.4f} "
                f"({result['fit_seconds'] + result['test_seconds']:.0f} s; {result['tested']})")
        results.append(result)
    status["outputs"] = write_outputs(out, cells, results, quick=quick, overrides=overrides, failed=status["failed"],
                                      threads=threads, plots=plots)
    return status

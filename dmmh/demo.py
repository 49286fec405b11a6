"""``make demo`` / ``python -m dmmh.demo``: the main job on embedded real data, no download.

Trains DMMH (through Lightning, as ``dmmh fit`` does) on the UCI Multiple Features digits
(:class:`~dmmh.data.uci.UCIMultipleFeatures`: ``pix`` as image, ``fou`` as text, z-scored) at
16, 32 and 64 bits, and prints mAP@all of each code length next to two unsupervised baselines
computed in the same run on the same split and features (concatenated image + text):
random-projection LSH and PCA-ITQ (:mod:`dmmh.hashing.baselines`), plus the time taken.
``--quick`` trains fewer epochs (the test uses it).
"""

from __future__ import annotations

import argparse
import logging
import platform
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = ["DemoResult", "DEMO_MODEL", "run_demo", "format_table", "main"]

# The demo's model: every argument is DMMHModule's; chosen to train in seconds on 2 CPU cores.
DEMO_MODEL: dict[str, Any] = {
    "encoder": "mamba",
    "encoder_kwargs": {"hidden": [256], "dropout": 0.1, "depth": 1},
    "dim": 32,
    "fusion": "cnn_deep",
    "head": "tanh",
    "lr": 1e-3,
}
EPOCHS, QUICK_EPOCHS = 30, 6


@dataclass
class DemoResult:
    n_bits: int
    dmmh: float
    pca_itq: float
    lsh: float
    train_seconds: float


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in ("does not have many workers", "but have no `val_dataloader`", "treespec"):
        warnings.filterwarnings("ignore", message=f".*{message}.*")


def _map(query: np.ndarray | torch.Tensor, database: np.ndarray | torch.Tensor, yq: torch.Tensor, ydb: torch.Tensor) -> float:
    from dmmh.metrics import mean_average_precision

    return mean_average_precision(torch.as_tensor(query), torch.as_tensor(database), yq, ydb)


def run_demo(
    bits: Sequence[int] = (16, 32, 64),
    epochs: int = EPOCHS,
    seed: int = 0,
    device: str = "cpu",
    model: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    threads: int | None = 1,
) -> list[DemoResult]:
    """Train and evaluate DMMH and the two baselines at each code length in ``bits``.

    ``threads``: torch CPU threads during the run (restored after; ``None`` keeps torch's
    choice). One is the default: the steps are tiny, and on the loaded, shared 2-core machine this
    was written on, a 6-epoch 64-bit run took 19 s with two threads and 1.2 s with one."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run(bits, epochs, seed, device, model or DEMO_MODEL, log)
    finally:
        torch.set_num_threads(previous)


def _run(bits: Sequence[int], epochs: int, seed: int, device: str, model: dict[str, Any], log: Callable[[str], None] | None) -> list[DemoResult]:
    import lightning as L

    from dmmh.data.uci import UCIMultipleFeatures
    from dmmh.hashing.baselines import PCAITQ, RandomProjectionLSH
    from dmmh.models import DMMHModule

    _quiet_lightning()
    data = UCIMultipleFeatures(seed=seed, val_split=0)  # no validation: train on all 1,000 training digits
    s = data.splits
    yq, ydb = torch.from_numpy(s["query"].label), torch.from_numpy(s["database"].label)
    concat = {k: np.hstack([v.image, v.text]) for k, v in s.items()}
    results = []
    for n_bits in bits:
        L.seed_everything(seed, verbose=False)
        module = DMMHModule(data.image_dim, data.text_dim, data.num_classes, n_bits=n_bits, **model)
        trainer = L.Trainer(
            accelerator=device, devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(module, train_dataloaders=data.train_dataloader())
        seconds = time.perf_counter() - start
        module = module.cpu()
        codes = {k: module.encode(torch.from_numpy(s[k].image), torch.from_numpy(s[k].text)) for k in ("query", "database")}
        lsh = RandomProjectionLSH(n_bits, seed=seed).fit(concat["train"])
        itq = PCAITQ(n_bits, seed=seed).fit(concat["train"])
        results.append(DemoResult(
            n_bits,
            _map(codes["query"], codes["database"], yq, ydb),
            _map(itq.encode(concat["query"]), itq.encode(concat["database"]), yq, ydb),
            _map(lsh.encode(concat["query"]), lsh.encode(concat["database"]), yq, ydb),
            seconds,
        ))
        if log:
            r = results[-1]
            log(f"  {n_bits} bits: DMMH {r.dmmh:.4f}, PCA-ITQ {r.pca_itq:.4f}, LSH {r.lsh:.4f} ({seconds:.1f} s)")
    return results


def format_table(results: Sequence[DemoResult], epochs: int, model: dict[str, Any], total_seconds: float, threads: int = 1) -> str:
    from dmmh.data.uci import UCIMultipleFeatures

    s = UCIMultipleFeatures().splits
    settings = ", ".join(f"{k}={v}" for k, v in model.items())
    lines = [
        "DMMH demo: UCI Multiple Features digits (embedded, CC BY 4.0), 10 classes",
        f"  modalities: pix {s['train'].image.shape[1]}-D as image, fou {s['train'].text.shape[1]}-D as text (z-scored)",
        f"  split: {len(s['train'])} train (within the database), {len(s['query'])} queries, {len(s['database'])} database",
        f"  DMMH: {settings}, epochs={epochs}, batch=128, losses=classification+pairwise+0.1*quantization",
        "  baselines on [image, text] concatenated, fitted on train: PCA-ITQ (50 iterations), random-projection LSH",
        "",
        "  bits | DMMH mAP@all | PCA-ITQ mAP@all | LSH mAP@all | DMMH train (s)",
        "  -----+--------------+-----------------+-------------+---------------",
    ]
    for r in results:
        lines.append(f"  {r.n_bits:>4} | {r.dmmh:>12.4f} | {r.pca_itq:>15.4f} | {r.lsh:>11.4f} | {r.train_seconds:>14.1f}")
    lines += [
        "",
        f"  total time {total_seconds:.1f} s on {platform.machine()} CPU, {threads} torch thread(s), "
        f"torch {torch.__version__}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[DemoResult]:
    parser = argparse.ArgumentParser(prog="python -m dmmh.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64], help="code lengths (default 16 32 64)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {EPOCHS}, {QUICK_EPOCHS} with --quick)")
    parser.add_argument("--quick", action="store_true", help="a shortened run")
    parser.add_argument("--encoder", default=DEMO_MODEL["encoder"], help="DMMH encoder name (default mamba)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0: torch's choice)")
    args = parser.parse_args(argv)
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else EPOCHS)
    model = {**DEMO_MODEL, "encoder": args.encoder}
    if args.encoder != DEMO_MODEL["encoder"]:
        model.pop("encoder_kwargs")  # those are the Mamba encoder's
    start = time.perf_counter()
    print(f"training DMMH at {', '.join(map(str, args.bits))} bits for {epochs} epochs ...", flush=True)
    results = run_demo(args.bits, epochs, args.seed, args.device, model, lambda m: print(m, flush=True), args.threads or None)
    print()
    print(format_table(results, epochs, model, time.perf_counter() - start, args.threads or torch.get_num_threads()))
    return results


if __name__ == "__main__":  # pragma: no cover
    main()

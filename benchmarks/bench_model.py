"""Encoding and training speed of the default DMMH model on the CPU, as a fraction of the machine's GEMM rate.

    python benchmarks/bench_model.py [--device cpu|cuda] [--bits 16 64 128] [--batch 256] [--train-batch 256] [--repeats 5] [--out DIR]

In this one process, for each encoder (the default ``mamba``; ``transformer`` too when registered, at the
same width), code length, precision (fp32; bf16 under ``torch.autocast``) and thread count (1 and torch's
default): items/s of ``DMMH.encode`` on ``--batch`` items (eval mode) and of one training step on
``--train-batch`` items (``DMMHModule``'s forward, default loss, backward, Adam step); FLOPs per item from
``torch.utils.flop_counter.FlopCounterMode`` (matrix products and convolutions: the selective scan's
elementwise work counts as zero); the achieved GFLOP/s; and their ratio to the fp32 GEMM rate
(2048 x 2048 x 2048 ``matmul``) measured in the same process at the same thread count. Each time is the
median of ``--repeats`` after a warm-up, the thread counts taking turns so that load drift hits both.
Inputs are random features of the standard widths (4096-D image, 1386-D text).

Then the checks of issue 13 (64 bits, fp32, default threads: encoding >= 50 % and training >= 30 % of the
GEMM rate; default threads >= 1.0x one thread for both), and bf16's agreement with fp32 on a trained model:
the default model at 64 bits trained briefly (fp32) on the embedded UCI digits, its query and database
codes encoded in fp32 and in bf16 (fraction of equal bits, mAP of each), and the same model trained
with ``precision="bf16-mixed"``. Writes ``<out>/model_<device>.txt`` (default ``benchmarks/results``).

With ``--device cuda`` the same on the GPU (one row per precision instead of per thread count; the GEMM is
8192^3, fp32 without TF32 as torch's default; bf16 under ``torch.autocast("cuda")``), without the CPU checks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import time
import warnings

import torch
from _report import Report
from torch.utils.flop_counter import FlopCounterMode

import dmmh
from dmmh.data.uci import UCIMultipleFeatures
from dmmh.metrics import mean_average_precision

IMAGE_DIM, TEXT_DIM, CLASSES = 4096, 1386, 24
PRECISIONS = ("fp32", "bf16")


DEVICE = "cpu"


def precision(name: str):
    return torch.autocast(DEVICE, dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def interleaved_medians(fns: dict, threads: tuple[int, ...], repeats: int) -> dict:
    """Median seconds of each ``fns[name]`` at each thread count; thread counts and functions take turns."""
    times: dict = {(name, t): [] for name in fns for t in threads}
    for r in range(repeats + 1):  # the first round warms up
        for t in threads:
            torch.set_num_threads(t)
            for name, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                if r:
                    times[name, t].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def gemm_rates(threads: tuple[int, ...], repeats: int) -> dict[int, float]:
    n = 8192 if DEVICE == "cuda" else 2048
    a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
    t = interleaved_medians({"gemm": lambda: a @ b}, threads, repeats)
    return {th: 2 * n**3 / t["gemm", th] / 1e9 for th in threads}


def model_rows(rep: Report, encoder: str, bits: int, args, threads: tuple[int, ...]) -> dict:
    """One encoder at one code length: every precision and thread count. Returns {(kind, prec, threads): (items/s, ratio)}."""
    torch.manual_seed(0)
    module = dmmh.DMMHModule(image_dim=IMAGE_DIM, text_dim=TEXT_DIM, n_classes=CLASSES, n_bits=bits, encoder=encoder).to(DEVICE)
    module.log = lambda *a, **k: None  # training_step logs; no trainer here
    opt = module.configure_optimizers()
    x, y = torch.randn(args.batch, IMAGE_DIM, device=DEVICE), torch.randn(args.batch, TEXT_DIM, device=DEVICE)
    tb = {"image": torch.randn(args.train_batch, IMAGE_DIM, device=DEVICE),
          "text": torch.randn(args.train_batch, TEXT_DIM, device=DEVICE),
          "label": (torch.rand(args.train_batch, CLASSES, device=DEVICE) < 0.1).float()}

    def train_step():
        module.train()
        opt.zero_grad(set_to_none=True)
        module.training_step(tb, 0).backward()
        opt.step()

    def encode():
        module.eval()
        return module.model.encode(x, y)

    out = {}
    for prec in PRECISIONS:
        with precision(prec):
            fl = {"encode": flops(encode) / args.batch, "train": flops(train_step) / args.train_batch}
            # each workload timed on its own (a training step between two encodes would leave the allocator
            # and caches in a state no encoding job sees), the thread counts taking turns
            t = {**interleaved_medians({"encode": encode}, threads, args.repeats),
                 **interleaved_medians({"train": train_step}, threads, args.repeats)}
        for th in threads:
            cells = []
            for kind, n in (("encode", args.batch), ("train", args.train_batch)):
                rate = n / t[kind, th]
                gflops = rate * fl[kind] / 1e9
                ratio = gflops / args.gemm[th]
                out[kind, prec, th] = (rate, ratio)
                cells.append(f"{rate:9.0f} {fl[kind] / 1e6:7.1f} {gflops:7.1f} {ratio * 100:6.1f}%")
            rep(f"{encoder:<11} {bits:>4} {prec:<5} {th:>7}  | " + "  | ".join(cells))
    return out


def checks(rep: Report, res: dict, default: int, gemm: dict[int, float]) -> None:
    rep("")
    rep(f"# {default}-thread GEMM ran at {gemm[default] / gemm[1]:.2f}x the 1-thread rate; against {default} x the 1-thread "
        f"rate, {default}-thread encoding reaches {res['encode', 'fp32', default][1] * gemm[default] / (default * gemm[1]) * 100:.1f}%, "
        f"training {res['train', 'fp32', default][1] * gemm[default] / (default * gemm[1]) * 100:.1f}%")
    rep("# issue 13 must-show (mamba, 64 bits, fp32):")
    for kind, target in (("encode", 0.50), ("train", 0.30)):
        rate, ratio = res[kind, "fp32", default]
        rate1, _ = res[kind, "fp32", 1]
        rep(f"#   {kind:<6} {default} threads: {ratio * 100:5.1f}% of the GEMM rate (target {target * 100:.0f}%): "
            f"{'ok' if ratio >= target else 'MISSED'};  {default} threads / 1 thread = {rate / rate1:.2f}x (target 1.0x): "
            f"{'ok' if rate >= rate1 else 'MISSED'}")


def agreement(rep: Report, epochs: int) -> None:
    """bf16 against fp32 codes of the default 64-bit model trained briefly on the embedded UCI digits."""
    import lightning as L

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|treespec|no `val_dataloader`).*")
    data = UCIMultipleFeatures()
    data.setup("fit")
    q, db = data.splits["query"], data.splits["database"]
    tensors = lambda s: (torch.from_numpy(s.image), torch.from_numpy(s.text), torch.from_numpy(s.label))  # noqa: E731
    (qi, qt, ql), (di, dt, dl) = tensors(q), tensors(db)
    rep("")
    rep(f"# bf16 vs fp32 codes: default model, 64 bits, trained {epochs} epochs on the embedded UCI digits "
        f"({len(data.splits['train'])} train, {len(q)} query, {len(db)} database; pix as image, fou as text)")
    for train_precision in ("32-true", "bf16-mixed"):
        L.seed_everything(0, verbose=False)
        module = dmmh.DMMHModule(image_dim=data.image_dim, text_dim=data.text_dim, n_classes=data.num_classes, n_bits=64)
        trainer = L.Trainer(max_epochs=epochs, accelerator=DEVICE, devices=1, precision=train_precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        start = time.perf_counter()
        trainer.fit(module, data)
        seconds = time.perf_counter() - start
        codes = {}
        module.to(DEVICE)
        for prec in PRECISIONS:
            with precision(prec):
                codes[prec] = (module.encode(qi.to(DEVICE), qt.to(DEVICE)).cpu(), module.encode(di.to(DEVICE), dt.to(DEVICE)).cpu())
        same = torch.cat([(codes["fp32"][i] == codes["bf16"][i]).flatten() for i in (0, 1)]).float().mean().item()
        maps = {prec: mean_average_precision(c[0], c[1], ql, dl) for prec, c in codes.items()}
        rep(f"#   trained {train_precision:<10} ({seconds:5.1f} s): bits equal in fp32 and bf16 encoding {same * 100:6.2f}%;  "
            f"mAP@all fp32 codes {maps['fp32']:.4f}, bf16 codes {maps['bf16']:.4f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bits", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--batch", type=int, default=256, help="items per encode call")
    p.add_argument("--train-batch", type=int, default=256, help="items per training step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--encoders", nargs="+", default=None, help="default: mamba, and transformer when registered")
    p.add_argument("--agreement-epochs", type=int, default=10, help="0 skips the bf16 agreement part")
    p.add_argument("--out", default=None, help="folder for model_<device>.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    default = torch.get_num_threads()
    threads = (1, default) if default > 1 and DEVICE == "cpu" else (default,)
    encoders = args.encoders or ["mamba"] + (["transformer"] if "transformer" in dmmh.list_encoders() else [])
    rep = Report("model", DEVICE, args.out, f"DMMH encode and train-step speed vs the fp32 GEMM rate; median of {args.repeats}")
    if hasattr(os, "getloadavg"):
        rep(f"# load average at start: {os.getloadavg()[0]:.1f}; batch {args.batch} (encode), {args.train_batch} (train)")
    if args.encoders is None and "transformer" not in encoders:
        rep("# the 'transformer' encoder is not registered in this build: no transformer rows")
    args.gemm = gemm_rates(threads, args.repeats)
    rep(f"# fp32 GEMM {8192 if DEVICE == 'cuda' else 2048}^3: " + ", ".join(f"{g:.1f} GFLOP/s with {t} thread{'s' * (t > 1)}" for t, g in args.gemm.items()))
    rep(f"{'encoder':<11} {'bits':>4} {'prec':<5} {'threads':>7}  | {'encode/s':>9} {'MFLOP':>7} {'GFLOP/s':>7} {'%GEMM':>7}"
        f"  | {'train/s':>9} {'MFLOP':>7} {'GFLOP/s':>7} {'%GEMM':>7}")
    start = time.perf_counter()
    results = {}
    for encoder in encoders:
        for bits in args.bits:
            results[encoder, bits] = model_rows(rep, encoder, bits, args, threads)
    torch.set_num_threads(default)
    if ("mamba", 64) in results and len(threads) > 1:
        checks(rep, results["mamba", 64], default, args.gemm)
    if args.agreement_epochs:
        agreement(rep, args.agreement_epochs)
    rep(f"# whole run: {time.perf_counter() - start:.0f} s")
    rep.save()


if __name__ == "__main__":
    main()

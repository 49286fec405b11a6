"""``dmmh prepare`` throughput on a generated MIR-Flickr-layout release, against a plain loop.

    python benchmarks/bench_prepare.py [--images 2000] [--features vgg19] [--device cpu|cuda]
                                       [--batch-size 32] [--num-workers 0] [--baseline-images 128] [--repeats 3]
                                       [--work DIR] [--out DIR]

Generates (once, in ``--work``) a miniature MIR-Flickr25K release in the official layout whose
recipe keeps ``--images`` items (the fixture's rules drop a third of the images: unlabelled or
untagged), with 500x375 JPEGs like Flickr's. Times, in one process: the recipe (parsing the tag
and annotation files); ``prepare()`` end to end on all ``--images`` items (recipe, image
decoding, features through the resumable chunk store, the .mat file and manifest); then, on the
``--baseline-images`` items of a second generated release, ``prepare()`` against the baseline, a plain
loop (PIL decode + the backbone's transform + forward in batches of ``--batch-size``, no chunk
store), interleaved ``--repeats`` times (medians). Features: ``vgg19`` with random weights (the
network's speed does not depend on its weights). Writes ``<out>/prepare_<device>.txt``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import Report, median_times

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _raw_releases  # noqa: E402  (the test fixture builders)

from dmmh.prepare import SplitSizes, mirflickr, prepare  # noqa: E402
from dmmh.prepare.features import image_features  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="items kept by the recipe (features extracted)")
    p.add_argument("--features", default="vgg19")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--baseline-images", type=int, default=128, help="items of the interleaved comparison")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None, help="folder for the generated release (default: a temporary folder)")
    p.add_argument("--out", default=None, help="folder for prepare_<device>.txt (default benchmarks/results)")
    args = p.parse_args(argv)
    kind = args.device.split(":")[0]
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_prepare_"))
    n_images, raw = _release(work, args.images)
    sub_images, sub_raw = _release(work, args.baseline_images)
    rep = Report("prepare", kind, args.out, f"dmmh prepare mirflickr on a generated release: {n_images} images "
                 f"(500x375 JPEG), {args.features} features at 224x224, batch {args.batch_size}, "
                 f"{args.num_workers} loader workers, "
                 f"{torch.get_num_threads()} torch threads")
    feats = image_features(args.features, weights="random") if args.features == "vgg19" else image_features(args.features)

    t = time.perf_counter()
    recipe = mirflickr.read(raw, n_images=n_images, min_tag_count=3)
    t_recipe = time.perf_counter() - t
    kept = len(recipe)
    rep(f"recipe (parse {n_images} tag files + 24 annotation lists): {t_recipe:.2f} s, {kept} items kept")

    out = work / "mir.mat"
    for leftover in (out, Path(f"{out}.manifest.json")):
        leftover.unlink(missing_ok=True)
    t = time.perf_counter()
    prepare("mirflickr", raw, out, feats, split_sizes=SplitSizes(query=kept // 10, database=None, train=kept // 4),
            recipe_params={"n_images": n_images, "min_tag_count": 3}, batch_size=args.batch_size, chunk_size=256,
            num_workers=args.num_workers, device=args.device, progress=False)
    t_prepare = time.perf_counter() - t
    rate = kept / (t_prepare - t_recipe)
    rep(f"prepare() end to end: {t_prepare:.1f} s; {kept} images: {rate:.2f} images/s (excluding the recipe)")

    # prepare() against a plain loop on the same first images, interleaved (load drift hits both alike)
    sub = mirflickr.read(sub_raw, n_images=sub_images, min_tag_count=3)
    paths = [sub_raw / rel for rel in sub.images]
    model = feats.to(args.device).eval()

    def plain_loop():
        from PIL import Image

        with torch.inference_mode():
            for start in range(0, len(paths), args.batch_size):
                batch = [feats.transform(Image.open(q).convert("RGB")) for q in paths[start : start + args.batch_size]]
                model(torch.stack(batch).to(args.device)).cpu()

    def prepare_subset():
        prepare("mirflickr", sub_raw, work / "sub.mat", feats, split_sizes=SplitSizes(len(sub) // 10, None, len(sub) // 4),
                recipe_params={"n_images": sub_images, "min_tag_count": 3}, batch_size=args.batch_size, chunk_size=256,
                num_workers=args.num_workers, device=args.device, progress=False, overwrite=True)

    times = median_times({"prepare()": prepare_subset, "plain loop": plain_loop}, args.repeats, kind, warmup=0)
    rep(f"same {len(sub)} images, median of {args.repeats} interleaved runs:")
    for name, t in times.items():
        rep(f"  {name:<11} {len(sub) / t:6.2f} images/s  ({t:.1f} s)")
    rep(f"  prepare() / plain loop: {times['plain loop'] / times['prepare()']:.2f}x (prepare() also parses the "
        f"recipe, writes chunks, the .mat file and the manifest)")
    rep.save()


def _release(work: Path, kept: int) -> tuple[int, Path]:
    """A generated release (made once under ``work``) whose recipe keeps ``kept`` items."""
    n_images = math.ceil(kept * 30 / 20)  # the fixture keeps 20 of every 30 images
    raw = work / f"mirflickr_{n_images}"
    if not (raw / "mirflickr" / "doc" / "common_tags.txt").exists():
        shutil.rmtree(raw, ignore_errors=True)
        t = time.perf_counter()
        _raw_releases.make_mirflickr(raw, np.random.default_rng(0), n_images=n_images, image_size=(500, 375))
        print(f"# generated {n_images} images in {time.perf_counter() - t:.1f} s under {raw}", flush=True)
    return n_images, raw


if __name__ == "__main__":
    main()

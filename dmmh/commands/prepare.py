"""``dmmh prepare``: a benchmark file from an official raw release (:func:`dmmh.prepare.prepare`),
or ``--check FILE`` against its manifest (:func:`dmmh.prepare.check`). Bad input (raw files,
missing images, split sizes, a file unlike its manifest, a busy chunk folder) ends with one
message naming the problem, not a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmmh._optional import require_all
from dmmh.chunks import ChunkStoreBusy


def main(argv: list[str] | None = None) -> None:
    """``dmmh prepare``: see the module docs and ``dmmh prepare --help``."""
    p = argparse.ArgumentParser(
        prog="dmmh prepare", description="Build a benchmark file (BSTH key layout: .mat v7.3, .npz or .safetensors, "
        "by the suffix of --out) from the dataset's official release, with a manifest beside it; or --check one.",
        epilog="Recipes, downloads, expected counts: docs/data.md. Example: dmmh prepare mirflickr --raw "
               "/data/mirflickr25k --out mir_cnn_twt.mat --weights vgg19-dcbb9e9d.pth")
    p.add_argument("dataset", nargs="?", choices=("mirflickr", "nuswide", "coco"))
    p.add_argument("--raw", help="folder holding the official release, unpacked")
    p.add_argument("--out", help="output file: .mat (MATLAB v7.3), .npz or .safetensors")
    p.add_argument("--check", metavar="FILE", help="verify FILE against FILE.manifest.json and exit")
    p.add_argument("--image-features", default="vgg19", help="vgg19 (fc7, 4096-D) or clip:<model>[@<checkpoint or tag>]")
    p.add_argument("--weights", help="vgg19 weights file (default: torchvision's cache, vgg19-dcbb9e9d.pth)")
    p.add_argument("--model-config", help="open_clip architecture JSON registered as the clip:<model> name")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--query", type=int, help="queries (default: the published count)")
    p.add_argument("--database", help="database items, or 'rest' (default: the published count)")
    p.add_argument("--train", type=int, help="train items, drawn from the database (default: the published count)")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe parameter (JSON value), e.g. require_text=true or min_tag_count=20; repeatable")
    p.add_argument("--missing-images", default="error", choices=("error", "drop"),
                   help="items whose image file is missing: stop with an error, or drop them (listed either way)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (the device type when --devices > 1)")
    p.add_argument("--devices", type=int, default=1, help="processes per node (Lightning), each a disjoint share")
    p.add_argument("--strategy", default="auto", help="Lightning strategy for --devices > 1, e.g. ddp")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024, help="images per cached chunk (the unit of resumption)")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding processes per device")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    try:
        _run(p, a)
    except (ValueError, FileNotFoundError, FileExistsError, ChunkStoreBusy) as exc:  # bad input: one message
        sys.exit(f"dmmh prepare: {exc}")


def _run(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    from dmmh.prepare import check, prepare

    if a.check:
        manifest = check(a.check)
        sizes = manifest["splits"]["sizes"]
        print(f"{a.check}: matches its manifest ({manifest['dataset']}, {manifest['output']['format']}, "
              f"query {sizes['query']} / database {sizes['database']} / train {sizes['train']}, "
              f"image features {manifest['image_features']['name']})")
        return
    if not (a.dataset and a.raw and a.out):
        p.error("give a dataset, --raw and --out (or --check FILE)")
    needs = (["open_clip"] if a.image_features.startswith("clip:") else ["torchvision"]) + ["PIL"]
    needs += ["safetensors"] * a.out.endswith(".safetensors")
    require_all(needs, "building benchmark files")  # every missing package named at once, before any work
    config = json.loads(Path(a.model_config).read_text()) if a.model_config else None
    params = {}
    for item in a.recipe:
        key, eq, value = item.partition("=")
        if not eq or not key:
            p.error(f"--recipe takes KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    from dmmh.prepare import DATASETS, SplitSizes

    published = DATASETS[a.dataset].split_sizes
    database = published.database if a.database is None else None if a.database == "rest" else int(a.database)
    sizes = SplitSizes(published.query if a.query is None else a.query, database,
                       published.train if a.train is None else a.train)
    out = prepare(a.dataset, a.raw, a.out, a.image_features, weights=a.weights, model_config=config, seed=a.seed,
                  split_sizes=sizes, recipe_params=params,
                  missing_images=a.missing_images, overwrite=a.overwrite, batch_size=a.batch_size,
                  chunk_size=a.chunk_size, num_workers=a.num_workers, device=a.device, devices=a.devices,
                  strategy=a.strategy, num_nodes=a.num_nodes, progress=not a.no_progress)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:
        print(f"wrote {out} and {out.name}.manifest.json", file=sys.stdout)

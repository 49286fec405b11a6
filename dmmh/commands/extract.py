"""``dmmh extract``: open_clip features of image-caption pairs (:func:`dmmh.extract.extract_features`).

The pairs are a folder of images with metadata (``--root``) or a Hugging Face dataset (``--hf``:
a ``save_to_disk`` folder, or a local folder / file ``datasets.load_dataset`` reads)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmmh._optional import require_all
from dmmh.chunks import ChunkStoreBusy
from dmmh.data.pairs import PairsDataModule
from dmmh.extract import extract_features


def _split_map(text: str) -> dict[str, str | None]:
    """``dev=query,extra=none`` as ``{"dev": "query", "extra": None}``."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, split = item.partition("=")
        if not eq or not name.strip():
            raise argparse.ArgumentTypeError(f"{item!r} is not NAME=SPLIT")
        out[name.strip()] = None if split.strip().lower() == "none" else split.strip()
    return out


def main(argv: list[str] | None = None) -> None:
    """``dmmh extract``: see the module docs and ``dmmh extract --help``."""
    p = argparse.ArgumentParser(prog="dmmh extract", description="Extract CLIP features of image-caption pairs into "
                                "the benchmark array format (resumable; refuses to mix backbones).")
    p.add_argument("--root", help="folder of the images (and of metadata.jsonl / metadata.csv); with --hf, the folder "
                   "the dataset's image paths are in")
    p.add_argument("--metadata", help="CSV or JSONL with image, caption[, tags][, split]")
    p.add_argument("--hf", help="a Hugging Face dataset instead: a save_to_disk folder, or a local folder / file that "
                   "datasets.load_dataset reads (needs dmmh[data])")
    p.add_argument("--image-column", help="default: image (else file_name in a metadata file)")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--tags-column", default="tags")
    p.add_argument("--split-column", default="split")
    p.add_argument("--split-map", type=_split_map, metavar="NAME=SPLIT,...",
                   help="other split names as train, database or query (none: leave them out), "
                   "e.g. dev=query,extra=none")
    p.add_argument("--out", required=True, help="output .npz or .safetensors")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--model-config", help="architecture JSON file (open_clip layout) registered as --model")
    p.add_argument("--pretrained", help="local checkpoint path (open_clip tags need the hub)")
    p.add_argument("--labels", default="auto", choices=("auto", "tags", "instance"))
    p.add_argument("--tag-sep", default=",")
    p.add_argument("--num-query", type=float, default=0, help="queries drawn when there is no split column")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-row", default="error", choices=("error", "skip"))
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept image paths that lead outside --root (trusted metadata only)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=1024, help="items per cached chunk (the unit of resumption)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-normalize", action="store_true", help="keep un-normalised CLIP embeddings")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.root is None and a.hf is None:
        p.error("name the pairs: --root FOLDER (images + metadata) or --hf DATASET")
    if a.hf is not None and a.metadata is not None:
        p.error("--metadata names a metadata file under --root; a --hf dataset holds its own")
    needs = ["open_clip"] + ["safetensors"] * a.out.endswith(".safetensors") + ["datasets"] * (a.hf is not None)
    require_all(needs, "extracting CLIP features")  # every missing package named at once, before any work
    from dmmh.encoders.clip import ClipBackbone

    config = json.loads(Path(a.model_config).read_text()) if a.model_config else None
    backbone = ClipBackbone(a.model, a.pretrained, config, normalize=not a.no_normalize)
    data = PairsDataModule(a.root, a.metadata, hf=a.hf, image_column=a.image_column, caption_column=a.caption_column,
                           tags_column=a.tags_column, split_column=a.split_column, split_map=a.split_map,
                           labels=a.labels, tag_sep=a.tag_sep, num_query=a.num_query, seed=a.seed,
                           on_bad_row=a.on_bad_row, transform=backbone.transform, tokenizer=backbone.tokenize,
                           allow_outside_root=a.allow_outside_root)
    try:
        path = extract_features(data, backbone, a.out, a.batch_size, a.chunk_size, a.device, progress=not a.no_progress)
    except ChunkStoreBusy as exc:  # another run writes the same output: say so, without a traceback
        sys.exit(f"dmmh extract: {exc}")
    print(f"wrote {path}")

"""``dmmh search``: query an index written by ``dmmh encode`` (:class:`dmmh.serving.Searcher`).

::

    dmmh search --index runs/pairs.dmmh --caption "a ginger cat"
    dmmh search --index runs/pairs.dmmh --image cat.png --caption "a cat" --k 5   # both modalities
    dmmh search --index runs/mir64.dmmh --item 17 --split query --radius 2 --json
    dmmh search --index runs/mir64.dmmh --features queries.npz

A query is a caption and/or an image (models with CLIP encoders), feature vectors (``.npz`` /
``.safetensors`` with ``image`` and/or ``text`` arrays), or items of the indexed collection by id
(``--split`` another split, ``--modalities`` one of them). Repeat ``--caption`` / ``--image`` /
``--item`` for several queries. Prints rank, Hamming distance and id (and image path and caption
for a pairs collection) of the ``--k`` nearest items, or of those within ``--radius``.
"""

from __future__ import annotations

import argparse
import json
import sys

from dmmh.models.dmmh import MODALITIES
from dmmh.serving import Searcher


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmh search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="index file written by dmmh encode (with INDEX.json beside it)")
    p.add_argument("--ckpt", help="checkpoint (default: the one the manifest names; it must have the same weights)")
    p.add_argument("--caption", action="append", help="query caption (repeatable)")
    p.add_argument("--image", action="append", help="query image file (repeatable; with --caption: pairs, in order)")
    p.add_argument("--item", action="append", type=int, help="query by the id of a collection item (repeatable)")
    p.add_argument("--features", help=".npz / .safetensors with 'image' and/or 'text' arrays (one row per query)")
    p.add_argument("--split", help="split --item ids refer to (default: the indexed split)")
    p.add_argument("--modalities", default=",".join(MODALITIES), help="modalities of --item queries: image,text | image | text")
    p.add_argument("--k", type=int, help="results per query (default 10; with --radius: all within it)")
    p.add_argument("--radius", type=int, help="every item within this Hamming distance (inclusive)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print JSON for programs")
    return p


def main(argv: list[str] | None = None) -> list:
    """``dmmh search``: see the module docs and ``dmmh search --help``."""
    p = _parser()
    a = p.parse_args(argv)
    kinds = [name for name in ("caption", "image", "item", "features") if getattr(a, name)]
    if not kinds:
        p.error("give a query: --caption, --image, --item or --features")
    if len(kinds) > 1 and set(kinds) != {"caption", "image"}:
        p.error(f"--{' and --'.join(kinds)} cannot be combined (only --caption with --image, as pairs)")
    if a.caption and a.image and len(a.caption) != len(a.image):
        p.error(f"--caption and --image pair up in order: got {len(a.caption)} captions and {len(a.image)} images")
    k = a.k if a.k is not None else (None if a.radius is not None else 10)
    searcher = Searcher(a.index, a.ckpt, device=a.device)
    if a.item:
        modalities = [m.strip() for m in a.modalities.split(",") if m.strip()]
        inputs = searcher.items(a.item, a.split, modalities)
        split = a.split or searcher.manifest["collection"]["split"]
        described = [{"item": i, "split": split, "modalities": modalities} for i in a.item]
    elif a.features:
        inputs = searcher.features(a.features)
        n = len(next(iter(inputs.values())))
        described = [{"features": a.features, "row": r, "modalities": sorted(inputs)} for r in range(n)]
    else:
        inputs = {**(searcher.captions(a.caption) if a.caption else {}), **(searcher.images(a.image) if a.image else {})}
        n = len(a.caption or a.image)
        described = [{**({"caption": a.caption[q]} if a.caption else {}), **({"image": a.image[q]} if a.image else {})}
                     for q in range(n)]
    hits = searcher.search(**inputs, k=k, radius=a.radius)
    results = [{"query": q, "hits": h} for q, h in zip(described, hits)]
    if a.json:
        json.dump({"index": a.index, "k": k, "radius": a.radius, "results": results}, sys.stdout, indent=1)
        print()
        return results
    for n, r in enumerate(results, 1):
        print(f"query {n}: " + ", ".join(f"{key} {value!r}" for key, value in r["query"].items()))
        if not r["hits"]:
            print("  (no item" + (f" within distance {a.radius})" if a.radius is not None else ")"))
        for h in r["hits"]:
            extra = "  ".join(str(h[key]) for key in ("image", "caption") if key in h)
            print(f"  {h['rank']:>4}  d={h['distance']:<4} id={h['id']:<8} {extra}".rstrip())
    return results

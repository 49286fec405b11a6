"""NUS-WIDE from its official release, the 21 most frequent concepts (DCMH's recipe, as used by
DJSRH and BSTH).

Raw folder (from https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html:
Groundtruth, Tags, Image List; the images themselves are sent by the NUS-WIDE team on request)::

    ImageList/Imagelist.txt              one image path per line, e.g. C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg
    Groundtruth/AllLabels/Labels_<concept>.txt   one 0/1 line per image (81 concepts)
    NUS_WID_Tags/AllTags1k.txt           one line of 1,000 whitespace-separated 0/1 values per image
    NUS_WID_Tags/TagList1k.txt           the 1,000 tags, one per line
    Flickr/<folder>/<file>.jpg           the images (the last two parts of each Imagelist.txt path)

Recipe: labels = the ``top_concepts`` (21) concepts with the most positive images among all
269,648 (ties: alphabetical), kept in alphabetical order (the order of Concepts81.txt); text =
the release's 1,000-D tag vectors; items with none of those concepts are dropped (195,834 left).
Items without a tag are kept by default, as DCMH's count requires (``require_text=True`` drops
them as well: 190,421 left).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmmh.prepare._raw import RawReleaseError, Sources, Where, read_binary_matrix, read_lines, require
from dmmh.prepare.recipe import Recipe, SplitSizes

__all__ = ["CONCEPTS", "VERSION", "SPLIT_SIZES", "read"]

VERSION = 1
CONCEPTS = (
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle", "cat",
    "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire", "fish", "flags",
    "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses", "house", "lake", "leaf", "map",
    "military", "moon", "mountain", "nighttime", "ocean", "person", "plane", "plants", "police", "protest", "railroad",
    "rainbow", "reflection", "road", "rocks", "running", "sand", "sign", "sky", "snow", "soccer", "sports", "statue",
    "street", "sun", "sunset", "surf", "swimmers", "tattoo", "temple", "tiger", "tower", "town", "toy", "train", "tree",
    "valley", "vehicle", "water", "waterfall", "wedding", "whales", "window", "zebra")
SPLIT_SIZES = SplitSizes(query=2085, database=None, train=21000)

_SITE = "https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html"
_LIST = f"the NUS-WIDE 'Image List' download (ImageList.zip, {_SITE}), unpacked into the raw folder"
_TRUTH = f"the NUS-WIDE 'Groundtruth' download ({_SITE}), unpacked into the raw folder"
_TAGS = f"the NUS-WIDE 'Tags' download (NUS_WID_Tags.zip, {_SITE}), unpacked into the raw folder"


def read(raw: Path, top_concepts: int = 21, require_text: bool = False,
         concepts: tuple[str, ...] = CONCEPTS) -> Recipe:
    """Labels, tag vectors and image paths of the NUS-WIDE release in ``raw`` after the recipe."""
    raw = Path(raw)
    sources = Sources(raw)
    listing = sources.file(require(raw / "ImageList" / "Imagelist.txt", Where("one image path per line", _LIST)))
    images = []
    for number, line in enumerate(read_lines(listing), start=1):
        parts = [p for p in line.strip().replace("\\", "/").split("/") if p]
        if len(parts) < 2 or not parts[-1].lower().endswith(".jpg"):
            raise RawReleaseError(f"{listing}, line {number}: {line!r}; expected an image path ending in "
                                  f"<folder>\\<file>.jpg")
        images.append(f"Flickr/{parts[-2]}/{parts[-1]}")
    n = len(images)

    truth = require(raw / "Groundtruth" / "AllLabels", Where("Labels_<concept>.txt for the 81 concepts", _TRUTH),
                    folder=True)
    all_labels = np.zeros((n, len(concepts)), dtype=np.uint8)
    for c, name in enumerate(concepts):
        where = Where(f"one 0/1 line per image of Imagelist.txt, 1 where the image shows '{name}'", _TRUTH)
        path = sources.file(require(truth / f"Labels_{name}.txt", where))
        all_labels[:, c] = read_binary_matrix(path, n, 1, where)[:, 0]
    if not 0 < top_concepts <= len(concepts):
        raise ValueError(f"top_concepts must be in 1..{len(concepts)}, got {top_concepts}")
    positives = all_labels.sum(axis=0, dtype=np.int64)
    order = sorted(range(len(concepts)), key=lambda c: (-positives[c], concepts[c]))
    chosen = sorted(order[:top_concepts])  # alphabetical, as in Concepts81.txt

    tag_list = sources.file(require(raw / "NUS_WID_Tags" / "TagList1k.txt", Where("the 1,000 tags, one per line", _TAGS)))
    vocabulary = [t.strip() for t in read_lines(tag_list)]
    tags = sources.file(require(raw / "NUS_WID_Tags" / "AllTags1k.txt",
                                Where(f"one line of {len(vocabulary)} 0/1 tag values per image", _TAGS)))
    text = read_binary_matrix(tags, n, len(vocabulary), Where(f"{len(vocabulary)} 0/1 tag values per line, one line "
                                                               f"per image of Imagelist.txt", _TAGS))

    recipe = Recipe("nuswide", VERSION, {"top_concepts": top_concepts, "require_text": require_text,
                                         "concepts": list(concepts)},
                    ids=list(range(1, n + 1)), id_meaning="line number in ImageList/Imagelist.txt", images=images,
                    text=text, labels=all_labels[:, chosen], label_names=[concepts[c] for c in chosen],
                    vocabulary=vocabulary, sources=sources.entries)
    recipe.counts.append({"step": "images in Imagelist.txt", "items": n})
    recipe.keep(recipe.labels.any(axis=1), f"with at least one of the {top_concepts} most frequent concepts")
    if require_text:
        recipe.keep(recipe.text.any(axis=1), f"with at least one of the {len(vocabulary)} tags")
    recipe.details["positives_per_concept"] = {concepts[c]: int(positives[c]) for c in order}
    return recipe

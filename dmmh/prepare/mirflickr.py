"""MIR-Flickr25K from its official release (DCMH's recipe, as used by DJSRH and BSTH).

Raw folder (``mirflickr25k.zip`` and ``mirflickr25k_annotations_v080.zip`` from
https://press.liacs.nl/mirflickr/mirdownload.html, unpacked side by side)::

    mirflickr/im1.jpg ... im25000.jpg
    mirflickr/meta/tags/tags1.txt ... tags25000.txt   one processed tag per line
    mirflickr/doc/common_tags.txt                     "<tag> <count>" per line
    mirflickr25k_annotations_v080/<concept>.txt       image numbers, one per line (24 concepts,
                                                      plus 14 <concept>_r1.txt files and README.txt)

Recipe: labels = the 24 ``<concept>.txt`` lists (the ``_r1`` files are subsets of them and are
not used), in the alphabetical order of the concept names; text = binary bag of words over the
tags of ``common_tags.txt`` counted at least ``min_tag_count`` (20) times, in that file's order
(1,386 tags); items without a label, then items without a vocabulary tag, are dropped (20,015 left).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dmmh.prepare._raw import RawReleaseError, Sources, Where, read_lines, require
from dmmh.prepare.recipe import Recipe, SplitSizes

__all__ = ["CONCEPTS", "VERSION", "SPLIT_SIZES", "read"]

VERSION = 1
CONCEPTS = ("animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food", "indoor", "lake", "male",
            "night", "people", "plant_life", "portrait", "river", "sea", "sky", "structures", "sunset", "transport",
            "tree", "water")
SPLIT_SIZES = SplitSizes(query=2243, database=None, train=5000)

_IMAGES = "mirflickr25k.zip (https://press.liacs.nl/mirflickr/mirdownload.html), unpacked into the raw folder"
_ANNOTATIONS = ("mirflickr25k_annotations_v080.zip (https://press.liacs.nl/mirflickr/mirdownload.html), "
                "unpacked into the raw folder")


def read(raw: Path, n_images: int = 25000, min_tag_count: int = 20, require_text: bool = True,
         concepts: tuple[str, ...] = CONCEPTS) -> Recipe:
    """Labels, tags and image paths of the MIR-Flickr25K release in ``raw`` after the recipe."""
    raw = Path(raw)
    sources = Sources(raw)
    if not (raw / "mirflickr").exists() and (raw / "im1.jpg").exists():
        raise RawReleaseError(f"{raw} holds im1.jpg: it looks like the mirflickr folder itself; pass the folder that "
                              f"holds mirflickr/ and mirflickr25k_annotations_v080/ as the raw folder")
    base = require(raw / "mirflickr", Where("the MIR-Flickr images im1.jpg ... and the meta/ and doc/ folders", _IMAGES),
                   folder=True)
    ann = require(raw / "mirflickr25k_annotations_v080",
                  Where("one <concept>.txt file of image numbers per concept", _ANNOTATIONS), folder=True)

    labels = np.zeros((n_images, len(concepts)), dtype=np.uint8)
    for c, name in enumerate(concepts):
        path = sources.file(require(ann / f"{name}.txt", Where(f"the image numbers annotated '{name}', one per line",
                                                                _ANNOTATIONS)))
        for number, line in enumerate(read_lines(path), start=1):
            if not line.strip():
                continue
            try:
                image = int(line)
            except ValueError:
                raise RawReleaseError(f"{path}, line {number}: {line!r} is not an image number") from None
            if not 1 <= image <= n_images:
                raise RawReleaseError(f"{path}, line {number}: image number {image} outside 1..{n_images}")
            labels[image - 1, c] = 1

    common = sources.file(require(base / "doc" / "common_tags.txt",
                                  Where("the frequent tags, '<tag> <count>' per line", _IMAGES)))
    vocabulary = []
    for number, line in enumerate(read_lines(common), start=1):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise RawReleaseError(f"{common}, line {number}: {line!r}; expected '<tag> <count>'")
        if int(fields[1]) >= min_tag_count:
            vocabulary.append(fields[0])
    if len(set(vocabulary)) != len(vocabulary):
        raise RawReleaseError(f"{common}: a tag is listed twice")
    column = {tag: i for i, tag in enumerate(vocabulary)}

    tag_dir = require(base / "meta" / "tags", Where("tags<N>.txt, the processed tags of image N, one per line", _IMAGES),
                      folder=True)
    text = np.zeros((n_images, len(vocabulary)), dtype=np.uint8)
    tag_files = []
    for i in range(n_images):
        path = require(tag_dir / f"tags{i + 1}.txt", Where(f"the tags of im{i + 1}.jpg, one per line", _IMAGES))
        tag_files.append(path)
        for tag in read_lines(path):
            j = column.get(tag.strip())
            if j is not None:
                text[i, j] = 1
    sources.folder(tag_dir, tag_files)

    recipe = Recipe("mirflickr", VERSION, {"n_images": n_images, "min_tag_count": min_tag_count,
                                           "require_text": require_text, "concepts": list(concepts)},
                    ids=list(range(1, n_images + 1)), id_meaning="image number N of mirflickr/imN.jpg",
                    images=[f"mirflickr/im{i}.jpg" for i in range(1, n_images + 1)], text=text, labels=labels,
                    label_names=list(concepts), vocabulary=vocabulary, sources=sources.entries)
    recipe.counts.append({"step": "images in the release", "items": n_images})
    recipe.keep(labels.any(axis=1), f"with at least one of the {len(concepts)} labels")
    if require_text:
        recipe.keep(recipe.text.any(axis=1), f"with at least one of the {len(vocabulary)} vocabulary tags")
    return recipe

"""MS-COCO 2014 from its official release (the DJSRH / BSTH lineage's 80-category benchmark).

Raw folder (from https://cocodataset.org/#download: "2014 Train images", "2014 Val images",
"2014 Train/Val annotations", unpacked side by side)::

    train2014/COCO_train2014_<12-digit id>.jpg
    val2014/COCO_val2014_<12-digit id>.jpg
    annotations/instances_train2014.json, instances_val2014.json   images, annotations, categories
    annotations/captions_train2014.json, captions_val2014.json     images, annotations (with "caption")

Recipe: items = the images of train2014 then val2014, each in ascending image id; labels = the
80 categories in ascending category id, an image has a category when one of its instance
annotations has it; images without a category are dropped (122,218 of 123,287 left); text =
binary bag of words over the ``vocab_size`` (2,000) words found in the captions of the most kept
images (ties: alphabetical), words being the lower-cased runs of letters ``[a-z]+``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

from dmmh.prepare._raw import RawReleaseError, Sources, Where, require
from dmmh.prepare.recipe import Recipe, SplitSizes

__all__ = ["VERSION", "SPLIT_SIZES", "read", "tokenize"]

VERSION = 1
SPLIT_SIZES = SplitSizes(query=5981, database=82783, train=18000)
SUBSETS = ("train2014", "val2014")

_ANNOTATIONS = "the '2014 Train/Val annotations' download (https://cocodataset.org/#download), unpacked into the raw folder"
_WORD = re.compile(r"[a-z]+")


def tokenize(caption: str) -> list[str]:
    """The words of a caption: lower-cased runs of the letters a-z."""
    return _WORD.findall(caption.lower())


def read(raw: Path, vocab_size: int = 2000, require_text: bool = False, subsets: tuple[str, ...] = SUBSETS) -> Recipe:
    """Labels, caption bag-of-words and image paths of the COCO 2014 release in ``raw`` after the recipe."""
    raw = Path(raw)
    sources = Sources(raw)
    ids, images, captions, label_sets = [], [], [], []
    categories = None
    for subset in subsets:
        download = f"the '{subset[:-4].capitalize()} 2014 images' download (https://cocodataset.org/#download)"
        require(raw / subset, Where(f"the {subset} images COCO_{subset}_<id>.jpg", download), folder=True)
        inst_path = raw / "annotations" / f"instances_{subset}.json"
        inst = _load(sources, inst_path,
                     Where(f"the {subset} object instances (images, annotations, categories)", _ANNOTATIONS))
        caps_path = raw / "annotations" / f"captions_{subset}.json"
        caps = _load(sources, caps_path, Where(f"the {subset} captions (images, annotations)", _ANNOTATIONS))
        cats = {_field(c, "id", int, inst_path, "categories", i): _field(c, "name", str, inst_path, "categories", i)
                for i, c in enumerate(_list(inst, "categories", inst_path))}
        if categories is None:
            categories = cats
        elif cats != categories:
            raise RawReleaseError(f"{inst_path}: its categories differ from those of {subsets[0]}")
        files = {}
        for i, im in enumerate(_list(inst, "images", inst_path)):
            files[_field(im, "id", int, inst_path, "images", i)] = _field(im, "file_name", str, inst_path, "images", i)
        labels: dict[int, set[int]] = {k: set() for k in files}
        for i, a in enumerate(_list(inst, "annotations", inst_path)):
            image = _field(a, "image_id", int, inst_path, "annotations", i)
            cat = _field(a, "category_id", int, inst_path, "annotations", i)
            if image not in files or cat not in categories:
                what = f"image_id {image}" if image not in files else f"category_id {cat}"
                raise RawReleaseError(f"{inst_path}: annotations[{i}] refers to {what}, which the file does not list")
            labels[image].add(cat)
        texts: dict[int, list[tuple[int, str]]] = {k: [] for k in files}
        for i, a in enumerate(_list(caps, "annotations", caps_path)):
            image = _field(a, "image_id", int, caps_path, "annotations", i)
            if image not in texts:
                raise RawReleaseError(f"{caps_path}: annotations[{i}] refers to image_id {image}, which "
                                      f"{inst_path.name} does not list")
            texts[image].append((_field(a, "id", int, caps_path, "annotations", i),
                                 _field(a, "caption", str, caps_path, "annotations", i)))
        for image in sorted(files):
            ids.append(image)
            images.append(f"{subset}/{files[image]}")
            captions.append([c for _, c in sorted(texts[image])])
            label_sets.append(labels[image])

    cat_ids = sorted(categories)
    column = {c: j for j, c in enumerate(cat_ids)}
    label_array = np.zeros((len(ids), len(cat_ids)), dtype=np.uint8)
    for i, cats in enumerate(label_sets):
        label_array[i, [column[c] for c in cats]] = 1
    words = [sorted({w for c in caps for w in tokenize(c)}) for caps in captions]

    recipe = Recipe("coco", VERSION, {"vocab_size": vocab_size, "require_text": require_text, "subsets": list(subsets)},
                    ids=ids, id_meaning="COCO image id", images=images, text=np.zeros((len(ids), 0), np.uint8),
                    labels=label_array, label_names=[categories[c] for c in cat_ids], vocabulary=[],
                    sources=sources.entries)
    recipe.counts.append({"step": f"images in {' + '.join(subsets)}", "items": len(ids)})
    labelled = label_array.any(axis=1)
    recipe.keep(labelled, f"with at least one of the {len(cat_ids)} categories")
    words = [w for w, keep in zip(words, labelled) if keep]
    frequency = Counter(w for ws in words for w in ws)
    recipe.vocabulary = sorted(frequency, key=lambda w: (-frequency[w], w))[:vocab_size]
    column = {w: j for j, w in enumerate(recipe.vocabulary)}
    recipe.text = np.zeros((len(words), len(recipe.vocabulary)), dtype=np.uint8)
    for i, ws in enumerate(words):
        recipe.text[i, [column[w] for w in ws if w in column]] = 1
    if require_text:
        recipe.keep(recipe.text.any(axis=1), f"with at least one of the {len(recipe.vocabulary)} vocabulary words")
    recipe.details["category_ids"] = cat_ids
    return recipe


def _load(sources: Sources, path: Path, where: Where) -> dict:
    sources.file(require(path, where))
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise RawReleaseError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
                              f"expected {where.what}, as in {where.source}") from None
    except UnicodeDecodeError as exc:
        raise RawReleaseError(f"{path}: not UTF-8 text ({exc}); expected {where.what}") from None
    if not isinstance(data, dict):
        raise RawReleaseError(f"{path}: the JSON holds a {type(data).__name__}, expected an object with {where.what}")
    return data


def _list(data: dict, key: str, path: Path) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        found = "no such key" if key not in data else f"a {type(value).__name__}"
        raise RawReleaseError(f"{path}: key {key!r} must be a list (COCO's annotation format), found {found}")
    return value


def _field(obj, key: str, kind: type, path: Path, array: str, i: int):
    value = obj.get(key) if isinstance(obj, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        found = "nothing" if value is None else repr(value)[:60]
        raise RawReleaseError(f"{path}: {array}[{i}][{key!r}] must be a {kind.__name__} (COCO's annotation format), "
                              f"found {found}")
    return value

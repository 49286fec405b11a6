"""``prepare()``: from an official raw release to the benchmark file the DataModules read.

Stages: the dataset's recipe (:mod:`~dmmh.prepare.mirflickr`, :mod:`~dmmh.prepare.nuswide`,
:mod:`~dmmh.prepare.coco`) → missing images (listed in ``<out>.missing-images.txt``; an error, or
dropped) → the seeded split (:func:`~dmmh.prepare.recipe.split_items`) → image features of the
query and database items (:mod:`~dmmh.prepare.extraction`, resumable in ``<out>.parts/``) → the
nine arrays in ``out``'s format (:mod:`~dmmh.prepare.writers`) → ``<out>.manifest.json``
(:mod:`~dmmh.prepare.manifest`). Text is stored as uint8 0/1 bag-of-words, labels as uint8
multi-hot, image features as float32.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from dmmh._io import atomic_write
from dmmh.data.readers import SPLIT_KEYS
from dmmh.prepare import coco, mirflickr, nuswide
from dmmh.prepare._raw import sha256_file
from dmmh.prepare.extraction import extract_image_features, fabric_for, image_list_record
from dmmh.prepare.features import ImageFeatures
from dmmh.prepare.features import image_features as make_image_features
from dmmh.prepare.manifest import MANIFEST_VERSION, write_manifest
from dmmh.prepare.recipe import Recipe, SplitSizes, split_items
from dmmh.prepare.writers import array_sha256, output_format, write_arrays

__all__ = ["DATASETS", "Dataset", "MissingImagesError", "prepare", "missing_images_path", "parts_path"]


@dataclass(frozen=True)
class Dataset:
    """A recipe: its reader, default split sizes and the choices it documents (copied into the manifest)."""

    read: Callable[..., Recipe]
    split_sizes: SplitSizes
    notes: tuple[str, ...]


_SPLIT_NOTE = ("The published file's split membership is not published: dmmh draws the split with "
               "numpy.random.default_rng(seed) (see dmmh.prepare.recipe.split_items); sizes are the published ones.")
DATASETS: dict[str, Dataset] = {
    "mirflickr": Dataset(mirflickr.read, mirflickr.SPLIT_SIZES, (
        "Labels: the 24 <concept>.txt annotation lists of mirflickr25k_annotations_v080, alphabetical; the _r1 "
        "lists (subsets of them) are not used (DCMH, Jiang & Li, CVPR 2017).",
        "Text: binary bag of words over the tags of mirflickr/doc/common_tags.txt counted >= 20 times (1,386 tags), "
        "in that file's order; items without a label or without such a tag are dropped, leaving 20,015 (DCMH).",
        _SPLIT_NOTE)),
    "nuswide": Dataset(nuswide.read, nuswide.SPLIT_SIZES, (
        "Labels: the 21 concepts with the most positive images in Groundtruth/AllLabels (ties alphabetical), in "
        "alphabetical order (Concepts81.txt's); text: the release's AllTags1k.txt vectors (DCMH).",
        "Items with none of the 21 concepts are dropped, leaving 195,834 (DCMH). Items without a tag are kept: "
        "dropping them as well leaves 190,421, not DCMH's count (require_text=True does it).",
        _SPLIT_NOTE)),
    "coco": Dataset(coco.read, coco.SPLIT_SIZES, (
        "Items: train2014 then val2014 images in ascending id; labels: the 80 categories in ascending id; images "
        "without an instance annotation are dropped, leaving 122,218 of 123,287.",
        "Text: the literature's 2,000-D caption bag of words does not publish its tokenisation: dmmh uses lower-cased "
        "[a-z]+ words, the 2,000 in the captions of the most kept images (ties alphabetical), binary.",
        "Split: the published sizes (5,981 queries, 82,783 database, 18,000 train within it) cover 88,764 of the "
        "122,218 labelled images and the membership is not published: dmmh draws queries and database with "
        "numpy.random.default_rng(seed); the other images are left out (splits.unused in this manifest).")),
}


class MissingImagesError(FileNotFoundError):
    """Images of kept items are missing (listed in ``<out>.missing-images.txt``)."""


def missing_images_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".missing-images.txt")


def parts_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".parts")


def prepare(dataset: str, raw: str | os.PathLike, out: str | os.PathLike, image_features: str | ImageFeatures = "vgg19",
            *, weights: str | os.PathLike | None = None, model_config: Mapping[str, Any] | None = None,
            image_size: int | None = None, seed: int = 0, split_sizes: SplitSizes | None = None,
            recipe_params: Mapping[str, Any] | None = None, missing_images: str = "error", overwrite: bool = False,
            batch_size: int = 64, chunk_size: int = 1024, num_workers: int = 0, device: str = "cpu", devices: int = 1,
            strategy: str = "auto", num_nodes: int = 1, progress: bool = True) -> Path:
    """Build the benchmark file ``out`` (``.mat`` v7.3, ``.npz`` or ``.safetensors``) of ``dataset``
    (``"mirflickr"``, ``"nuswide"``, ``"coco"``) from the official release unpacked in ``raw``.

    Args:
        image_features: ``"vgg19"``, ``"clip:<model>[@<pretrained>]"`` or an
            :class:`~dmmh.prepare.features.ImageFeatures` (see :mod:`dmmh.prepare.features`).
        weights, model_config, image_size: passed to :func:`~dmmh.prepare.features.image_features`.
        seed: the split seed. split_sizes: override the published sizes (e.g. for small tests).
        recipe_params: keyword arguments of the dataset's ``read`` (thresholds, ``require_text``...).
        missing_images: ``"error"`` (default) or ``"drop"`` the items whose image file is missing;
            either way they are listed in ``<out>.missing-images.txt`` and counted in the manifest.
        overwrite: replace an existing ``out`` (else an existing ``out`` is an error).
        batch_size, chunk_size, num_workers: images per forward pass, per resumable chunk, loader workers.
        device, devices, strategy, num_nodes: where features run; ``devices > 1`` (or
            ``num_nodes > 1``) starts that many Lightning processes (``strategy``, e.g. ``"ddp"``),
            each extracting its own chunks (see :mod:`dmmh.prepare.extraction`).
        progress: show a progress bar.

    Returns ``out``. An interrupted run, restarted with the same arguments, reuses the finished
    chunks in ``<out>.parts/`` and writes the same bytes as an uninterrupted one.
    """
    out, raw = Path(out), Path(raw)
    fmt = output_format(out)
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    if missing_images not in ("error", "drop"):
        raise ValueError(f"missing_images must be 'error' or 'drop', got {missing_images!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; check it with 'dmmh prepare --check {out}', or pass overwrite=True "
                              f"(--overwrite) to rebuild it")
    if not raw.is_dir():
        raise FileNotFoundError(f"raw folder {raw} not found: expected the official {dataset} release unpacked there "
                                f"(see docs/data.md)")
    spec = DATASETS[dataset]
    params = dict(recipe_params or {})
    known = [k for k in inspect.signature(spec.read).parameters if k != "raw"]
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"unknown {dataset} recipe parameter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    features = image_features if isinstance(image_features, ImageFeatures) else make_image_features(
        image_features, weights, model_config, image_size)
    fabric = fabric_for(device, devices, strategy, num_nodes)
    main = fabric.global_rank == 0

    recipe = spec.read(raw, **params)
    missing = _missing_images(recipe, raw, out, missing_images, main)
    sizes = split_sizes or spec.split_sizes
    splits = split_items(len(recipe), sizes, seed)
    rows = np.union1d(splits["query"], splits["database"])  # train ⊂ database: features once per item
    record = {"dataset": dataset, "recipe_version": recipe.version, "recipe_params": _jsonable(recipe.params),
              "seed": seed, "split_sizes": dataclasses.asdict(sizes), "image_features": features.fingerprint(),
              "images_sha256": image_list_record(raw, [recipe.images[i] for i in rows])}
    image, store = extract_image_features([raw / recipe.images[i] for i in rows], features, parts_path(out), record,
                                          fabric, batch_size, chunk_size, num_workers, progress)
    if not main:
        return out
    position = np.full(len(recipe), -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    arrays = {}
    for split, (ki, kt, kl) in SPLIT_KEYS.items():
        idx = splits[split]
        arrays[ki], arrays[kt], arrays[kl] = image[position[idx]], recipe.text[idx], recipe.labels[idx]
    write_arrays(out, arrays)
    write_manifest(out, {
        "manifest_version": MANIFEST_VERSION,
        "dataset": dataset,
        "recipe": {"version": recipe.version, "params": _jsonable(recipe.params), "notes": list(spec.notes),
                   "details": _jsonable(recipe.details)},
        "dmmh_version": _dmmh_version(),
        "sources": recipe.sources,
        "counts": recipe.counts,
        "missing_images": {"count": len(missing), "policy": missing_images,
                           "listing": missing_images_path(out).name if missing else None},
        "labels": recipe.label_names,
        "vocabulary": recipe.vocabulary,
        "image_features": features.describe(),
        "extraction": {"batch_size": batch_size, "chunk_size": chunk_size, "device": str(device), "devices": devices,
                       "num_nodes": num_nodes, "world_size": fabric.world_size},
        "output": {"file": out.name, "format": fmt, "sha256": sha256_file(out),
                   "arrays": {k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": array_sha256(a)}
                              for k, a in arrays.items()}},
        "splits": {"seed": seed, "sizes": {name: len(splits[name]) for name in ("query", "database", "train", "unused")},
                   "id": recipe.id_meaning,
                   "items": {name: [recipe.ids[i] for i in splits[name]] for name in ("query", "database", "train")}},
    })
    store.remove()
    return out


def _missing_images(recipe: Recipe, raw: Path, out: Path, policy: str, main: bool) -> list[int]:
    """Rows whose image file is missing: listed in ``<out>.missing-images.txt`` (by rank 0), then
    an error (``policy="error"``) or dropped from ``recipe`` (``"drop"``)."""
    missing = [i for i, rel in enumerate(recipe.images) if not (raw / rel).is_file()]
    listing = missing_images_path(out)
    if main and missing:
        atomic_write(listing, "".join(f"{recipe.images[i]}\n" for i in missing).encode("utf-8", "surrogateescape"))
    elif main and listing.exists():
        listing.unlink()  # left by an earlier run whose missing images were since added
    if missing and policy == "error":
        shown = ", ".join(str(raw / recipe.images[i]) for i in missing[:3])
        raise MissingImagesError(f"{len(missing)} of the {len(recipe)} images of kept items are missing ({shown}"
                                 f"{', ...' if len(missing) > 3 else ''}; all listed in {listing}); add them, or "
                                 f"drop those items with missing_images='drop' (--missing-images drop)")
    if missing:
        keep = np.ones(len(recipe), dtype=bool)
        keep[missing] = False
        recipe.keep(keep, "with an image file")
    return missing


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _dmmh_version() -> str:
    from dmmh import __version__

    return __version__

"""The manifest written beside a prepared file (``<file>.manifest.json``) and ``check``.

The manifest records how the file was made and what it holds: the recipe (dataset, version,
parameters, documented choices), dmmh's version, the raw source files with SHA-256, the item
count after every filtering step, missing images, the split seed and sizes with the release ids
of every split's items, label names, vocabulary, the image feature backbone with its weights'
SHA-256, and the output: its format, SHA-256, and each array's shape, dtype and SHA-256 (of its
row-major values, so equal for every format). It holds no time stamp or absolute path: equal
inputs and settings give an equal manifest, byte for byte.

:func:`check` verifies a file against its manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dmmh._io import atomic_write
from dmmh.data.readers import ALL_KEYS, SPLIT_KEYS, read_feature_file
from dmmh.prepare._raw import sha256_file
from dmmh.prepare.writers import array_sha256

__all__ = ["MANIFEST_VERSION", "manifest_path", "write_manifest", "read_manifest", "check", "CheckFailed"]

MANIFEST_VERSION = 1


class CheckFailed(ValueError):
    """A prepared file does not match its manifest (the message lists every difference)."""


def manifest_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".manifest.json")


def write_manifest(out: Path, manifest: dict[str, Any]) -> Path:
    path = manifest_path(out)
    atomic_write(path, (json.dumps(manifest, indent=1) + "\n").encode())
    return path


def read_manifest(out: Path) -> dict[str, Any]:
    path = manifest_path(out)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest beside {out} (dmmh prepare writes <file>.manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckFailed(f"{path}: not a readable JSON manifest ({exc})") from None
    if manifest.get("manifest_version") != MANIFEST_VERSION:
        raise CheckFailed(f"{path}: manifest_version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
    return manifest


def check(out: str | Path) -> dict[str, Any]:
    """Verify ``out`` against its manifest: the file's SHA-256; every array's shape, dtype and
    SHA-256 as :mod:`dmmh.data.readers` reads it; split sizes, label and vocabulary widths and
    the feature width against the recipe's record. Returns the manifest; raises
    :class:`CheckFailed` naming every difference."""
    out = Path(out)
    if not out.is_file():
        raise FileNotFoundError(f"{out}: no such file to check")
    manifest = read_manifest(out)
    problems = []
    expected = manifest["output"]
    digest = sha256_file(out)
    if digest != expected["sha256"]:
        problems.append(f"file SHA-256 {digest} differs from the manifest's {expected['sha256']}")
    try:
        ff = read_feature_file(out)
    except ValueError as exc:
        raise CheckFailed(f"{out} does not match {manifest_path(out)}:\n  " + "\n  ".join([*problems, str(exc)])) from None
    if ff.format != expected["format"]:
        problems.append(f"format {ff.format}, the manifest says {expected['format']}")
    for key in ALL_KEYS:
        want = expected["arrays"].get(key)
        a = ff.arrays.get(key)
        if want is None or a is None:
            problems.append(f"key {key!r} " + ("missing from the file" if a is None else "not in the manifest"))
            continue
        found = {"shape": list(a.shape), "dtype": str(a.dtype.newbyteorder("=")), "sha256": array_sha256(a)}
        for field in ("shape", "dtype", "sha256"):
            if found[field] != want[field]:
                problems.append(f"key {key!r}: {field} {found[field]}, the manifest says {want[field]}")
    sizes = {split: len(manifest["splits"]["items"][split]) for split in SPLIT_KEYS}
    widths = {"I": manifest["image_features"]["dim"], "T": len(manifest["vocabulary"]), "L": len(manifest["labels"])}
    for split, keys in SPLIT_KEYS.items():
        for key in keys:
            a = ff.arrays.get(key)
            if a is not None and a.ndim == 2 and (a.shape[0], a.shape[1]) != (sizes[split], widths[key[0]]):
                problems.append(f"key {key!r}: shape {tuple(a.shape)}, the recipe's record gives "
                                f"({sizes[split]}, {widths[key[0]]})")
    if problems:
        raise CheckFailed(f"{out} does not match {manifest_path(out)}:\n  " + "\n  ".join(problems))
    return manifest

"""Image–caption pairs from a Hugging Face ``datasets`` dataset (``PairsDataModule(hf=...)``).

The source is a ``datasets.Dataset`` or ``DatasetDict``, a ``save_to_disk`` folder
(``datasets.load_from_disk``), or a local folder or file that ``datasets.load_dataset`` reads
(an ``imagefolder`` with ``metadata.jsonl``, parquet / CSV / JSON files). Nothing is downloaded:
a path must exist on this machine. Its rows go through the same checks as a metadata file's
(:func:`dmmh.data.pairs.check_rows`), so items, labels and splits are made the same way.

- **Image column**: an ``Image()`` feature (encoded bytes, or a path to a file), or a string
  column of file paths. Images stay in the dataset (Arrow, memory-mapped when loaded from disk)
  and are decoded one item at a time when read; ``check_images=True`` decodes each once on load,
  batch by batch, to find bad ones. Image *paths* (a string column, or an ``Image()`` value
  without bytes, as ``load_dataset("imagefolder")`` stores them) are relative to ``root`` —
  default: the source folder (a file's folder) — and must stay inside it unless
  ``allow_outside_root=True``; a ``Dataset`` object has no folder, so its image paths need one of
  the two.
- **Tags / split columns** may be ``ClassLabel`` features (or lists of them): their names are used.
- **Rows** are named by their 0-based index, ``[17]``, or ``train[17]`` in a ``DatasetDict``.
- **Splits of a DatasetDict**: one split (what ``load_dataset`` makes of a folder without split
  files) is used as a plain dataset (its ``split`` column, or ``num_query``). With several, each
  split's name is a dmmh split by :data:`~dmmh.data.pairs.SPLIT_NAMES` — ``train`` → train (and
  database, as in the benchmarks), ``validation`` → database (indexed, never trained on),
  ``test`` → query — or by ``split_map`` (``None`` leaves a split out); an unknown split name is an
  error. A ``split`` column beside several splits is ambiguous: an error (``split_column=None``
  uses the DatasetDict's splits).
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Iterator, Mapping

from dmmh._optional import require
from dmmh.data.pairs import (SPLIT_NAMES, PairsTable, check_on_bad_row, check_rows, check_split_map, file_images,
                             split_of, unreadable)

__all__ = ["read_hf_pairs", "open_hf"]

BATCH = 256  # rows read at once when checking (their image bytes are in memory together)
SPLIT_KEY = "__dmmh_split__"  # a DatasetDict row's split name, added beside its columns
LOADERS = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}


def open_hf(source: Any) -> tuple[Any, str, str | None]:
    """``(dataset, name for messages, folder image paths default to)`` of ``source``: a
    ``Dataset`` / ``DatasetDict``, a ``save_to_disk`` folder, or a local folder / file for
    ``datasets.load_dataset``."""
    datasets = require("datasets", "reading a Hugging Face dataset (hf=)")
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return source, f"datasets.{type(source).__name__}", None
    if isinstance(source, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise TypeError("hf=: a streaming IterableDataset cannot be read item by item; load it as a Dataset "
                        "(streaming=False) or save_to_disk() a copy")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"hf= takes a datasets.Dataset / DatasetDict or a local path, got {type(source).__name__}")
    path = os.fspath(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"hf={path!r}: no such local folder or file (nothing is downloaded: load a hub dataset "
                                f"with datasets.load_dataset and save_to_disk it, or pass the Dataset)")
    if os.path.isdir(path):
        saved = any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json"))
        return (datasets.load_from_disk(path) if saved else datasets.load_dataset(path)), path, path
    loader = LOADERS.get(os.path.splitext(path)[1].lower())
    if loader is None:
        raise ValueError(f"hf={path!r}: not a folder or a {'/'.join(sorted(LOADERS))} file")
    return datasets.load_dataset(loader, data_files=path), path, os.path.dirname(os.path.abspath(path))


def read_hf_pairs(source: Any, root: str | None = None, image_column: str | None = None,
                  caption_column: str = "caption", tags_column: str | None = "tags",
                  split_column: str | None = "split", tag_sep: str = ",",
                  on_bad_row: str = "error", check_images: bool = True, allow_outside_root: bool = False,
                  split_map: Mapping[str, str | None] | None = None) -> PairsTable:
    """Read and validate the pairs of an HF dataset (see the module docs): a
    :class:`~dmmh.data.pairs.PairsTable` whose ``rows`` are dataset indices and whose images are
    read from the dataset when an item is loaded."""
    check_on_bad_row(on_bad_row)
    split_map = check_split_map(split_map)
    ds, name, default_root = open_hf(source)
    root = default_root if root is None else root
    image_column = image_column or "image"
    ds, parts = _one_dataset(ds, name, split_column, split_map)
    features = ds.features
    columns = [c for c in dict.fromkeys([image_column, caption_column, tags_column, split_column]) if c in features]
    if parts is not None:
        split_column = SPLIT_KEY
    kind = _image_kind(features, image_column, name)
    names = {c: _class_names(features[c]) for c in (tags_column, split_column) if c in features}
    records = _records(ds, columns, image_column if kind == "image" else None, check_images,
                       {c: n for c, n in names.items() if n is not None}, parts)
    files = file_images(root, allow_outside_root, check_images, image_column)

    def image(value: Any, place: str) -> tuple[str | None, str | None]:
        if kind != "image":  # a string column of paths
            return files(value, place)
        if value is None:
            return None, f"no image in column {image_column!r}"
        data, path = value["bytes"], value["path"]
        if data is not None:  # encoded bytes (True: present, not read)
            named = f"{place} {os.path.basename(path)}" if path else place
            return named, (unreadable(data) if isinstance(data, bytes) else None)
        if path:
            return files(path, place)
        return None, f"no image (neither bytes nor a path) in column {image_column!r}"

    return check_rows(name, [*ds.column_names, *([SPLIT_KEY] if parts else [])], records, [], image,
                      image_column=image_column, caption_column=caption_column, tags_column=tags_column,
                      split_column=split_column, tag_sep=tag_sep, split_map=split_map, on_bad_row=on_bad_row, root=root,
                      locate=Place(parts), image_bytes=ImageBytes(ds, image_column) if kind == "image" else None)


class Place:
    """A row's place for messages: ``[17]``, or ``train[17]`` in a DatasetDict (``parts``: its
    kept splits and the row where each starts, in the order they were joined)."""

    def __init__(self, parts: list[tuple[str, int]] | None):
        self.parts = parts

    def split(self, row: int) -> tuple[str | None, int]:
        """The DatasetDict split of ``row`` (``None`` for a Dataset) and its index there."""
        if not self.parts:
            return None, row
        name, start = self.parts[bisect.bisect_right([start for _, start in self.parts], row) - 1]
        return name, row - start

    def __call__(self, row: int, line: int = 0) -> str:
        name, index = self.split(row)
        return f"{name or ''}[{index}]"


class ImageBytes:
    """The encoded image of a row of an ``Image()`` column, read when asked (``None``: the row
    gives a file path instead)."""

    def __init__(self, ds, column: str):
        self.ds = ds.select_columns([column]).with_format("arrow")

    def __call__(self, row: int) -> bytes | None:
        value = self.ds[int(row)].column(0)[0].as_py()
        return None if value is None else value["bytes"]


def _one_dataset(ds, name: str, split_column: str | None, split_map: Mapping[str, str | None]):
    """A Dataset, and for a DatasetDict of several splits the kept ones with their first rows."""
    import datasets

    if not isinstance(ds, datasets.DatasetDict):
        return ds, None
    if not len(ds):
        raise ValueError(f"{name}: a DatasetDict without splits")
    if len(ds) == 1:
        return next(iter(ds.values())), None
    if split_column and any(split_column in d.column_names for d in ds.values()):
        raise ValueError(f"{name}: a {split_column!r} column and DatasetDict splits {list(ds)}: which decides? Pass "
                         f"split_column=None to use the splits, or pick one split (dataset['train']) to use the column")
    kept = []
    for split in ds:
        try:
            if split_of(split, split_map) is not None:
                kept.append(split)
        except KeyError:
            known = sorted(set(split_map) | set(SPLIT_NAMES))
            raise ValueError(f"{name}: DatasetDict split {split!r} is not a dmmh split name ({known}); pass split_map="
                             f"{{{split!r}: 'database'}} (or 'train', 'query', None to leave it out)") from None
    if not kept:
        raise ValueError(f"{name}: split_map leaves out every split of {list(ds)}")
    first = ds[kept[0]].features
    for split in kept[1:]:
        if ds[split].features != first:
            raise ValueError(f"{name}: split {split!r} has other features than {kept[0]!r} ({ds[split].features} vs "
                             f"{first}); cast them alike or leave one out (split_map)")
    starts = [0]
    for split in kept[:-1]:
        starts.append(starts[-1] + len(ds[split]))
    return datasets.concatenate_datasets([ds[s] for s in kept]), list(zip(kept, starts))


def _image_kind(features, column: str, name: str) -> str | None:
    """``"image"`` for an ``Image()`` feature, ``"path"`` for strings; anything else is an error."""
    import datasets

    feature = features.get(column)
    if feature is None:
        return None  # check_rows names the missing column
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    raise TypeError(f"{name}: column {column!r} is {feature}; dmmh reads an Image() feature or a string column of "
                    f"file paths (ds.cast_column({column!r}, datasets.Image()) makes bytes or paths an Image())")


def _class_names(feature) -> list[str] | None:
    """The names of a ``ClassLabel`` feature (or of a list of them), else ``None``."""
    import datasets

    inner = getattr(feature, "feature", feature)  # List / Sequence / LargeList of ...
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _to_names(value: Any, names: list[str]) -> Any:
    """ClassLabel ids as names: ``-1`` (HF's "no label") is none; an id out of range stays a
    number, which the tag / split checks report."""
    def one(v):
        return names[v] if isinstance(v, int) and 0 <= v < len(names) else v

    if isinstance(value, list):
        return [one(v) for v in value]
    return [] if value == -1 else one(value)


def _records(ds, columns: list[str], image_column: str | None, read_bytes: bool, names: dict[str, list[str]],
             parts: list[tuple[str, int]] | None) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(row, 0, values)`` of every row, read ``BATCH`` rows at a time. An ``Image()`` value is
    ``{"bytes", "path"}``; without ``read_bytes`` its bytes are only ``True`` (present) or ``None``."""
    arrow = ds.select_columns(columns).with_format("arrow")
    place = Place(parts)
    for start in range(0, len(ds), BATCH):
        table = arrow[start:start + BATCH]
        values = {}
        for c in columns:
            values[c] = _image_values(table.column(c), read_bytes) if c == image_column else table.column(c).to_pylist()
            if c in names:
                values[c] = [_to_names(v, names[c]) for v in values[c]]
        for j in range(table.num_rows):
            record = {c: values[c][j] for c in columns}
            if parts:
                record[SPLIT_KEY] = place.split(start + j)[0]
            yield start + j, 0, record


def _image_values(column, read_bytes: bool) -> list[dict[str, Any] | None]:
    """An ``Image()`` column's values without decoding, reading the bytes only if ``read_bytes``."""
    import pyarrow.compute as pc

    out: list[dict[str, Any] | None] = []
    for chunk in column.chunks:
        data, path = _fields(chunk)
        data = data.to_pylist() if read_bytes else [True if v else None for v in pc.is_valid(data).to_pylist()]
        out += [{"bytes": d, "path": p} if ok else None
                for ok, d, p in zip(chunk.is_valid().to_pylist(), data, path.to_pylist())]
    return out


def _fields(chunk):
    """The ``bytes`` and ``path`` children of a struct chunk, sliced as the chunk is (``flatten``)."""
    children = dict(zip((f.name for f in chunk.type), chunk.flatten()))
    return children["bytes"], children["path"]

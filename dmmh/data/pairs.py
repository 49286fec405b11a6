"""``pairs``: a folder of images plus a CSV / JSONL of ``image, caption[, tags][, split]``, or a
Hugging Face ``datasets`` dataset with such columns (``hf=``, :mod:`dmmh.data.pairs_hf`).

The metadata is UTF-8 CSV (header row; Python's ``csv`` module, strict quoting) or JSON Lines
(one object per line; a ``.json`` file may also hold one JSON array of objects). The Hugging
Face ``imagefolder`` layout — images under ``root`` with ``root/metadata.jsonl`` whose
``file_name`` column names them — is read as is. Image paths are relative to ``root`` and must
stay inside it: a path that escapes it (``..``, an absolute path elsewhere, or a symlink to a file
outside) is a bad row unless ``allow_outside_root=True`` — metadata from an untrusted source could
otherwise make dmmh read any image file the process can read.

Labels: ``tags`` (a list in JSONL, or a string split on ``tag_sep``) become multi-hot vectors
over the sorted tag vocabulary. Without tags (``labels="instance"``) each distinct caption
(case and spacing ignored) is its own class: the hashing losses then learn instance
discrimination — an item's codes from image, caption or both must predict its own caption
class and differ from the other items' codes. Meant for sets up to ``max_instance_classes``
distinct captions; larger sets should bring tags.

Bad rows — a line that is not UTF-8, a JSONL line that is not a JSON object, a CSV row with more
or fewer fields than the header, a missing, escaping or undecodable image (each image is decoded
once, so a truncated JPEG is caught), an empty caption, malformed tags or split — are reported
with their 1-based row number and file line; ``on_bad_row="error"`` (default) raises listing them
all, ``"skip"`` warns listing them all and leaves them out. What no row can be skipped for is
always an error naming the file and line: a header that is not UTF-8 or names a column twice,
broken CSV quoting (an unclosed quote would swallow the rows after it). An image that fails later,
when it is loaded, is an error naming its metadata row.

Splits: a ``split`` column with ``train`` (also in the database, as in the benchmarks),
``database`` (aliases ``db``, ``retrieval``, ``validation``, ``valid``, ``val``) or ``query``
(alias ``test``); ``split_map`` names other values (or maps one to ``None``: its items are left
out). Without it
``num_query`` items (a count, or a fraction when < 1) drawn with ``seed`` are queries and the
rest are both train and database; ``num_query=0`` uses every item as train, database and query
(then nothing is held out from training: the test measures memorisation). ``fit`` validates on
``val_split`` of the training items, held out from training, as for every
:class:`~dmmh.data.base.FeatureDataModule`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dmmh.data.base import SPLITS, VAL_SPLIT, FeatureDataModule
from dmmh.registry import DATAMODULES

__all__ = ["PairsDataModule", "PairsDataset", "PairsTable", "read_pairs", "BadRowsError", "SPLIT_NAMES"]

SPLIT_NAMES = {"train": "train", "database": "database", "db": "database", "retrieval": "database",
               "validation": "database", "valid": "database", "val": "database", "query": "query", "test": "query"}
LABEL_MODES = ("auto", "tags", "instance")


class BadRowsError(ValueError):
    """Rows of a pairs metadata file (or HF dataset) that cannot be used; ``rows`` lists ``(row, reason)``."""

    def __init__(self, path: str, rows: list[tuple[int, str]]):
        self.rows = rows
        shown = "\n".join(f"  {reason}" for _, reason in rows[:50])
        more = f"\n  ... and {len(rows) - 50} more" if len(rows) > 50 else ""
        super().__init__(f"{path}: {len(rows)} bad row(s) (on_bad_row='skip' leaves them out):\n{shown}{more}")


def _where(row: int, line: int) -> str:
    return f"row {row} (line {line})" if line else f"row {row}"  # line 0: an item of a JSON array


@dataclass
class PairsTable:
    """The usable items of a metadata file (or HF dataset), in source order."""

    paths: list[str]  # each item's image file; for an image stored in an HF dataset, its place there (a name)
    captions: list[str]
    tags: list[list[str]] | None
    splits: list[str] | None
    rows: list[int]  # each item's row: 1-based in a metadata file, 0-based in an HF dataset (see pairs_hf)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # file line where each item's row starts (0: none)
    source: str = ""  # the metadata file, or the HF dataset's path
    root: str | None = None  # the folder relative image paths are in
    locate: Callable[[int, int], str] = _where  # (row, line) -> the row's place, for messages
    image_bytes: Callable[[int], bytes | None] | None = None  # row -> its encoded image, None when it is a file

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """Item ``i``'s place in the metadata, for error messages."""
        return f"{self.source} {self.locate(self.rows[i], self.lines[i] if i < len(self.lines) else 0)}"

    def image(self, i: int):
        """Item ``i``'s image, RGB (decoded now, from its file or its bytes); errors name its row."""
        data = None if self.image_bytes is None else self.image_bytes(self.rows[i])
        return load_image(self.paths[i] if data is None else data, self.where(i))


def find_metadata(root: str) -> str:
    for name in ("metadata.jsonl", "metadata.csv"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no metadata given and neither {root}/metadata.jsonl nor {root}/metadata.csv exists")


def read_pairs(root: str, metadata: str | None = None, image_column: str | None = None, caption_column: str = "caption",
               tags_column: str | None = "tags", split_column: str | None = "split", tag_sep: str = ",",
               on_bad_row: str = "error", cache_dir: str | None = None, check_images: bool = True,
               allow_outside_root: bool = False, split_map: Mapping[str, str | None] | None = None) -> PairsTable:
    """Read and validate a pairs metadata file (see the module docs). ``check_images`` decodes
    every image once; ``allow_outside_root`` accepts image paths outside ``root``. ``cache_dir``
    is no longer used (the metadata is parsed directly, without a ``datasets`` cache)."""
    check_on_bad_row(on_bad_row)
    if cache_dir is not None:
        warnings.warn("read_pairs/PairsDataModule: cache_dir is no longer used (the metadata is parsed without a "
                      "datasets cache); drop the argument", FutureWarning, stacklevel=2)
    metadata = metadata or find_metadata(root)
    ext = os.path.splitext(metadata)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{metadata}: metadata must be .csv or .jsonl, got {ext or 'no extension'}")
    cols, records, bad = (_read_csv if ext == ".csv" else _read_json_lines)(metadata)
    image_column = image_column or ("image" if "image" in cols else "file_name")
    return check_rows(metadata, cols, records, bad, file_images(root, allow_outside_root, check_images, image_column),
                      image_column=image_column, caption_column=caption_column, tags_column=tags_column,
                      split_column=split_column, tag_sep=tag_sep, split_map=split_map, on_bad_row=on_bad_row, root=root)


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")


def check_split_map(split_map: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """``split_map`` with each value made a dmmh split name (or ``None``: leave those items out)."""
    out = {}
    for key, value in (split_map or {}).items():
        split = None if value is None else SPLIT_NAMES.get(str(value).strip().lower())
        if value is not None and split is None:
            raise ValueError(f"split_map[{key!r}] = {value!r} is not a split: use one of {sorted(SPLIT_NAMES)} or None "
                             f"(leave those items out)")
        out[str(key).strip()] = split
    return out


def split_of(value: Any, split_map: Mapping[str, str | None]) -> str | None:
    """The dmmh split of a split name (``split_map`` first, then :data:`SPLIT_NAMES`, any case);
    ``None`` when ``split_map`` leaves it out. ``KeyError`` when it is neither."""
    name = str(value).strip()
    if name in split_map:
        return split_map[name]
    return SPLIT_NAMES[name.lower()]


# (column value, row's place) -> (image path or name, problem)
ImageCheck = Callable[[Any, str], "tuple[str | None, str | None]"]


def file_images(root: str | None, allow_outside_root: bool, check: bool, column: str) -> ImageCheck:
    """The check of an image given as a file path relative to ``root``: it exists, stays inside
    ``root`` (unless ``allow_outside_root``) and, if ``check``, decodes. Without a ``root`` only
    ``allow_outside_root`` admits file paths (as given)."""
    real_root = None if root is None else os.path.realpath(root)

    def image(value: Any, place: str) -> tuple[str | None, str | None]:
        if not isinstance(value, str) or not value.strip():
            return None, f"no image file name in column {column!r}"
        if root is None:
            if not allow_outside_root:
                return None, (f"image path {value!r} is a file path, and there is no root folder to keep it in: pass "
                              f"root= (the images' folder) or allow_outside_root=True if this data is trusted")
            path = value
        else:
            path = os.path.join(root, value)
            real = os.path.realpath(path)
            if not allow_outside_root and os.path.commonpath([real, real_root]) != real_root:
                return None, (f"image path {value!r} resolves to {real}, outside the root folder {real_root} "
                              f"(pass allow_outside_root=True if this metadata is trusted)")
        if not os.path.isfile(path):
            return None, f"image file {path} does not exist"
        return path, (unreadable(path) if check else None)

    return image


def check_rows(source: str, cols: Sequence[str], records: Iterable[tuple[int, int, dict[str, Any]]],
               bad: list[tuple[int, str]], image: ImageCheck, *, image_column: str, caption_column: str,
               tags_column: str | None, split_column: str | None, tag_sep: str, split_map: Mapping | None,
               on_bad_row: str, root: str | None, locate: Callable[[int, int], str] = _where,
               image_bytes: Callable[[int], bytes | None] | None = None) -> PairsTable:
    """Validate parsed rows ``(row, line, values)`` of ``source`` (columns ``cols``) into a
    :class:`PairsTable`: every source's one check of images (``image``), captions, tags and splits;
    bad rows (with those the parser found, ``bad``) raise or are skipped per ``on_bad_row``."""
    for col in (image_column, caption_column):
        if col not in cols:
            raise ValueError(f"{source}: no column {col!r} (columns: {list(cols)})")
    split_map = check_split_map(split_map)
    has_tags, has_splits = bool(tags_column) and tags_column in cols, bool(split_column) and split_column in cols
    out = PairsTable([], [], [] if has_tags else None, [] if has_splits else None, [], bad_rows=list(bad),
                     source=source, root=root, locate=locate, image_bytes=image_bytes)
    for row, line, rec in records:
        place = locate(row, line)
        split, split_problem = None, None
        if has_splits:
            try:
                split = split_of(rec.get(split_column), split_map)
            except KeyError:
                names = sorted(SPLIT_NAMES) + sorted(set(split_map) - set(SPLIT_NAMES))
                split_problem = f"split {rec.get(split_column)!r} is not one of {names} (split_map= names others)"
            if split is None and split_problem is None:
                continue  # split_map leaves this split out
        path, problem = image(rec.get(image_column), place)
        caption = rec.get(caption_column)
        caption = "" if caption is None else str(caption).strip()
        if problem is None and not caption:
            problem = f"empty caption in column {caption_column!r}"
        tags = _parse_tags(rec.get(tags_column), tag_sep) if has_tags else None
        if problem is None and isinstance(tags, str):
            problem, tags = tags, None
        problem = problem or split_problem
        if problem is not None:
            out.bad_rows.append((row, f"{place}: {problem}"))
            continue
        out.paths.append(path)
        out.captions.append(caption)
        out.rows.append(row)
        out.lines.append(line)
        if out.tags is not None:
            out.tags.append(tags)
        if out.splits is not None:
            out.splits.append(split)
    out.bad_rows.sort()
    if out.bad_rows:
        if on_bad_row == "error":
            raise BadRowsError(source, out.bad_rows)
        warnings.warn(str(BadRowsError(source, out.bad_rows)).replace("(on_bad_row='skip' leaves them out)", "skipped"),
                      stacklevel=3)
    if not len(out):
        raise ValueError(f"{source}: no usable rows")
    return out


Records = list[tuple[int, int, dict[str, Any]]]  # (row, line, values) of each parsed row
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


def _decode(path: str) -> str:
    """The file as text; bytes that are not UTF-8 survive as lone surrogates, found per row later."""
    with open(path, "rb") as f:
        return f.read().decode("utf-8-sig", errors="surrogateescape")


def _not_utf8(text: str) -> str | None:
    m = _NOT_UTF8.search(text)
    return None if m is None else f"is not UTF-8 text (byte 0x{ord(m.group()) - 0xDC00:02X}); save the metadata as UTF-8"


def _read_csv(path: str) -> tuple[list[str], Records, list[tuple[int, str]]]:
    """Header, rows and bad rows of a CSV file. Quoting errors cannot be skipped: an error."""
    reader = csv.reader(io.StringIO(_decode(path), newline=""), strict=True)
    records: Records = []
    bad: list[tuple[int, str]] = []
    header: list[str] | None = None
    line = 1
    try:
        for fields in reader:
            start, line = line, reader.line_num + 1
            if not fields:  # a blank line
                continue
            if header is None:
                header = [h.strip() for h in fields]
                problem = _not_utf8(",".join(header))
                if problem:
                    raise ValueError(f"{path}: line {start} (the header) {problem}")
                twice = sorted({h for h in header if header.count(h) > 1})
                if twice:
                    raise ValueError(f"{path}: line {start} (the header) names column(s) {twice} more than once")
                continue
            row = len(records) + len(bad) + 1
            problem = _not_utf8("\x00".join(fields))
            if problem is None and len(fields) != len(header):
                problem = f"has {len(fields)} fields, the header has {len(header)} (a missing or extra separator?)"
            if problem:
                bad.append((row, f"{_where(row, start)}: {problem}"))
            else:
                records.append((row, start, dict(zip(header, fields))))
    except csv.Error as exc:
        raise ValueError(f"{path}: line {reader.line_num}: malformed CSV ({exc}); no row can be skipped past it: "
                         f"fix the quoting") from None
    if header is None:
        raise ValueError(f"{path}: empty (no header row)")
    return header, records, bad


def _read_json_lines(path: str) -> tuple[list[str], Records, list[tuple[int, str]]]:
    """Columns (union of keys, in first-seen order), rows and bad rows of a JSON Lines file (or a
    ``.json`` file holding one array of objects)."""
    text = _decode(path)
    if path.lower().endswith(".json") and text.lstrip().startswith("["):
        problem = _not_utf8(text)
        if problem:
            raise ValueError(f"{path}: {problem}")
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        numbered = [(i + 1, 0, item) for i, item in enumerate(items)] if isinstance(items, list) else []
    else:
        numbered = []
        for n, raw in enumerate(text.split("\n"), 1):  # not splitlines(): U+2028 may sit inside a JSON string
            if raw.strip():
                numbered.append((len(numbered) + 1, n, raw))
    cols: dict[str, None] = {}
    records: Records = []
    bad: list[tuple[int, str]] = []
    for row, line, item in numbered:
        where = _where(row, line)
        if isinstance(item, str):
            problem = _not_utf8(item)
            if problem:
                bad.append((row, f"{where}: {problem}"))
                continue
            try:
                item = json.loads(item)
            except ValueError as exc:
                bad.append((row, f"{where}: not valid JSON ({exc})"))
                continue
        if not isinstance(item, dict):
            bad.append((row, f"{where}: a JSON {type(item).__name__}, expected an object with the columns"))
            continue
        cols.update(dict.fromkeys(item))
        records.append((row, line, item))
    if not numbered:
        raise ValueError(f"{path}: empty (no JSON object)")
    return list(cols), records, bad


def unreadable(source: str | bytes) -> str | None:
    """Why the image (a file, or encoded bytes) cannot be decoded, or None. ``verify()`` checks
    structure (PNG checksums) but decodes nothing; ``load()`` decodes, so truncated or garbled
    JPEG data fails here."""
    from PIL import Image

    try:
        with Image.open(_opened(source)) as im:
            im.verify()
        with Image.open(_opened(source)) as im:
            im.draft(im.mode, (1, 1))  # JPEG: decode at 1/8 scale, which still reads all of its data
            im.load()
    except Exception as exc:  # PIL raises many types for broken files
        return f"{_named(source)} is unreadable ({type(exc).__name__}: {exc})"
    return None


def _opened(source: str | bytes):
    return io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source


def _named(source: str | bytes) -> str:
    return f"image file {source}" if isinstance(source, str) else f"image ({len(source)} bytes)"


def _parse_tags(value: Any, sep: str) -> list[str] | str:
    """Tags as a list of names, or an error message."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(sep) if t.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return [t.strip() for t in value if t.strip()]
    return f"tags must be a list of strings or a {sep!r}-separated string, got {value!r}"


def load_image(source: str | bytes, where: str | None = None):
    """An RGB PIL image from a file path (or encoded bytes); errors name it (and ``where``, e.g. its metadata row)."""
    from PIL import Image

    try:
        with Image.open(_opened(source)) as im:
            return im.convert("RGB")
    except Exception as exc:
        what = source if isinstance(source, str) else f"({len(source)} bytes)"
        where = f"{where}: " if where else ""
        raise ValueError(f"{where}cannot read image {what} ({type(exc).__name__}: {exc})") from exc


class PairsDataset(Dataset):
    """Items ``rows`` of a :class:`PairsTable` as ``{"image", "text", "label", "index"}``: the image
    (decoded when the item is read) through ``transform``, the caption's token ids, the label row
    (dense, or one-hot of a class id)."""

    def __init__(self, table: PairsTable, tokens: torch.Tensor, labels: np.ndarray, num_classes: int, rows: np.ndarray,
                 transform: Callable):
        self.table, self.tokens, self.labels, self.num_classes = table, tokens, labels, num_classes
        self.rows, self.transform = np.asarray(rows, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        if self.labels.ndim == 1:  # class ids
            label = torch.zeros(self.num_classes)
            label[int(self.labels[r])] = 1
        else:
            label = torch.as_tensor(self.labels[r], dtype=torch.float32)
        return {"image": self.transform(self.table.image(r)), "text": self.tokens[r], "label": label,
                "index": torch.tensor(i, dtype=torch.int64)}


@DATAMODULES.register("pairs")
class PairsDataModule(FeatureDataModule):
    """Custom image–text pairs, fed raw to the ``clip_image`` / ``clip_text`` encoders: a folder of
    images with metadata (``root``), or a Hugging Face dataset (``hf``, or :meth:`from_hf`).

    Args:
        root: folder of the images (and of ``metadata.jsonl`` / ``metadata.csv`` by default); with
            ``hf``, the folder image *paths* of the dataset are relative to and kept in (default:
            the ``hf`` folder, or a file's folder).
        metadata: CSV or JSONL file; default ``root/metadata.jsonl``, else ``root/metadata.csv``.
        image_column: default ``"image"``, else ``"file_name"`` (HF imagefolder metadata).
        caption_column, tags_column, split_column: column names (missing tags / split columns are fine).
        tag_sep: separator of tags given as one string.
        labels: ``"tags"``, ``"instance"`` or ``"auto"`` (tags when the column exists).
        max_instance_classes: refuse ``"instance"`` labels above this many distinct captions.
        on_bad_row: ``"error"`` or ``"skip"`` (see the module docs).
        allow_outside_root: accept image paths that lead outside ``root`` (default: a bad row).
        num_query: queries drawn when there is no split column (count, or fraction when < 1).
        clip_model, clip_pretrained, clip_config: build the image transform and tokenizer of this
            open_clip model (see :class:`dmmh.encoders.clip.ClipBackbone`) ...
        transform, tokenizer: ... or pass them (``PIL image → tensor``, ``list[str] → (N, L) ids``).
        cache_dir: no longer used (deprecated; the metadata is parsed without a cache).
        hf: a Hugging Face dataset instead of ``root``'s metadata: a ``datasets.Dataset`` or
            ``DatasetDict``, a ``save_to_disk`` folder, or a local folder / file that
            ``datasets.load_dataset`` reads (see :mod:`dmmh.data.pairs_hf`). Only a path is kept
            in the hyperparameters (and in checkpoints).
        split_map: split names (split column values, or a ``DatasetDict``'s splits) → ``"train"``,
            ``"database"``, ``"query"``, or ``None`` to leave those items out; over :data:`SPLIT_NAMES`.
        check_images: decode every image once on load, so bad images are bad rows up front
            (default); ``False`` defers that to when each item is read (an error naming its row).
        batch_size, eval_batch_size, num_workers, seed, val_split, val_seed: see
            :class:`~dmmh.data.base.FeatureDataModule`.
    """

    def __init__(self, root: str | None = None, metadata: str | None = None, image_column: str | None = None,
                 caption_column: str = "caption", tags_column: str | None = "tags", split_column: str | None = "split",
                 tag_sep: str = ",", labels: str = "auto", max_instance_classes: int = 20000, on_bad_row: str = "error",
                 num_query: float = 0, clip_model: str | None = None, clip_pretrained: str | None = None,
                 clip_config: Mapping[str, Any] | None = None, transform: Callable | None = None,
                 tokenizer: Callable | None = None, cache_dir: str | None = None, batch_size: int = 64,
                 eval_batch_size: int = 256, num_workers: int = 0, seed: int = 0, allow_outside_root: bool = False,
                 val_split: Union[float, Literal["test"]] = VAL_SPLIT, val_seed: int = 0, hf: str | Any | None = None,
                 split_map: dict[str, Optional[str]] | None = None, check_images: bool = True):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                         val_split=val_split, val_seed=val_seed)
        if hf is None and root is None:
            raise ValueError("PairsDataModule needs root= (a folder of images with metadata) or hf= (a Hugging Face "
                             "dataset)")
        if hf is not None and metadata is not None:
            raise ValueError("metadata= names a metadata file of root=; with hf= the dataset holds the metadata")
        if hf is not None and cache_dir is not None:
            raise ValueError("cache_dir= is not used with hf=: datasets keeps its own cache (HF_DATASETS_CACHE)")
        hf = os.fspath(hf) if isinstance(hf, os.PathLike) else hf
        check_split_map(split_map)
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        if num_query < 0:
            raise ValueError(f"num_query must be >= 0, got {num_query}")
        if num_query >= 1 and num_query != int(num_query):
            raise ValueError(f"num_query must be a whole count when >= 1 (a fraction when < 1), got {num_query}")
        # a Dataset object stays out of the hyperparameters: checkpoints hold plain data only
        an_object = hf is not None and not isinstance(hf, str)
        self.save_hyperparameters(ignore=["transform", "tokenizer"] + ["hf"] * an_object)
        self.read_kwargs = dict(image_column=image_column, caption_column=caption_column, tags_column=tags_column,
                                split_column=split_column, tag_sep=tag_sep, on_bad_row=on_bad_row, split_map=split_map,
                                allow_outside_root=allow_outside_root, check_images=check_images)
        if hf is None:
            self.read_kwargs.update(metadata=metadata, cache_dir=cache_dir)
        self.root, self.hf, self.labels_mode, self.max_instance_classes = root, hf, labels, int(max_instance_classes)
        self.num_query = num_query
        self._transform, self._tokenizer = transform, tokenizer
        self.table: PairsTable | None = None

    @classmethod
    def from_hf(cls, dataset: Any, image_column: str = "image", caption_column: str = "caption",
                tags_column: str | None = "tags", split_column: str | None = "split", **kw) -> PairsDataModule:
        """Pairs from a Hugging Face dataset: a ``datasets.Dataset`` / ``DatasetDict``, a
        ``save_to_disk`` folder, or a local folder / file ``datasets.load_dataset`` reads (offline:
        nothing is downloaded). ``kw``: the class's other arguments (``split_map``, ``labels``,
        ``num_query``, ``clip_model`` or ``transform`` + ``tokenizer``, ``root``, ...). The same as
        ``PairsDataModule(hf=dataset, ...)``, the form configs and the command line use."""
        return cls(hf=dataset, image_column=image_column, caption_column=caption_column, tags_column=tags_column,
                   split_column=split_column, **kw)

    # -- loading -----------------------------------------------------------------------------
    def _clip_tools(self) -> None:
        if self._transform is not None and self._tokenizer is not None:
            return
        h = self.hparams
        if h["clip_model"] is None:
            raise ValueError("PairsDataModule needs an image transform and a tokenizer: pass clip_model= (an open_clip "
                             "architecture) or transform= and tokenizer=")
        from dmmh.encoders.clip import ClipBackbone

        backbone = ClipBackbone(h["clip_model"], h["clip_pretrained"], h["clip_config"])
        self._transform = self._transform or backbone.transform
        self._tokenizer = self._tokenizer or backbone.tokenize

    @property
    def transform(self) -> Callable:
        """The image transform (``PIL image → (3, H, W)`` tensor)."""
        self._clip_tools()
        return self._transform

    @property
    def tokenizer(self) -> Callable:
        """The tokenizer (``list[str] → (N, context_length)`` int64 ids)."""
        self._clip_tools()
        tok = self._tokenizer
        return lambda texts: torch.as_tensor(tok(texts)).to(torch.int64)

    @property
    def splits(self) -> dict[str, np.ndarray]:  # type: ignore[override]
        """Split → item positions in :attr:`table` (train ⊂ database)."""
        if self._splits is None:
            self._splits = self._load()
        return self._splits

    def _load(self) -> dict[str, np.ndarray]:
        self._clip_tools()
        if self.hf is None:
            t = read_pairs(self.root, **self.read_kwargs)
        else:
            from dmmh.data.pairs_hf import read_hf_pairs

            t = read_hf_pairs(self.hf, root=self.root, **self.read_kwargs)
        self.table = t
        self.tokens = self.tokenizer(t.captions)
        self.label_array, self.classes = self._labels(t)
        return self._split_rows(t)

    def _labels(self, t: PairsTable) -> tuple[np.ndarray, list[str]]:
        mode = self.labels_mode if self.labels_mode != "auto" else ("tags" if t.tags is not None else "instance")
        if mode == "tags":
            if t.tags is None:
                raise ValueError(f"labels='tags' but the metadata has no {self.read_kwargs['tags_column']!r} column")
            classes = sorted({tag for tags in t.tags for tag in tags})
            if not classes:
                raise ValueError(f"labels={self.labels_mode!r}: the {self.read_kwargs['tags_column']!r} column holds no tag "
                                 f"in any row; fill it, or pass labels='instance' (or tags_column=None)")
            col = {c: j for j, c in enumerate(classes)}
            y = np.zeros((len(t), len(classes)), dtype=np.float32)
            for i, tags in enumerate(t.tags):
                y[i, [col[tag] for tag in tags]] = 1
            return y, classes
        keys = [" ".join(c.lower().split()) for c in t.captions]
        classes = sorted(set(keys))
        if len(classes) > self.max_instance_classes:
            raise ValueError(f"labels='instance' would make {len(classes)} classes (> max_instance_classes="
                             f"{self.max_instance_classes}); give the items tags")
        col = {c: j for j, c in enumerate(classes)}
        return np.array([col[k] for k in keys], dtype=np.int64), classes

    def _split_rows(self, t: PairsTable) -> dict[str, np.ndarray]:
        n = len(t)
        if t.splits is not None:
            s = np.array(t.splits)
            out = {"train": np.flatnonzero(s == "train"), "database": np.flatnonzero(s != "query"),
                   "query": np.flatnonzero(s == "query")}
        else:
            k = int(round(self.num_query * n)) if self.num_query < 1 else int(self.num_query)
            if self.num_query > 0:
                k = max(k, 1)  # a small fraction must not round to 0, which means "every item is a query"
            if k >= n:
                raise ValueError(f"num_query={self.num_query} leaves no database item out of {n}")
            perm = np.random.default_rng(self.seed).permutation(n)
            query, rest = np.sort(perm[:k]), np.sort(perm[k:])
            out = {"train": rest, "database": rest, "query": query if k else rest}
        empty = [s for s in SPLITS if not len(out[s])]
        if empty:
            raise ValueError(f"split(s) {empty} have no items (split column values: train, database, query)")
        return out

    # -- shapes, read by the CLI to build the model --------------------------------------------
    @property
    def image_dim(self) -> int:
        return 3

    @property
    def text_dim(self) -> int:
        self.splits  # noqa: B018  (loads)
        return int(self.tokens.shape[1])

    @property
    def num_classes(self) -> int:
        self.splits  # noqa: B018
        return len(self.classes) if self.label_array.ndim == 1 else int(self.label_array.shape[1])

    def dataset(self, role: str) -> PairsDataset:
        """The items of ``role``: a split, or a role of ``fit`` (see :data:`~dmmh.data.base.ROLES`)."""
        split, positions = self.rows(role)
        rows = self.splits[split] if positions is None else self.splits[split][positions]
        return PairsDataset(self.table, self.tokens, self.label_array, self.num_classes, rows, self._transform)

    def all_items(self) -> PairsDataset:
        """Every usable item, in file order."""
        self.splits  # noqa: B018
        return PairsDataset(self.table, self.tokens, self.label_array, self.num_classes, np.arange(len(self.table)),
                            self._transform)

"""``pairs``: a folder of images plus a CSV / JSONL of ``image, caption[, tags][, split]``.

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
``database`` (alias ``db``, ``retrieval``) or ``query`` (alias ``test``); without it
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
from typing import Any, Callable, Literal, Mapping, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from dmmh.data.base import SPLITS, VAL_SPLIT, FeatureDataModule
from dmmh.registry import DATAMODULES

__all__ = ["PairsDataModule", "PairsDataset", "PairsTable", "read_pairs", "BadRowsError"]

SPLIT_NAMES = {"train": "train", "database": "database", "db": "database", "retrieval": "database",
               "query": "query", "test": "query"}
LABEL_MODES = ("auto", "tags", "instance")


class BadRowsError(ValueError):
    """Rows of a pairs metadata file that cannot be used; ``rows`` lists ``(row, reason)``."""

    def __init__(self, path: str, rows: list[tuple[int, str]]):
        self.rows = rows
        shown = "\n".join(f"  {reason}" for _, reason in rows[:50])
        more = f"\n  ... and {len(rows) - 50} more" if len(rows) > 50 else ""
        super().__init__(f"{path}: {len(rows)} bad row(s) (on_bad_row='skip' leaves them out):\n{shown}{more}")


@dataclass
class PairsTable:
    """The usable items of a metadata file, in file order."""

    paths: list[str]
    captions: list[str]
    tags: list[list[str]] | None
    splits: list[str] | None
    rows: list[int]  # 1-based row number of each item in the metadata
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # file line where each item's row starts
    source: str = ""  # the metadata file

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, i: int) -> str:
        """Item ``i``'s place in the metadata, for error messages."""
        return f"{self.source} {_where(self.rows[i], self.lines[i] if i < len(self.lines) else 0)}"


def find_metadata(root: str) -> str:
    for name in ("metadata.jsonl", "metadata.csv"):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no metadata given and neither {root}/metadata.jsonl nor {root}/metadata.csv exists")


def read_pairs(root: str, metadata: str | None = None, image_column: str | None = None, caption_column: str = "caption",
               tags_column: str | None = "tags", split_column: str | None = "split", tag_sep: str = ",",
               on_bad_row: str = "error", cache_dir: str | None = None, check_images: bool = True,
               allow_outside_root: bool = False) -> PairsTable:
    """Read and validate a pairs metadata file (see the module docs). ``check_images`` decodes
    every image once; ``allow_outside_root`` accepts image paths outside ``root``. ``cache_dir``
    is no longer used (the metadata is parsed directly, without a ``datasets`` cache)."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if cache_dir is not None:
        warnings.warn("read_pairs/PairsDataModule: cache_dir is no longer used (the metadata is parsed without a "
                      "datasets cache); drop the argument", FutureWarning, stacklevel=2)
    metadata = metadata or find_metadata(root)
    ext = os.path.splitext(metadata)[1].lower()
    if ext not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"{metadata}: metadata must be .csv or .jsonl, got {ext or 'no extension'}")
    cols, records, bad = (_read_csv if ext == ".csv" else _read_json_lines)(metadata)
    image_column = image_column or ("image" if "image" in cols else "file_name")
    for col in (image_column, caption_column):
        if col not in cols:
            raise ValueError(f"{metadata}: no column {col!r} (columns: {cols})")
    has_tags, has_splits = bool(tags_column) and tags_column in cols, bool(split_column) and split_column in cols
    real_root = os.path.realpath(root)
    out = PairsTable([], [], [] if has_tags else None, [] if has_splits else None, [], bad_rows=bad, source=metadata)
    for row, line, rec in records:
        problem, path = None, None
        image, caption = rec.get(image_column), rec.get(caption_column)
        caption = "" if caption is None else str(caption).strip()
        if not isinstance(image, str) or not image.strip():
            problem = f"no image file name in column {image_column!r}"
        else:
            path = os.path.join(root, image)
            real = os.path.realpath(path)
            if not allow_outside_root and os.path.commonpath([real, real_root]) != real_root:
                problem = (f"image path {image!r} resolves to {real}, outside the root folder {real_root} "
                           f"(pass allow_outside_root=True if this metadata is trusted)")
            elif not os.path.isfile(path):
                problem = f"image file {path} does not exist"
            elif check_images:
                problem = _unreadable(path)
        if problem is None and not caption:
            problem = f"empty caption in column {caption_column!r}"
        tags = _parse_tags(rec.get(tags_column), tag_sep) if has_tags else None
        if problem is None and isinstance(tags, str):
            problem, tags = tags, None
        split = None
        if problem is None and has_splits:
            split = SPLIT_NAMES.get(str(rec.get(split_column)).strip().lower())
            if split is None:
                problem = f"split {rec.get(split_column)!r} is not one of {sorted(SPLIT_NAMES)}"
        if problem is not None:
            out.bad_rows.append((row, f"{_where(row, line)}: {problem}"))
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
            raise BadRowsError(metadata, out.bad_rows)
        warnings.warn(str(BadRowsError(metadata, out.bad_rows)).replace("(on_bad_row='skip' leaves them out)", "skipped"), stacklevel=2)
    if not len(out):
        raise ValueError(f"{metadata}: no usable rows")
    return out


Records = list[tuple[int, int, dict[str, Any]]]  # (row, line, values) of each parsed row
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"


def _where(row: int, line: int) -> str:
    return f"row {row} (line {line})" if line else f"row {row}"  # line 0: an item of a JSON array


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


def _unreadable(path: str) -> str | None:
    """Why the image cannot be decoded, or None. ``verify()`` checks structure (PNG checksums) but
    decodes nothing; ``load()`` decodes, so truncated or garbled JPEG data fails here."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.draft(im.mode, (1, 1))  # JPEG: decode at 1/8 scale, which still reads all of its data
            im.load()
    except Exception as exc:  # PIL raises many types for broken files
        return f"image file {path} is unreadable ({type(exc).__name__}: {exc})"
    return None


def _parse_tags(value: Any, sep: str) -> list[str] | str:
    """Tags as a list of names, or an error message."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(sep) if t.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return [t.strip() for t in value if t.strip()]
    return f"tags must be a list of strings or a {sep!r}-separated string, got {value!r}"


def load_image(path: str, where: str | None = None):
    """An RGB PIL image; errors name the file (and ``where``, e.g. its metadata row)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:
        raise ValueError(f"{where + ': ' if where else ''}cannot read image {path} ({type(exc).__name__}: {exc})") from exc


class PairsDataset(Dataset):
    """Items ``rows`` of a table as ``{"image", "text", "label", "index"}``: the image through
    ``transform``, the caption's token ids, the label row (dense, or one-hot of a class id).
    ``where(r)`` names table item ``r`` in image errors (e.g. :meth:`PairsTable.where`)."""

    def __init__(self, paths: Sequence[str], tokens: torch.Tensor, labels: np.ndarray, num_classes: int,
                 rows: np.ndarray, transform: Callable, where: Callable[[int], str] | None = None):
        self.paths, self.tokens, self.labels, self.num_classes = paths, tokens, labels, num_classes
        self.rows, self.transform, self.where = np.asarray(rows, dtype=np.int64), transform, where

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = int(self.rows[i])
        if self.labels.ndim == 1:  # class ids
            label = torch.zeros(self.num_classes)
            label[int(self.labels[r])] = 1
        else:
            label = torch.as_tensor(self.labels[r], dtype=torch.float32)
        image = load_image(self.paths[r], self.where(r) if self.where is not None else None)
        return {"image": self.transform(image), "text": self.tokens[r], "label": label,
                "index": torch.tensor(i, dtype=torch.int64)}


@DATAMODULES.register("pairs")
class PairsDataModule(FeatureDataModule):
    """Custom image–text pairs, fed raw to the ``clip_image`` / ``clip_text`` encoders.

    Args:
        root: folder of the images (and of ``metadata.jsonl`` / ``metadata.csv`` by default).
        metadata: CSV or JSONL file; default ``root/metadata.jsonl``, else ``root/metadata.csv``.
        image_column: default ``"image"``, else ``"file_name"`` (HF imagefolder).
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
        batch_size, eval_batch_size, num_workers, seed, val_split, val_seed: see
            :class:`~dmmh.data.base.FeatureDataModule`.
    """

    def __init__(self, root: str, metadata: str | None = None, image_column: str | None = None,
                 caption_column: str = "caption", tags_column: str | None = "tags", split_column: str | None = "split",
                 tag_sep: str = ",", labels: str = "auto", max_instance_classes: int = 20000, on_bad_row: str = "error",
                 num_query: float = 0, clip_model: str | None = None, clip_pretrained: str | None = None,
                 clip_config: Mapping[str, Any] | None = None, transform: Callable | None = None,
                 tokenizer: Callable | None = None, cache_dir: str | None = None, batch_size: int = 64,
                 eval_batch_size: int = 256, num_workers: int = 0, seed: int = 0, allow_outside_root: bool = False,
                 val_split: Union[float, Literal["test"]] = VAL_SPLIT, val_seed: int = 0):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                         val_split=val_split, val_seed=val_seed)
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        if num_query < 0:
            raise ValueError(f"num_query must be >= 0, got {num_query}")
        if num_query >= 1 and num_query != int(num_query):
            raise ValueError(f"num_query must be a whole count when >= 1 (a fraction when < 1), got {num_query}")
        self.save_hyperparameters(ignore=["transform", "tokenizer"])
        self.read_kwargs = dict(metadata=metadata, image_column=image_column, caption_column=caption_column,
                                tags_column=tags_column, split_column=split_column, tag_sep=tag_sep,
                                on_bad_row=on_bad_row, cache_dir=cache_dir, allow_outside_root=allow_outside_root)
        self.root, self.labels_mode, self.max_instance_classes = root, labels, int(max_instance_classes)
        self.num_query = num_query
        self._transform, self._tokenizer = transform, tokenizer
        self.table: PairsTable | None = None

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
        t = self.table = read_pairs(self.root, **self.read_kwargs)
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
        return PairsDataset(self.table.paths, self.tokens, self.label_array, self.num_classes, rows, self._transform,
                            self.table.where)

    def all_items(self) -> PairsDataset:
        """Every usable item, in file order."""
        self.splits  # noqa: B018
        return PairsDataset(self.table.paths, self.tokens, self.label_array, self.num_classes,
                            np.arange(len(self.table)), self._transform, self.table.where)

"""What an index is encoded from: a DataModule (class path + init args) and one of its splits.

A :class:`Collection` is plain data (it goes into the index manifest), so ``dmmh search`` can
build the same DataModule again to fetch an item by id. It is named three ways: a folder of
image–caption pairs (``metadata.jsonl`` / ``.csv``: the ``pairs`` DataModule), a registered
DataModule name (``dmmh.list_datamodules()``), or a class path ``pkg.module.Class``, with a dict
of init args (``dmmh encode`` parses them as ``dmmh fit`` does: ``-c CONFIG``, ``--data.ARG``).
Relative ``root`` / ``metadata`` / ``cache_dir`` / ``hf`` paths are made absolute, so the record works
from any working directory.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from dmmh.data.base import SPLITS, FeatureDataModule
from dmmh.data.pairs import PairsDataModule

__all__ = ["Collection", "item_descriptions"]

PATH_ARGS = ("root", "metadata", "cache_dir", "hf")


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    if "." not in name:
        from dmmh.registry import DATAMODULES

        cls = DATAMODULES.get(name)  # unknown names raise with suggestions
    else:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"DataModule class path {name!r} cannot be imported ({type(exc).__name__}: {exc})") from exc
    if not (isinstance(cls, type) and issubclass(cls, FeatureDataModule)):
        raise TypeError(f"{name!r} is not a dmmh FeatureDataModule subclass (encoding reads its dataset(split))")
    return cls


@dataclass(frozen=True)
class Collection:
    """A DataModule class path, its init args, and the split whose items are indexed."""

    class_path: str
    init_args: dict[str, Any] = field(default_factory=dict)
    split: str = "database"

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")

    @classmethod
    def resolve(cls, data: str, init_args: Mapping[str, Any] | None = None, split: str = "database") -> Collection:
        """The collection ``data`` names (pairs folder, registered name or class path) with ``init_args``."""
        args = dict(init_args or {})
        if os.path.isdir(data):
            klass, args = PairsDataModule, {**args, "root": data}
        else:
            klass = _resolve_class(data)
        for key in PATH_ARGS:
            if isinstance(args.get(key), str):
                args[key] = os.path.abspath(args[key])
        return cls(_class_path(klass), args, split)

    @property
    def datamodule_class(self) -> type:
        return _resolve_class(self.class_path)

    def datamodule(self, module=None) -> FeatureDataModule:
        """Build the DataModule. A pairs collection takes its image transform and tokenizer from
        ``module``'s ``clip_image`` / ``clip_text`` encoders unless its args name a CLIP model."""
        klass, args = self.datamodule_class, dict(self.init_args)
        if issubclass(klass, PairsDataModule) and module is not None and args.get("clip_model") is None \
                and (args.get("transform") is None or args.get("tokenizer") is None):
            from dmmh.encoders.clip import ClipImageEncoder, ClipTextEncoder

            image, text = module.model.encoders["image"], module.model.encoders["text"]
            if not (isinstance(image, ClipImageEncoder) and isinstance(text, ClipTextEncoder)):
                raise ValueError(
                    "a pairs folder holds images and captions: it needs a model with clip_image and clip_text encoders; "
                    f"this checkpoint's encoders are {type(image).__name__} and {type(text).__name__} (for a model trained "
                    "on extracted features, encode the feature file, e.g. the one `dmmh extract` writes)")
            args["transform"] = args.get("transform") or image.transform
            args["tokenizer"] = args.get("tokenizer") or text.tokenizer
        try:
            return klass(**args)
        except TypeError as exc:
            raise TypeError(f"cannot build {self.class_path} with args {sorted(self.init_args)}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": dict(self.init_args), "split": self.split}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Collection:
        return cls(d["class_path"], dict(d.get("init_args") or {}), d.get("split", "database"))


def item_descriptions(dm: FeatureDataModule, split: str) -> dict[str, list[str]] | None:
    """Image path and caption of every item of ``split`` (by position) for a pairs collection, else ``None``."""
    if not isinstance(dm, PairsDataModule):
        return None
    rows = dm.splits[split]
    return {"image": [dm.table.paths[r] for r in rows], "caption": [dm.table.captions[r] for r in rows]}

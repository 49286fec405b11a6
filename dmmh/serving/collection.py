"""What an index is encoded from: a DataModule (class path + init args) and one of its splits.

A :class:`Collection` is plain data (it goes into the index manifest), so ``dmmh search`` can
build the same DataModule again to fetch an item by id. ``--data`` names it three ways: a folder
of image–caption pairs (``metadata.jsonl`` / ``.csv``: the ``pairs`` DataModule), a registered
DataModule name (``dmmh.list_datamodules()``), or a class path ``pkg.module.Class``; its init
args come from a LightningCLI config's ``data`` section and/or a dict (later wins). Relative
``root`` / ``metadata`` / ``cache_dir`` paths are made absolute, so the record works from any
working directory.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dmmh.data.base import SPLITS, FeatureDataModule
from dmmh.data.pairs import PairsDataModule

__all__ = ["Collection", "item_descriptions"]

PATH_ARGS = ("root", "metadata", "cache_dir")


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


def _config_data(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """``(class path or None, init args)`` from a LightningCLI YAML's ``data`` section."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text()) or {}
    data = cfg.get("data") if isinstance(cfg, dict) else None
    if data is None:
        raise ValueError(f"{path}: no 'data' section (expected LightningCLI's data: class_path / init_args)")
    if isinstance(data, str):
        return data, {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: 'data' must be a class path or a mapping, got {type(data).__name__}")
    if "class_path" in data:
        args = data.get("init_args") or {}
        if not isinstance(args, dict):
            raise ValueError(f"{path}: data.init_args must be a mapping, got {type(args).__name__}")
        return str(data["class_path"]), dict(args)
    return None, dict(data)


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
    def resolve(cls, data: str | None = None, init_args: Mapping[str, Any] | None = None, split: str = "database",
                config: str | os.PathLike | None = None) -> Collection:
        """The collection named by ``data`` (pairs folder, registered name or class path) and/or
        ``config`` (LightningCLI YAML), with ``init_args`` over the config's."""
        cfg_class, args = _config_data(config) if config is not None else (None, {})
        args.update(init_args or {})
        if data is None and cfg_class is None:
            raise ValueError("no collection given: pass data (a pairs folder, DataModule name or class path) or a "
                             "config whose data section has a class_path")
        if data is not None and os.path.isdir(data):
            klass, args = PairsDataModule, {**args, "root": data}
        else:
            klass = _resolve_class(data if data is not None else cfg_class)
        if data is not None and cfg_class is not None and _resolve_class(cfg_class) is not klass:
            raise ValueError(f"data {data!r} is {_class_path(klass)} but config {config} names {cfg_class!r}; "
                             f"its init args are for another DataModule")
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
        if issubclass(klass, PairsDataModule) and module is not None and args.get("clip_model") is None:
            from dmmh.encoders.clip import ClipImageEncoder, ClipTextEncoder

            image, text = module.model.encoders["image"], module.model.encoders["text"]
            if not (isinstance(image, ClipImageEncoder) and isinstance(text, ClipTextEncoder)):
                raise ValueError(
                    "a pairs folder holds images and captions: it needs a model with clip_image and clip_text encoders; "
                    f"this checkpoint's encoders are {type(image).__name__} and {type(text).__name__} (for a model trained "
                    "on extracted features, encode the feature file, e.g. the one `dmmh extract` writes)")
            args.setdefault("transform", image.transform)
            args.setdefault("tokenizer", text.tokenizer)
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

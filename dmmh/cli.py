"""The ``dmmh`` command: LightningCLI's ``fit|validate|test|predict`` plus dmmh's own subcommands.

``dmmh fit -c mirflickr/dmmh_64 --data.root PATH`` trains: ``-c`` takes a config file or the short
name of a config shipped inside dmmh (:func:`config_names`), ``--data`` a DataModule class path or
its registered short name (``--data mirflickr``). The data module's feature widths and class count
are linked into the model's arguments. Checkpoints are loaded with ``weights_only=True`` unless
``--weights_only false`` is given (see docs/trust.md). dmmh's own subcommands live in
:mod:`dmmh.commands` (one module each, imported only when used).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.resources
import logging
import os
import pkgutil
import re
import sys
import warnings
from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from dmmh._optional import MissingDependencyError
from dmmh.commands import COMMANDS, run
from dmmh.data.base import FeatureDataModule
from dmmh.models.lit import DMMHModule

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI; -c CONFIG, --data.root PATH, --trainer.*, --model.*)",
    "validate": "evaluate on the validation data",
    "test": "evaluate on the test data (queries against the database)",
    "predict": "encode the query and database splits",
}
CONFIG_FLAGS = ("-c", "--config")
# the DataModule properties that build the model (linked into its arguments)
DATA_LINKS = {"image_dim": "model.image_dim", "text_dim": "model.text_dim", "num_classes": "model.n_classes"}


# -- configs shipped in the package --------------------------------------------------------------
def config_names() -> list[str]:
    """Short names of the configs shipped in dmmh (``"mirflickr/dmmh_64"``, ...), usable as ``-c NAME``."""
    root = importlib.resources.files("dmmh") / "configs"
    return sorted(f"{d.name}/{f.name[:-5]}" for d in root.iterdir() if d.is_dir()
                  for f in d.iterdir() if f.name.endswith(".yaml"))


def resolve_config(value: str, stack: contextlib.ExitStack) -> str:
    """A ``-c`` value as LightningCLI reads it: an existing file or inline YAML unchanged, the short name of
    a shipped config (``mirflickr/dmmh_64``, ``.yaml`` optional) its file's path (valid while ``stack``
    is open); anything else is an error listing the shipped configs."""
    if os.path.exists(value) or "\n" in value or ":" in value or value.lstrip().startswith("{"):
        return value
    names = config_names()
    name = value.removesuffix(".yaml")
    if name in names:
        resource = importlib.resources.files("dmmh") / "configs" / f"{name}.yaml"
        return str(stack.enter_context(importlib.resources.as_file(resource)))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise SystemExit(f"dmmh: config {value!r} is neither a file nor a config shipped with dmmh; {hint}"
                     f"shipped configs (-c NAME): {', '.join(names)}")


# -- argv: short names for configs and DataModules -----------------------------------------------
def datamodule_class_path(name: str) -> str:
    """The class path of the DataModule registered as ``name`` (``"mirflickr"`` -> ``dmmh.data.benchmarks.MIRFlickr25K``)."""
    from dmmh.registry import DATAMODULES

    cls = DATAMODULES.get(name)
    if not (isinstance(cls, type) and issubclass(cls, LightningDataModule)):
        raise SystemExit(f"dmmh: datamodule {name!r} is registered as {cls!r}, not a LightningDataModule class; "
                         f"pass a class path (--data pkg.module.Class)")
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_registered_datamodule(value: str) -> bool:
    from dmmh.registry import DATAMODULES

    return "." not in value and value in DATAMODULES


def expand_args(args: list[str], stack: contextlib.ExitStack) -> list[str]:
    """Rewrite ``-c NAME`` (a shipped config) and ``--data NAME`` (a registered DataModule) to what
    LightningCLI reads: a file path and a class path. Everything else is left as given."""
    out: list[str] = []
    flag: str | None = None  # the option whose value comes next
    for arg in args:
        if flag is not None:
            out.append(resolve_config(arg, stack) if flag in CONFIG_FLAGS else
                       datamodule_class_path(arg) if _is_registered_datamodule(arg) else arg)
            flag = None
        elif arg in (*CONFIG_FLAGS, "--data"):
            out.append(arg)
            flag = arg
        elif arg.startswith(("--config=", "--data=")):
            key, _, value = arg.partition("=")
            value = resolve_config(value, stack) if key == "--config" else \
                datamodule_class_path(value) if _is_registered_datamodule(value) else value
            out.append(f"{key}={value}")
        else:
            out.append(arg)
    return out


# -- parse errors: suggest the class path that was meant -----------------------------------------
def closest_class_path(path: str) -> str | None:
    """The importable class path closest to a misspelt ``path`` (each dotted part replaced by the closest
    attribute or submodule of what precedes it), or ``None``."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
    except ImportError:
        return None
    fixed = [parts[0]]
    for part in parts[1:]:
        names = {n for n in dir(obj) if not n.startswith("_")}
        names |= {m.name for m in pkgutil.iter_modules(getattr(obj, "__path__", []))}
        if part not in names:
            close = difflib.get_close_matches(part, sorted(names), n=1, cutoff=0.5)
            if not close:
                return None
            part = close[0]
        fixed.append(part)
        try:
            obj = getattr(obj, part) if hasattr(obj, part) else importlib.import_module(".".join(fixed))
        except ImportError:
            return None
    return ".".join(fixed) if isinstance(obj, type) and fixed != parts else None


def class_path_hint(message: str) -> str:
    """A "did you mean" line for the class path or DataModule name in a jsonargparse error ('' when none)."""
    from dmmh.registry import DATAMODULES

    m = re.search(r"class_path '([\w.]+)'", message) or re.search(r"Given value: ([\w.]+\.[\w.]+)$", message, re.M)
    if m:
        close = [c] if (c := closest_class_path(m.group(1))) else []
    elif m := re.search(r"Expected a dot import path string: (\S+)", message):  # --data NAME, unregistered
        close = difflib.get_close_matches(m.group(1), DATAMODULES.list(aliases=True), n=3, cutoff=0.5)
        if not close:
            return f"\n--data takes a class path or a registered DataModule name: {', '.join(DATAMODULES.list())}"
    else:
        return ""
    return f"\ndid you mean {' or '.join(repr(c) for c in close)}?" if close else ""


class DMMHArgumentParser(LightningArgumentParser):
    """LightningCLI's parser; its errors about a misspelt class path suggest the closest names."""

    def error(self, message: str, ex: Exception | None = None):
        return super().error(message + class_path_hint(message), ex)


# -- Lightning's messages that dmmh's own defaults cause -------------------------------------------
class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Silence what Lightning says on every run of dmmh's defaults, not what it says about the user's setup:
    its litlogger/litmodels tips (shown with the default loggers and ModelCheckpoint) and the ``LeafSpec``
    deprecation that current torch raises inside Lightning's evaluation loop (nothing a user can act on)."""
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in log.filters):
        log.addFilter(_DropTips())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)


class DMMHCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the whole DataModule is the link's source, so that an error raised while it computes a width
        # surfaces (linking "data.image_dim" lets jsonargparse's hasattr() swallow an AttributeError)
        for attr, target in DATA_LINKS.items():
            parser.link_arguments("data", target, compute_fn=_DataAttribute(attr), apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        sub = self.config.get(self.subcommand) if self.subcommand else None
        if sub is not None and sub.get("weights_only", False) is None:
            sub["weights_only"] = True  # explicit, so TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot reopen pickle

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as exc:  # jsonargparse wraps what a link's compute_fn raised: show the real error
            if isinstance(exc.__cause__, _DataAttributeError):
                raise exc.__cause__.__cause__ from None
            raise
        if getattr(type(self.datamodule), "dataset", None) is FeatureDataModule.dataset:
            # rows of in-memory or memory-mapped arrays: DataLoader workers would only add overhead
            warnings.filterwarnings("ignore", message=".*does not have many workers", category=PossibleUserWarning)

    def after_fit(self) -> None:
        ckpt = self.trainer.checkpoint_callback
        if ckpt is not None and self.trainer.is_global_zero and (ckpt.last_model_path or ckpt.best_model_path):
            print(f"checkpoints: last {ckpt.last_model_path or '-'}, best {ckpt.best_model_path or '-'}")


class _DataAttributeError(Exception):
    """Carries what a DataModule raised while computing a linked attribute (see DMMHCLI.instantiate_classes)."""


class _DataAttribute:
    """``compute_fn`` of a link: reads one attribute of the DataModule (picklable, named in ``--help``)."""

    def __init__(self, attr: str):
        self.attr = self.__name__ = attr

    def __call__(self, datamodule: Any) -> Any:
        try:
            return getattr(datamodule, self.attr)
        except Exception as exc:
            raise _DataAttributeError(self.attr) from exc


def cli(args: list[str] | None = None, run: bool = True) -> DMMHCLI:
    """Build (and by default run) the LightningCLI over :class:`DMMHModule` and any DataModule."""
    import dmmh  # noqa: F401  (registers every built-in DataModule class for short class paths)

    quiet_lightning()
    return DMMHCLI(
        DMMHModule,
        FeatureDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        parser_class=DMMHArgumentParser,
    )


def datamodule_from_args(args: list[str]) -> LightningDataModule:
    """A DataModule from ``fit``'s data arguments (``-c CONFIG``: its ``data:`` section; ``--data NAME|CLASS``,
    ``--data.ARG VALUE``), parsed and instantiated by the same jsonargparse machinery as LightningCLI."""
    parser, cfg = _parse_data_args(args)
    return parser.instantiate_classes(cfg).data


def datamodule_spec_from_args(args: list[str]) -> tuple[str, dict[str, Any]]:
    """``(class path, init args)`` that :func:`datamodule_from_args` would instantiate (defaults filled in)."""
    _, cfg = _parse_data_args(args)
    return cfg.data.class_path, cfg.data.init_args.as_dict()


def _parse_data_args(args: list[str]):
    import yaml

    import dmmh  # noqa: F401

    parser = DMMHArgumentParser(prog="dmmh")
    parser.add_lightning_class_args(FeatureDataModule, "data", subclass_mode=True)
    argv: list[str] = []
    with contextlib.ExitStack() as stack:
        it = iter(expand_args(args, stack))
        for arg in it:
            if arg not in CONFIG_FLAGS and not arg.startswith("--config="):
                argv.append(arg)
                continue
            path = arg.partition("=")[2] or next(it, None)
            if path is None:
                parser.error(f"{arg} needs a value")
            with open(path) as f:
                section = (yaml.safe_load(f) or {}).get("data")
            if section is None:
                parser.error(f"config {path} has no 'data:' section")
            argv += ["--data", yaml.safe_dump(section)]
    return parser, parser.parse_args(argv)


def usage() -> str:
    """The top-level help: every subcommand with one line."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    lines = ["usage: dmmh <command> [options]    (dmmh <command> --help for a command's options)", "",
             "training and evaluation (LightningCLI):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "dmmh's tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "configs shipped with dmmh (-c NAME): " + ", ".join(config_names())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return
    command = args[0]
    if not command.startswith("-") and command not in (*LIGHTNING_COMMANDS, *COMMANDS):
        known = [*LIGHTNING_COMMANDS, *COMMANDS]
        close = difflib.get_close_matches(command, known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        sys.exit(f"dmmh: unknown command {command!r}; {hint}commands: {', '.join(known)}")
    try:
        if command in COMMANDS:
            run(command, args[1:])
            return
        with contextlib.ExitStack() as stack:
            args = expand_args(args, stack)
            if argv is None:  # run as a program: LightningCLI reads sys.argv itself (and warns when given both)
                sys.argv[1:] = args
            cli(None if argv is None else args)
    except MissingDependencyError as exc:
        sys.exit(f"dmmh {command}: {exc}")


if __name__ == "__main__":  # pragma: no cover
    main()

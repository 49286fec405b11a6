"""The ``dmmh`` command: LightningCLI's ``fit|validate|test|predict`` plus dmmh's own subcommands.

``dmmh fit -c configs/mirflickr/dmmh_64.yaml --data.root PATH`` trains; the data module's
feature widths and class count are linked into the model's arguments. dmmh's own subcommands
live in :mod:`dmmh.commands` (one module each, imported only when used).
"""

from __future__ import annotations

import difflib
import sys

from lightning.pytorch.cli import LightningCLI

from dmmh.commands import COMMANDS, run
from dmmh.data.base import FeatureDataModule
from dmmh.models.lit import DMMHModule

LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI; -c CONFIG, --data.root PATH, --trainer.*, --model.*)",
    "validate": "evaluate on the validation data",
    "test": "evaluate on the test data (queries against the database)",
    "predict": "encode the query and database splits",
}


class DMMHCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.image_dim", "model.image_dim", apply_on="instantiate")
        parser.link_arguments("data.text_dim", "model.text_dim", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.n_classes", apply_on="instantiate")


def cli(args: list[str] | None = None, run: bool = True) -> DMMHCLI:
    """Build (and by default run) the LightningCLI over :class:`DMMHModule` and any DataModule."""
    import dmmh  # noqa: F401  (registers every built-in DataModule class for short class paths)

    return DMMHCLI(
        DMMHModule,
        FeatureDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def usage() -> str:
    """The top-level help: every subcommand with one line."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS]))
    lines = ["usage: dmmh <command> [options]    (dmmh <command> --help for a command's options)", "",
             "training and evaluation (LightningCLI):"]
    lines += [f"  {name:<{width}}  {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "dmmh's tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return
    if args[0] in COMMANDS:
        run(args[0], args[1:])
        return
    if not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        known = [*LIGHTNING_COMMANDS, *COMMANDS]
        close = difflib.get_close_matches(args[0], known, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        sys.exit(f"dmmh: unknown command {args[0]!r}; {hint}commands: {', '.join(known)}")
    cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()

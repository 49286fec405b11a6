"""The ``dmmh`` command: LightningCLI's ``fit|validate|test|predict`` plus dmmh's own tools.

``dmmh fit -c configs/mirflickr/dmmh_64.yaml --data.root PATH`` trains; the data module's
feature widths and class count are linked into the model's arguments. Extra subcommands are
listed in :data:`COMMANDS` as ``name → "module:function"`` and imported only when used; each
function takes the remaining argv list.
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch.cli import LightningCLI

from dmmh.data.base import FeatureDataModule
from dmmh.models.lit import DMMHModule

COMMANDS: dict[str, str] = {
    "extract": "dmmh.extract:main",
    "report": "dmmh.metrics.report:main",
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


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, func = COMMANDS[args[0]].split(":")
        getattr(importlib.import_module(module), func)(args[1:])
        return
    cli(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()

"""dmmh's own subcommands, beside LightningCLI's ``fit|validate|test|predict``.

One module per subcommand, ``dmmh/commands/<name>.py``, each a thin shell over library functions
with a ``main(argv: list[str])``. Only this package parses argv or prints; :data:`COMMANDS` lists
them (name → one-line help) without importing them, so ``dmmh --help`` stays fast.
"""

from __future__ import annotations

import importlib

__all__ = ["COMMANDS", "run"]

COMMANDS: dict[str, str] = {
    "encode": "encode a collection with a trained checkpoint into a searchable index (multi-process, resumable)",
    "extract": "open_clip features of image-caption pairs into a benchmark feature file (resumable)",
    "prepare": "a benchmark file from the official MIR-Flickr / NUS-WIDE / COCO release (+ manifest; --check)",
    "report": "mAP, precision@k, PR curve, precision within a radius, from codes or checkpoints -> JSON/CSV/PNG",
    "search": "query an index by caption, image, item or features: nearest ids, distances, image paths, captions",
    "table": "fit + test datasets x bits x encoders x seeds -> table.md/csv/json + map_vs_bits.png (resumable)",
}


def run(name: str, argv: list[str]):
    """Run subcommand ``name`` with the remaining arguments ``argv``."""
    return importlib.import_module(f"dmmh.commands.{name}").main(argv)

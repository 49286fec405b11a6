"""``dmmh encode``: a checkpoint and a collection → a searchable index (:func:`dmmh.serving.encode_index`).

The collection takes the data settings of ``dmmh fit`` (a config's ``data:`` section,
``--data NAME|CLASS``, ``--data.ARG VALUE``), or ``--data FOLDER`` for a folder of image–caption
pairs; the Lightning settings (``--devices``, ``--num-nodes``, ``--strategy``, ...) spread the
work over processes and nodes::

    dmmh encode --ckpt model.ckpt --data my_pairs/ --out runs/pairs.dmmh
    dmmh encode --ckpt model.ckpt -c mirflickr/dmmh_64 --data.root mir_cnn_twt.mat --out runs/mir64.dmmh \\
        --devices 4 --num-nodes 2 --strategy ddp

writes ``OUT`` (a HammingIndex file) and ``OUT.json`` (its manifest). An interrupted run resumes
from the shards in ``OUT.parts/``.
"""

from __future__ import annotations

import argparse
import os

from dmmh.data.base import SPLITS
from dmmh.serving import Collection, encode_index


def _devices(value: str):
    return int(value) if value.isdigit() else value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dmmh encode", description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="trained DMMHModule checkpoint (loaded weights-only)")
    p.add_argument("-c", "--config", help="a config file or shipped config name; its data: section names the collection")
    p.add_argument("--data", metavar="FOLDER|NAME|CLASS", help="a folder of image-caption pairs, a registered DataModule "
                   "name or a class path; --data.ARG VALUE sets its arguments (as for dmmh fit)")
    p.add_argument("--split", default="database", choices=SPLITS, help="split to index")
    p.add_argument("--out", required=True, help="index file to write (its manifest goes to OUT.json)")
    p.add_argument("--batch-size", type=int, help="items per forward pass (default: the DataModule's eval_batch_size)")
    p.add_argument("--shard-size", type=int, help="items per shard, the unit of resumption (a multiple of the batch size)")
    p.add_argument("--overwrite", action="store_true", help="replace an index or shards of another encoding")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="auto", type=_devices, help="devices per node (Lightning's Trainer(devices=...))")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp")
    p.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> None:
    """``dmmh encode``: see the module docs and ``dmmh encode --help``."""
    p = _parser()
    a, data_args = p.parse_known_args(argv)
    unknown = [x for x in data_args if x.startswith("-") and not x.startswith("--data.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    if a.data is None and a.config is None:
        p.error("name the collection: --data FOLDER|NAME|CLASS and/or -c CONFIG")
    from dmmh.cli import datamodule_spec_from_args

    data = ["--data", a.data] if a.data else []
    if a.data and os.path.isdir(a.data):  # a pairs folder
        data = ["--data", "dmmh.data.pairs.PairsDataModule", "--data.root", a.data]
    class_path, init_args = datamodule_spec_from_args([*(["-c", a.config] if a.config else []), *data, *data_args])
    collection = Collection.resolve(class_path, init_args, a.split)
    result = encode_index(a.ckpt, collection, a.out, batch_size=a.batch_size, shard_size=a.shard_size, overwrite=a.overwrite,
                          accelerator=a.accelerator, devices=a.devices, num_nodes=a.num_nodes, strategy=a.strategy,
                          precision=a.precision, progress=not a.no_progress)
    if result is None:  # ranks other than 0
        return
    m = result.manifest
    if result.up_to_date:
        print(f"{result.path} is up to date ({result.n_items} items, {m['index']['n_bits']} bits)")
        return
    print(f"wrote {result.path} and {result.path}.json: {result.n_items} items, {m['index']['n_bits']} bits, "
          f"{result.shards} shard(s), {result.shards_reused} reused, {result.world_size} process(es) writing "
          f"{'+'.join(map(str, result.shards_per_rank))}, "
          f"{result.seconds:.1f} s ({result.items_per_second:.0f} items/s)")

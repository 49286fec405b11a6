"""``dmmh encode``: a checkpoint and a collection → a searchable index (:func:`dmmh.serving.encode_index`).

::

    dmmh encode --ckpt model.ckpt --data my_pairs/ --out runs/pairs.dmmh
    dmmh encode --ckpt model.ckpt -c dmmh/configs/mirflickr/dmmh_64.yaml --data-args '{"root": "mir.mat"}' \\
        --out runs/mir64.dmmh --devices 4 --num-nodes 2 --strategy ddp

writes ``OUT`` (a HammingIndex file) and ``OUT.json`` (its manifest). An interrupted run resumes
from the shards in ``OUT.parts/``.
"""

from __future__ import annotations

import argparse
import json

from dmmh.data.base import SPLITS
from dmmh.serving import Collection, encode_index


def _devices(value: str):
    return int(value) if value.isdigit() else value


def main(argv: list[str] | None = None) -> None:
    """``dmmh encode``: see the module docs and ``dmmh encode --help``."""
    p = argparse.ArgumentParser(prog="dmmh encode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="trained DMMHModule checkpoint")
    p.add_argument("--data", help="pairs folder, DataModule name (dmmh.list_datamodules()) or class path pkg.module.Class")
    p.add_argument("-c", "--config", help="LightningCLI YAML whose data section (class_path, init_args) names the collection")
    p.add_argument("--data-args", default="{}", help="JSON dict of DataModule arguments (over the config's)")
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
    a = p.parse_args(argv)
    try:
        data_args = json.loads(a.data_args)
    except json.JSONDecodeError as exc:
        p.error(f"--data-args is not valid JSON: {exc}")
    if not isinstance(data_args, dict):
        p.error(f"--data-args must be a JSON object, got {a.data_args}")
    if a.data is None and a.config is None:
        p.error("name the collection with --data and/or -c CONFIG")
    collection = Collection.resolve(a.data, data_args, a.split, a.config)
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

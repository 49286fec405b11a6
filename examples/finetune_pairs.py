"""Fine-tune DMMH on your own image–caption pairs, build a Hamming index, query it.

Frozen open_clip towers (``clip_image`` / ``clip_text``) → per-modality ``mamba`` token encoder →
``cnn_deep`` fusion → ``tanh`` hash head, trained with modality dropout so that an item can be encoded from its image alone or its caption alone as well as
from both (the DMMH paper's queries always carry both modalities).

    python examples/finetune_pairs.py --root my_pairs/ --model ViT-B-32 --pretrained ViT-B-32.pt \
        --out runs/pairs --query-image my_pairs/cat.png --query-caption "a cat"

``my_pairs/`` holds the images and ``metadata.jsonl`` (or ``.csv``) with ``image, caption[, tags]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import open_clip
import torch

import dmmh
from dmmh._io import atomic_write
from dmmh.data.pairs import PairsDataModule, load_image
from dmmh.encoders.clip import register_clip_config
from dmmh.hashing import HammingIndex

MODES = ("pair", "image", "caption")
# every view of an item (image + caption, image, caption) is pulled to its class's hash centre
LOSSES = {"central_similarity": 1.0, "quantization": 0.1}


def build(root: str, model: str, pretrained: str | None = None, model_config: Mapping[str, Any] | None = None,
          n_bits: int = 32, dim: int = 32, modality_dropout: float = 0.5, lr: float = 3e-3, batch_size: int = 64,
          seed: int = 0, losses: Mapping[str, Any] | None = None, **data_kw) -> tuple[PairsDataModule, dmmh.DMMHModule]:
    """The data module and the Lightning module (frozen CLIP + token encoder + fusion + hash head).

    The CLIP model is built only by the module's ``clip_image`` / ``clip_text`` encoders (each keeps its
    tower). The data module takes open_clip's tokenizer, which needs no model, and borrows the image
    encoder's transform: that encoder exists only once the module is built, which needs the data's
    class count."""
    L.seed_everything(seed, verbose=False)
    if model_config is not None:
        register_clip_config(model, model_config)
    clip = {"model": model, "pretrained": pretrained, "model_config": model_config, "freeze": True,
            "head": "mamba"}
    encoders: dict[str, Any] = {}
    data_kw.setdefault("val_split", 0)  # fine_tune does not validate: train on every training item
    data = PairsDataModule(root, batch_size=batch_size, seed=seed, tokenizer=open_clip.get_tokenizer(model),
                           transform=lambda image: encoders["image"].transform(image), **data_kw)
    module = dmmh.DMMHModule(
        image_dim=data.image_dim, text_dim=data.text_dim, n_classes=data.num_classes, n_bits=n_bits, dim=dim,
        num_tokens=n_bits, image_encoder="clip_image", text_encoder="clip_text", encoder_kwargs=clip,
        fusion="cnn_deep", head="tanh", modality_dropout=modality_dropout, lr=lr,
        losses=dict(losses) if losses is not None else LOSSES)
    encoders.update(module.model.encoders)
    return data, module


def fine_tune(data: PairsDataModule, module: dmmh.DMMHModule, epochs: int = 100) -> None:
    trainer = L.Trainer(max_epochs=epochs, accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=True)
    trainer.fit(module, train_dataloaders=data.train_dataloader())


@torch.no_grad()
def build_index(data: PairsDataModule, module: dmmh.DMMHModule, out: str | os.PathLike) -> Path:
    """Encode the database from image + caption into ``out/index.dmmh`` (a :class:`HammingIndex`, ids =
    database positions) and write the items' paths and captions to ``out/items.json``."""
    loader = data.predict_dataloader()[1]  # the database, in order
    codes = torch.cat([module.encode(b["image"].to(module.device), b["text"].to(module.device)).cpu() for b in loader])
    rows = data.splits["database"]
    out = Path(out)
    items = [{"path": data.table.paths[r], "caption": data.table.captions[r]} for r in rows]
    atomic_write(out / "items.json", json.dumps(items, indent=1).encode())
    return HammingIndex(codes.shape[1]).add(codes).save(out / "index.dmmh")


def load_index(path: str | os.PathLike) -> tuple[HammingIndex, list[dict[str, str]]]:
    """The index written by :func:`build_index` and its items (``items.json`` beside it)."""
    path = Path(path)
    return HammingIndex.load(path), json.loads((path.parent / "items.json").read_text())


@torch.no_grad()
def query(module: dmmh.DMMHModule, data: PairsDataModule, index: tuple[HammingIndex, list[dict[str, str]]], images=None,
          captions: list[str] | None = None, k: int = 5) -> list[list[dict[str, Any]]]:
    """Top-``k`` database items for each query: PIL images and/or captions (either may be ``None``)."""
    image = torch.stack([data.transform(im) for im in images]).to(module.device) if images is not None else None
    text = data.tokenizer(captions).to(module.device) if captions is not None else None
    codes, items = index
    dist, ids = codes.search(module.encode(image, text).cpu(), k)
    return [[{"rank": r + 1, "distance": int(d), "id": int(i), **items[i]} for r, (d, i) in enumerate(zip(drow, irow))]
            for drow, irow in zip(dist.tolist(), ids.tolist())]


def self_retrieval(module, data, index, k: int = 3) -> dict[str, list[list[dict[str, Any]]]]:
    """Query every database item by its (image, caption) pair, its image alone and its caption alone."""
    rows = data.splits["database"]
    images = [load_image(data.table.paths[r]) for r in rows]
    captions = [data.table.captions[r] for r in rows]
    return {"pair": query(module, data, index, images, captions, k), "image": query(module, data, index, images, None, k),
            "caption": query(module, data, index, None, captions, k)}


def run(root: str, out: str, model: str, pretrained: str | None = None, model_config: Mapping[str, Any] | None = None,
        epochs: int = 100, **kw) -> dict[str, Any]:
    """Fine-tune, index, and query every item three ways; returns the index path and the results."""
    data, module = build(root, model, pretrained, model_config, **kw)
    fine_tune(data, module, epochs)
    path = build_index(data, module, out)
    return {"index": path, "results": self_retrieval(module, data, load_index(path)), "module": module, "data": data}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--model-config", help="architecture JSON (open_clip layout) registered as --model")
    p.add_argument("--pretrained", help="local open_clip checkpoint")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-bits", type=int, default=32)
    p.add_argument("--query-image")
    p.add_argument("--query-caption")
    a = p.parse_args(argv)
    config = json.loads(Path(a.model_config).read_text()) if a.model_config else None
    data, module = build(a.root, a.model, a.pretrained, config, n_bits=a.n_bits)
    fine_tune(data, module, a.epochs)
    index = load_index(build_index(data, module, a.out))
    if a.query_image or a.query_caption:
        images = [load_image(a.query_image)] if a.query_image else None
        captions = [a.query_caption] if a.query_caption else None
        for hit in query(module, data, index, images, captions)[0]:
            print(f"{hit['rank']:>3}  d={hit['distance']:<3} {hit['path']}  {hit['caption']!r}")


if __name__ == "__main__":
    main()

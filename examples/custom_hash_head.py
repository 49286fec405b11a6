"""A downstream hash head: subclass ``dmmh.HashHead``, register it, use it by name.

Run: ``python examples/custom_hash_head.py`` (trains briefly on synthetic data, saves a
checkpoint, reloads it by name and checks the codes agree).

In your own package, expose the head through an entry point so that ``dmmh`` finds it
without an explicit import (``pyproject.toml``)::

    [project.entry-points."dmmh.hash_heads"]
    soft_sign = "my_project.heads:SoftSignHead"
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import lightning as L
import torch

import dmmh
from dmmh.registry import HASH_HEADS


@HASH_HEADS.register("soft_sign", aliases=("softsign",), override=True)
class SoftSignHead(dmmh.HashHead):
    """``x / (temperature + |x|)``: a cheaper relaxation than tanh with heavier tails."""

    def __init__(self, in_dim: int, n_bits: int, projection: str = "auto", temperature: float = 1.0):
        super().__init__(in_dim, n_bits, projection)
        self.temperature = float(temperature)

    def relax(self, z: torch.Tensor) -> torch.Tensor:
        return z / (self.temperature + z.abs())


def main(workdir: str | Path | None = None, epochs: int = 3) -> dict[str, float]:
    L.seed_everything(0, verbose=False)
    workdir = Path(workdir or tempfile.mkdtemp())
    data = dmmh.SyntheticMultiLabel(num_train=256, num_query=64, num_database=512, batch_size=64)
    module = dmmh.DMMHModule(
        image_dim=data.image_dim, text_dim=data.text_dim, n_classes=data.num_classes, n_bits=16,
        encoder="mlp", head="soft_sign", head_kwargs={"temperature": 0.5},
    )
    trainer = L.Trainer(max_epochs=epochs, default_root_dir=workdir, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    ckpt = workdir / "soft_sign.ckpt"
    trainer.save_checkpoint(ckpt)

    reloaded = dmmh.DMMHModule.load_from_checkpoint(ckpt)
    assert isinstance(reloaded.model.head, SoftSignHead) and reloaded.model.head.temperature == 0.5
    batch = next(iter(data.val_dataloader()))
    same = torch.equal(module.encode(batch["image"], batch["text"]), reloaded.encode(batch["image"], batch["text"]))
    result = trainer.validate(reloaded, data, verbose=False)[0]
    print(f"head={type(reloaded.model.head).__name__} val/mAP={result['val/mAP']:.4f} codes identical after reload: {same}")
    return {"mAP": result["val/mAP"], "identical": float(same)}


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)

"""The LightningModule: builds :class:`~dmmh.models.dmmh.DMMH` from names, trains it, reports mAP."""

from __future__ import annotations

from typing import Any, Mapping

import lightning as L
import torch
from torch import Tensor

from dmmh._checks import check_finite, check_labels, check_same_batch
from dmmh.data.query_database import ROLES
from dmmh.hashing.losses import CombinedLoss
from dmmh.metrics.retrieval import RetrievalMAP
from dmmh.models.dmmh import DMMH

__all__ = ["DMMHModule", "DEFAULT_LOSSES"]

DEFAULT_LOSSES: dict[str, float] = {"classification": 1.0, "pairwise_similarity": 1.0, "quantization": 0.1}


class DMMHModule(L.LightningModule):
    """Train DMMH on batches ``{"image", "text", "label"}`` of pre-extracted features.

    Validation and test encode query and database items (batches also carry ``"index"``, the item's
    position in its split) and log ``{stage}/mAP`` (mAP@``map_top_k``, all when ``None``). They come
    from one dataloader whose batches carry ``"role"`` (0 query, 1 database: what
    :class:`~dmmh.data.query_database.QueryDatabaseDataset` gives, and ``FeatureDataModule.test_dataloader``
    uses, so that ``trainer.test()`` returns one dict), or from two, ``[query, database]``. A single
    dataloader without ``"role"`` serves as both queries and database.

    Every component is named (see :class:`~dmmh.models.dmmh.DMMH` for the model arguments), so the
    hyperparameters saved in a checkpoint rebuild the same model:
    ``DMMHModule.load_from_checkpoint(path)``.

    Args:
        n_classes: label width (needed by the classification and central-similarity losses).
        losses: loss name → weight, or → ``{"weight": w, **kwargs}``.
        lr, weight_decay: Adam settings.
        map_top_k, map_empty, map_normalizer: evaluation options of :class:`~dmmh.metrics.RetrievalMAP`
            (see docs/evaluation.md: ``map_empty="exclude"`` matches the MATLAB code behind the
            published tables, the default ``"zero"`` the Python ports).
        validation: a record, set by ``fit`` from the DataModule's
            :attr:`~dmmh.data.base.FeatureDataModule.validation`: how the run validated and so
            selected its checkpoints (e.g. ``"selected on test: ..."``). It does not change the model.
    """

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        n_classes: int,
        n_bits: int = 64,
        encoder: str = "mamba",
        encoder_kwargs: dict[str, Any] | None = None,
        image_encoder: str | None = None,
        image_encoder_kwargs: dict[str, Any] | None = None,
        text_encoder: str | None = None,
        text_encoder_kwargs: dict[str, Any] | None = None,
        dim: int = 128,
        num_tokens: int | None = None,
        fusion: str = "cnn_deep",
        fusion_kwargs: dict[str, Any] | None = None,
        head: str = "tanh",
        head_kwargs: dict[str, Any] | None = None,
        modality_dropout: float = 0.0,
        losses: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        map_top_k: int | None = None,
        map_empty: str = "zero",
        map_normalizer: str = "retrieved",
        validation: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = DMMH(
            image_dim=image_dim, text_dim=text_dim, n_bits=n_bits, encoder=encoder, encoder_kwargs=encoder_kwargs,
            image_encoder=image_encoder, image_encoder_kwargs=image_encoder_kwargs, text_encoder=text_encoder,
            text_encoder_kwargs=text_encoder_kwargs, dim=dim, num_tokens=num_tokens, fusion=fusion,
            fusion_kwargs=fusion_kwargs, head=head, head_kwargs=head_kwargs, modality_dropout=modality_dropout,
        )
        self.loss = CombinedLoss(dict(losses) if losses is not None else DEFAULT_LOSSES, n_bits=n_bits, n_classes=n_classes)
        self.val_map = RetrievalMAP(top_k=map_top_k, empty=map_empty, normalizer=map_normalizer)
        self.test_map = RetrievalMAP(top_k=map_top_k, empty=map_empty, normalizer=map_normalizer)

    def forward(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        return self.model(image, text)

    @torch.no_grad()
    def encode(self, image: Tensor | None = None, text: Tensor | None = None) -> Tensor:
        """±1 codes; the module is put in eval mode for the call and restored after."""
        was_training = self.training
        self.eval()
        try:
            return self.model.encode(image, text)
        finally:
            self.train(was_training)

    def _unpack(self, batch: Mapping[str, Tensor]) -> tuple[Tensor | None, Tensor | None, Tensor]:
        if not isinstance(batch, Mapping) or "label" not in batch:
            raise ValueError(f"batches must be dicts with 'image', 'text' and 'label'; got keys {list(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
        image, text, label = batch.get("image"), batch.get("text"), batch["label"]
        check_same_batch({"image": image, "text": text, "label": label})
        check_labels(label, n_classes=self.hparams.n_classes)
        for name, x in (("image", image), ("text", text)):
            if x is not None:
                check_finite(x, f"batch {name!r}")
        return image, text, label

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        image, text, label = self._unpack(batch)
        codes = self.model(image, text)
        total, parts = self.loss(codes, label)
        n = label.shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=n)
        return total

    def _eval_step(self, metric: RetrievalMAP, batch: Mapping[str, Tensor], dataloader_idx: int, n_loaders: int) -> None:
        image, text, label = self._unpack(batch)
        codes = self.model.encode(image, text)
        index = batch.get("index")
        if index is None:
            raise ValueError("evaluation batches need an 'index' entry (the item's position in its split)")
        if "role" in batch:  # one loader of query and database items (QueryDatabaseDataset)
            for r, role in enumerate(ROLES):
                mine = batch["role"] == r
                if mine.any():
                    metric.update(codes[mine], label[mine], index[mine], role)
            return
        for role in ROLES if n_loaders == 1 else (ROLES[dataloader_idx],):
            metric.update(codes, label, index, role)

    def on_fit_start(self) -> None:
        # how this run selects checkpoints (FeatureDataModule.validation, e.g. "selected on test: ..."),
        # saved with the checkpoints' hyperparameters
        validation = getattr(self.trainer.datamodule, "validation", None)
        if isinstance(validation, str):
            self.hparams.validation = validation

    def on_train_start(self) -> None:
        # after Lightning logged the hyperparameters given to __init__: log the validation in force
        if self.hparams.get("validation") is not None:
            for logger in self.loggers:
                logger.log_hyperparams({"validation": self.hparams.validation})

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        # num_val_batches, not a check of trainer.validating: fit's sanity check runs this step in another stage
        self._eval_step(self.val_map, batch, dataloader_idx, len(self.trainer.num_val_batches))

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(self.test_map, batch, dataloader_idx, len(self.trainer.num_test_batches))

    def on_validation_epoch_end(self) -> None:
        self.log("val/mAP", self.val_map.compute(), prog_bar=True, sync_dist=False)
        self.val_map.reset()

    def on_test_epoch_end(self) -> None:
        self.log("test/mAP", self.test_map.compute(), sync_dist=False)
        self.test_map.reset()

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        image, text, label = self._unpack(batch)
        return {"codes": self.model.encode(image, text), "label": label, "index": batch.get("index")}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

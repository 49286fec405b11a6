"""Compose a DMMH model from named parts and train it on synthetic features, in plain Python."""

import lightning as L
import torch

import dmmh


def main(max_epochs: int = 5, n_bits: int = 16) -> tuple[dmmh.DMMHModule, float]:
    L.seed_everything(0, verbose=False)
    data = dmmh.SyntheticMultiLabel(num_train=256, num_query=64, num_database=512, batch_size=64)
    print("encoders:", dmmh.list_encoders(), "fusions:", dmmh.list_fusions(), "heads:", dmmh.list_hash_heads())
    module = dmmh.DMMHModule(
        image_dim=data.image_dim, text_dim=data.text_dim, n_classes=data.num_classes, n_bits=n_bits, dim=32,
        encoder="mlp", encoder_kwargs={"hidden": (64,)}, fusion="cnn_deep", head="tanh", modality_dropout=0.2,
        losses={"classification": 1.0, "pairwise_similarity": 1.0, "quantization": 0.1},
    )
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=data)
    score = trainer.test(module, datamodule=data, verbose=False)[0]["test/mAP"]
    codes = module.encode(torch.as_tensor(data.splits["query"].image[:4]))  # image-only query codes, ±1
    print(f"test mAP {score:.3f}; image-only codes of 4 queries:\n{codes}")
    return module, score


if __name__ == "__main__":
    main()

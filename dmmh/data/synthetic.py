"""``synthetic``: structured multi-label image/text features generated from a seed.

Each item gets 1–3 of ``num_classes`` labels; its image and text features are noisy random
linear maps of its label vector (a different map per modality), so the labels can be
recovered from either modality, better from both. Useful for tests and quick experiments.
"""

from __future__ import annotations

import numpy as np

from dmmh.data.base import FeatureDataModule, Split
from dmmh.registry import DATAMODULES


def make_multilabel_features(n: int, image_dim: int, text_dim: int, num_classes: int, noise: float, rng: np.random.Generator, maps: tuple[np.ndarray, np.ndarray]) -> Split:
    labels = np.zeros((n, num_classes), dtype=np.float32)
    counts = rng.integers(1, 4, size=n)
    for i, c in enumerate(counts):
        labels[i, rng.choice(num_classes, size=min(c, num_classes), replace=False)] = 1
    image = labels @ maps[0] + noise * rng.standard_normal((n, image_dim))
    text = labels @ maps[1] + noise * rng.standard_normal((n, text_dim))
    return Split(image.astype(np.float32), text.astype(np.float32), labels)


@DATAMODULES.register("synthetic")
class SyntheticMultiLabel(FeatureDataModule):
    """Synthetic multi-label data with train ⊂ database and a disjoint query set.

    Args:
        num_train, num_query, num_database: split sizes (train items are the first
            ``num_train`` database items, as in the benchmarks).
        image_dim, text_dim, num_classes: shapes.
        noise: standard deviation of the Gaussian noise added to the features.
        data_seed: seed of the generated data.
        **kwargs: :class:`~dmmh.data.base.FeatureDataModule`'s (``batch_size``, ``eval_batch_size``,
            ``num_workers``, ``seed``, ``val_split``, ``val_seed``).
    """

    def __init__(
        self,
        num_train: int = 512,
        num_query: int = 128,
        num_database: int = 1024,
        image_dim: int = 64,
        text_dim: int = 32,
        num_classes: int = 8,
        noise: float = 1.0,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_train > num_database:
            raise ValueError(f"num_train ({num_train}) must not exceed num_database ({num_database}): train ⊂ database")
        self.save_hyperparameters()

    def load_splits(self) -> dict[str, Split]:
        h = self.hparams
        rng = np.random.default_rng(h["data_seed"])
        maps = (rng.standard_normal((h["num_classes"], h["image_dim"])), rng.standard_normal((h["num_classes"], h["text_dim"])))
        make = lambda n: make_multilabel_features(n, h["image_dim"], h["text_dim"], h["num_classes"], h["noise"], rng, maps)  # noqa: E731
        database, query = make(h["num_database"]), make(h["num_query"])
        n = h["num_train"]
        train = Split(database.image[:n], database.text[:n], database.label[:n])
        return {"train": train, "query": query, "database": database}

"""The embedded UCI Multiple Features data and its DataModule."""

from __future__ import annotations

import numpy as np
import pytest

from dmmh.data.uci import UCI_VIEWS, UCIMultipleFeatures, load_uci_mfeat, stratified_split
from dmmh.registry import DATAMODULES


def test_embedded_data_is_the_uci_file():
    views, classes = load_uci_mfeat()
    assert {k: v.shape for k, v in views.items()} == {k: (2000, w) for k, w in UCI_VIEWS.items()}
    np.testing.assert_array_equal(classes, np.repeat(np.arange(10), 200))  # the file lists the digits class by class
    # first row of mfeat-fou.csv and of mfeat-mor.csv, copied from the UCI files
    np.testing.assert_array_equal(views["fou"][0, :4], [0.065882, 0.19731, 0.10383, 0.27036])
    np.testing.assert_array_equal(views["mor"][0], [1, 0, 0, 133.15, 1.3117, 1620.2])
    assert np.isfinite(np.hstack(list(views.values()))).all()
    assert views["pix"].min() == 0 and views["pix"].max() == 6 and (views["pix"] == np.round(views["pix"])).all()


@pytest.mark.parametrize(("q", "t", "seed"), [(20, 100, 0), (1, 1, 3), (50, 150, 7)])
def test_split_is_stratified_disjoint_and_seeded(q, t, seed):
    labels = np.repeat(np.arange(10), 200)
    rows = stratified_split(labels, q, t, seed)
    assert len(rows["query"]) == 10 * q and len(rows["database"]) == 10 * (200 - q) and len(rows["train"]) == 10 * t
    assert not set(rows["query"]) & set(rows["database"])
    assert set(rows["query"]) | set(rows["database"]) == set(range(2000))
    assert set(rows["train"]) <= set(rows["database"])
    for c in range(10):
        assert (labels[rows["query"]] == c).sum() == q and (labels[rows["train"]] == c).sum() == t
    again = stratified_split(labels, q, t, seed)
    assert all(np.array_equal(rows[k], again[k]) for k in rows)
    other = stratified_split(labels, q, t, seed + 1)
    assert not np.array_equal(rows["query"], other["query"])


def test_datamodule_rows_match_the_views():
    dm = UCIMultipleFeatures(image_view="kar", text_view="mor", normalize="none", query_per_class=5, train_per_class=10, split_seed=2)
    views, classes = load_uci_mfeat()
    rows = stratified_split(classes, 5, 10, 2)
    s = dm.splits
    assert (dm.image_dim, dm.text_dim, dm.num_classes) == (64, 6, 10)
    for name in ("train", "query", "database"):
        np.testing.assert_allclose(s[name].image, views["kar"][rows[name]], rtol=1e-6)
        np.testing.assert_allclose(s[name].text, views["mor"][rows[name]], rtol=1e-6)
        np.testing.assert_array_equal(s[name].label.argmax(1), classes[rows[name]])
        assert (s[name].label.sum(1) == 1).all()
    assert DATAMODULES.get("uci_mfeat") is UCIMultipleFeatures and DATAMODULES.get("uci") is UCIMultipleFeatures


def test_default_zscore_uses_train_statistics():
    s = UCIMultipleFeatures().splits
    np.testing.assert_allclose(s["train"].text.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s["train"].text.std(0), 1, atol=1e-4)
    assert abs(s["query"].text.mean()) > 1e-4  # queries are not re-centred on themselves


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"image_view": "pixels"}, r"image_view must be one of \['fac', 'fou', 'kar', 'mor', 'pix', 'zer'\], got 'pixels'"),
    ({"query_per_class": 200}, r"query_per_class must be in \[1, 199\], got 200"),
    ({"query_per_class": 150, "train_per_class": 51}, r"train_per_class must be in \[1, 50\].*got 51"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UCIMultipleFeatures(**kwargs)

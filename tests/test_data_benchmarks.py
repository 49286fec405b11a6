"""Benchmark DataModules: every format loads with the right shapes and identical content,
normalisation matches numpy, the published-size checks, the cache, and ``dmmh fit -c configs/...``."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmark_files import KEYS, WRITERS, make_arrays, write, write_mat73

from dmmh.data import MSCOCO, NUSWIDE, MIRFlickr25K
from dmmh.data.normalize import RowTransform, normalize_splits
from dmmh.registry import DATAMODULES

CONFIGS = Path(__file__).resolve().parents[1] / "dmmh" / "configs"
MODULES = [(MIRFlickr25K, 24), (NUSWIDE, 21), (MSCOCO, 80)]


def _quiet(dm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the tiny files' split sizes differ from the published ones
        return dm.splits


@pytest.mark.parametrize(("cls", "classes"), MODULES)
def test_each_datamodule_reads_every_format_identically(tmp_path, cls, classes):
    arrays = make_arrays(np.random.default_rng(), classes)
    loaded = {}
    for fmt in WRITERS:
        folder = tmp_path / fmt
        folder.mkdir()
        path = write(fmt, folder, arrays)
        dm = cls(root=str(path if fmt == "npy" else folder))  # a file's folder, or the .npy folder itself
        splits = _quiet(dm)
        assert dm.source.format == WRITERS[fmt][2]
        assert (dm.image_dim, dm.text_dim, dm.num_classes) == (7, 5, classes)
        loaded[fmt] = {s: [np.asarray(getattr(splits[s], p)) for p in ("image", "text", "label")] for s in KEYS}
    for fmt, splits in loaded.items():
        for split, keys in KEYS.items():
            for got, key in zip(splits[split], keys):
                np.testing.assert_array_equal(got, arrays[key], err_msg=f"{fmt} {key}")


def test_batches_carry_the_file_rows(tmp_path):
    arrays = make_arrays(np.random.default_rng(), 24)
    dm = MIRFlickr25K(root=str(write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)), batch_size=5, eval_batch_size=8)
    _quiet(dm)
    train = list(dm.train_dataloader())
    assert [len(b["index"]) for b in train] == [5, 5]  # 11 of 12 items (1 held out), a lone last item left out
    for b in train:
        idx = b["index"].numpy()
        np.testing.assert_array_equal(b["image"].numpy(), arrays["I_tr"][idx])
        np.testing.assert_array_equal(b["text"].numpy(), arrays["T_tr"][idx].astype(np.float32))
        np.testing.assert_array_equal(b["label"].numpy(), arrays["L_tr"][idx])
    query, database = dm.predict_dataloader()
    db = torch.cat([b["image"] for b in database]).numpy()
    np.testing.assert_array_equal(db, arrays["I_db"])
    assert sum(len(b["index"]) for b in query) == 5


def test_wrong_class_count_is_an_error_naming_the_dataset(tmp_path):
    path = write_mat73(tmp_path / "nus_cnn_twt.mat", make_arrays(np.random.default_rng(), 24))
    with pytest.raises(ValueError, match=r"nus_cnn_twt\.mat \(mat-v7\.3\): key 'L_tr' has 24 columns, expected 21 classes for NUS-WIDE"):
        _quiet(NUSWIDE(root=str(path)))


def test_published_sizes_warn(tmp_path):
    write_mat73(tmp_path / "coco_cnn_twt_2014.mat", make_arrays(np.random.default_rng(), 80))
    with pytest.warns(UserWarning, match=r"database split .* published MS-COCO split has 82783 \(expected 82783, found 20\)"):
        MSCOCO(root=str(tmp_path)).splits


def _ref_normalize(a, train, method):
    a, train = a.astype(np.float64), train.astype(np.float64)
    if method == "l2":
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        return a / np.where(norm > 0, norm, 1)  # an all-zero row (empty bag of words) stays zero
    if method == "zscore":
        std = train.std(0)
        return (a - train.mean(0)) / np.where(std > 0, std, 1)
    lo, hi = train.min(0), train.max(0)
    return np.where(hi > lo, (a - lo) / np.where(hi > lo, hi - lo, 1), 0)


@pytest.mark.parametrize("method", ["l2", "zscore", "minmax"])
@pytest.mark.parametrize("mmap", [True, False])
def test_normalisation_matches_numpy_in_memory_and_memory_mapped(tmp_path, method, mmap):
    arrays = make_arrays(np.random.default_rng(), 24)
    arrays["I_tr"][:, 2] = 3.5  # a constant train column
    arrays["I_te"][:, 2] = -1.0
    dm = MIRFlickr25K(root=str(write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)), normalize=method, mmap=mmap)
    splits = _quiet(dm)
    assert isinstance(splits["database"].image, RowTransform) is mmap
    for split, (ki, kt, kl) in KEYS.items():
        np.testing.assert_allclose(np.asarray(splits[split].image), _ref_normalize(arrays[ki], arrays["I_tr"], method), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(splits[split].text), _ref_normalize(arrays[kt], arrays["T_tr"], method), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(splits[split].label), arrays[kl])
    if mmap:  # rows read through the loader are normalised too
        batch = next(iter(dm.predict_dataloader()[1]))
        np.testing.assert_allclose(batch["image"].numpy(), _ref_normalize(arrays["I_db"], arrays["I_tr"], method), rtol=1e-5, atol=1e-5)


def test_per_modality_normalisation_and_bad_names(tmp_path):
    arrays = make_arrays(np.random.default_rng(), 24)
    from dmmh.data.base import Split

    splits = {s: Split(arrays[k[0]], arrays[k[1]], arrays[k[2]]) for s, k in KEYS.items()}
    out = normalize_splits(splits, {"text": "l2"})
    np.testing.assert_array_equal(out["query"].image, arrays["I_te"])
    np.testing.assert_allclose(out["query"].text, _ref_normalize(arrays["T_te"], arrays["T_tr"], "l2"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"normalize\['image'\] must be one of .*got 'l1'"):
        normalize_splits(splits, {"image": "l1"})
    with pytest.raises(ValueError, match=r"keys must be 'image' and/or 'text', got \['audio'\]"):
        normalize_splits(splits, {"audio": "l2"})


def test_cache_dir_turns_column_major_files_into_row_major_npy(tmp_path):
    arrays = make_arrays(np.random.default_rng(), 24)
    path = write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run reuses the cache
        dm = MIRFlickr25K(root=str(path), cache_dir=str(cache))
        splits = _quiet(dm)
        assert dm.source.format.startswith("npy cache of mat-v7.3")
        assert splits["train"].image.flags.c_contiguous
        np.testing.assert_array_equal(splits["query"].text, arrays["T_te"])
    assert len(list(cache.iterdir())) == 1


def test_registered_names_and_aliases():
    for name, cls in [("mirflickr", MIRFlickr25K), ("mir", MIRFlickr25K), ("nuswide", NUSWIDE), ("nus-wide", NUSWIDE),
                      ("coco", MSCOCO), ("mscoco", MSCOCO)]:
        assert DATAMODULES.get(name) is cls


def test_every_table_cell_has_a_config():
    import yaml

    for data, cls in [("mirflickr", "MIRFlickr25K"), ("nuswide", "NUSWIDE"), ("coco", "MSCOCO")]:
        for bits in (16, 32, 64, 128):
            cfg = yaml.safe_load((CONFIGS / data / f"dmmh_{bits}.yaml").read_text())
            assert cfg["model"]["n_bits"] == bits
            assert cfg["data"]["class_path"] == f"dmmh.data.{cls}"


def test_cli_fit_with_the_mirflickr_config(tmp_path):
    from dmmh.cli import cli

    path = write_mat73(tmp_path / "mir_cnn_twt.mat", make_arrays(np.random.default_rng(), 24))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run = cli(["fit", "-c", str(CONFIGS / "mirflickr" / "dmmh_16.yaml"), "--data.root", str(path),
                   "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"])
    assert run.trainer.state.finished and run.trainer.global_step == 1
    h = run.model.hparams
    assert (h.n_bits, h.image_dim, h.text_dim, h.n_classes) == (16, 7, 5, 24)  # widths linked from the file
    assert 0.0 <= float(run.trainer.callback_metrics["val/mAP"]) <= 1.0


def test_cache_written_concurrently_by_another_process_is_reused(tmp_path, monkeypatch):
    """Two DDP ranks can both find the cache missing; the one that loses the rename uses the winner's."""
    import dmmh.data.cache as cache_module
    from dmmh.data.cache import write_npy_folder

    arrays = make_arrays(np.random.default_rng(), 24)
    path = write_mat73(tmp_path / "mir_cnn_twt.mat", arrays)
    cache = tmp_path / "cache"

    def other_rank_first(arrs, folder, meta):
        write_npy_folder(arrs, folder, meta)  # the other process finishes between our check and our write
        return write_npy_folder(arrs, folder, meta)

    monkeypatch.setattr(cache_module, "write_npy_folder", other_rank_first)
    splits = _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))
    np.testing.assert_array_equal(splits["query"].text, arrays["T_te"])
    assert len(list(cache.iterdir())) == 1


# -- the cache: looked up before the source is read, verified on use ----------------------------
def _opened_hdf5(monkeypatch) -> list[str]:
    """Record every HDF5 file opened from now on."""
    import h5py

    opened, real = [], h5py.File.__init__

    def spy(self, name, *args, **kwargs):
        if isinstance(name, (str, os.PathLike)):  # not File(id) of an open file
            opened.append(str(name))
        real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.File, "__init__", spy)
    return opened


def _cached_files(cache: Path) -> list[Path]:
    (folder,) = [p for p in cache.iterdir() if not p.name.startswith(".")]
    return sorted(folder.glob("*.npy"))


def test_cache_hit_does_not_read_the_compressed_source(tmp_path, rng, monkeypatch):
    arrays = make_arrays(rng, 24)
    path = write("mat73_gzip", tmp_path, arrays)
    cache = tmp_path / "cache"
    opened = _opened_hdf5(monkeypatch)
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))
    assert opened == [str(path)]  # a miss reads the source once
    opened.clear()
    dm = MIRFlickr25K(root=str(path), cache_dir=str(cache))
    splits = _quiet(dm)
    assert opened == []  # a hit never opens it
    assert dm.source.format == f"npy cache of mat-v7.3 {path}"
    for split, keys in KEYS.items():
        for part, key in zip(("image", "text", "label"), keys):
            np.testing.assert_array_equal(np.asarray(getattr(splits[split], part)), arrays[key], err_msg=key)


@pytest.mark.parametrize("damage", ["edited", "truncated", "missing", "manifest"])
def test_damaged_cache_is_rebuilt_with_a_warning_naming_the_file(tmp_path, rng, damage):
    arrays = make_arrays(rng, 24)
    path = write("mat5", tmp_path, arrays)
    cache = tmp_path / "cache"
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))
    target = [p for p in _cached_files(cache) if p.name == "I_db.npy"][0]
    raw = target.read_bytes()
    if damage == "edited":  # one value changed, size the same: only the checksum can tell
        target.write_bytes(raw[:-4] + np.float32(123.0).tobytes())
    elif damage == "truncated":
        target.write_bytes(raw[:-4])
    elif damage == "missing":
        target.unlink()
    else:
        (target.parent / "manifest.json").write_text("{not json")
    needle = {"edited": "I_db.npy does not match the SHA-256", "truncated": r"I_db.npy has \d+ bytes, expected \d+",
              "missing": "I_db.npy is missing", "manifest": "no readable manifest.json"}[damage]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*published")  # the tiny file's split sizes
        with pytest.warns(UserWarning, match=needle + ".*rebuilding it from " + re.escape(str(path))):
            splits = MIRFlickr25K(root=str(path), cache_dir=str(cache)).splits
    np.testing.assert_array_equal(np.asarray(splits["database"].image), arrays["I_db"])
    assert len(list(cache.iterdir())) == 1  # the damaged copy is gone
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*rebuilding")  # the rebuilt copy verifies
        _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))


def test_changed_source_gets_a_new_cache_even_with_the_same_size_and_time(tmp_path, rng):
    arrays = make_arrays(rng, 24)
    path = tmp_path / "mir.npz"
    np.savez(path, **arrays)
    cache = tmp_path / "cache"
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))
    st = path.stat()
    changed = dict(arrays, I_te=arrays["I_te"] + 1)
    np.savez(path, **changed)  # uncompressed: same size
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    splits = _quiet(MIRFlickr25K(root=str(path), cache_dir=str(cache)))
    np.testing.assert_array_equal(np.asarray(splits["query"].image), changed["I_te"])
    assert len(list(cache.iterdir())) == 2


def test_verified_cache_skips_the_value_scan_made_when_it_was_written(tmp_path, rng, monkeypatch):
    import dmmh.data.readers as readers

    path = write("npz", tmp_path, make_arrays(rng, 24))
    scanned = []
    real = readers._scan_values
    monkeypatch.setattr(readers, "_scan_values", lambda where, key, a, labels: scanned.append(where) or real(where, key, a, labels))
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(tmp_path / "c")))
    assert len(scanned) == 9 and all("(npz)" in w for w in scanned)  # the source, before it is cached
    scanned.clear()
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(tmp_path / "c")))
    assert scanned == []
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(tmp_path / "c2"), check_values=False))
    _quiet(MIRFlickr25K(root=str(path), cache_dir=str(tmp_path / "c2")))  # a cache made without the scan is scanned on use
    assert len(scanned) == 9 and all("npy cache" in w for w in scanned)


def test_allow_external_and_empty_train_split_through_the_datamodule(tmp_path, rng):
    import h5py

    arrays = make_arrays(rng, 24)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.ascontiguousarray(arrays["I_tr"].T)
    path = write_mat73(tmp_path / "mir_cnn_twt.mat", {k: a for k, a in arrays.items() if k != "I_tr"})
    with h5py.File(path, "r+") as f:
        f["I_tr"] = h5py.ExternalLink("other.h5", "/x")
    with pytest.raises(ValueError, match=r"key 'I_tr' is an external link to other\.h5:/x.*allow_external=True"):
        _quiet(MIRFlickr25K(root=str(path)))
    splits = _quiet(MIRFlickr25K(root=str(path), allow_external=True))
    np.testing.assert_array_equal(np.asarray(splits["train"].image), arrays["I_tr"])
    empty = write("npz", tmp_path, {k: a[:0] if k.endswith("_tr") else a for k, a in arrays.items()})
    with pytest.raises(ValueError, match=re.escape(str(empty)) + r".*train split .* is empty"):
        _quiet(MIRFlickr25K(root=str(empty)))

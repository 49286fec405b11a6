"""Reports: JSON/CSV/PNG files from codes files and from a checkpoint, through ``dmmh report``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dmmh.cli import main as dmmh_main
from dmmh.metrics import retrieval_metrics
from dmmh.metrics.report import CODE_KEYS, load_codes

PNG = b"\x89PNG\r\n\x1a\n"


def codes(seed, n_bits, n_q=9, n_db=70, n_classes=4):
    rng = np.random.default_rng(seed)
    return {
        "query_codes": rng.standard_normal((n_q, n_bits)).astype(np.float32),
        "database_codes": np.packbits(rng.random((n_db, n_bits)) < 0.5, axis=1, bitorder="little"),  # packed
        "query_labels": (rng.random((n_q, n_classes)) < 0.4).astype(np.float32),
        "database_labels": (rng.random((n_db, n_classes)) < 0.4).astype(np.uint8),
    }


def test_report_from_codes_files(tmp_path):
    runs = {"b16": codes(0, 16), "b32": codes(1, 32)}
    np.savez(tmp_path / "b16.npz", **runs["b16"])
    torch.save({k: torch.from_numpy(v) for k, v in runs["b32"].items()}, tmp_path / "b32.pt")
    out = tmp_path / "report"
    dmmh_main(["report", "--codes", str(tmp_path / "b16.npz"), str(tmp_path / "b32.pt"), "--out", str(out),
               "--map-k", "all", "5", "--precision-k", "1", "10", "--radius", "3", "--empty", "exclude"])
    assert {p.name for p in out.iterdir()} == {"metrics.json", "metrics.csv", "pr_curve.png", "precision_at_k.png", "map_vs_bits.png"}
    for png in ("pr_curve.png", "precision_at_k.png", "map_vs_bits.png"):
        assert (out / png).read_bytes().startswith(PNG)
    saved = json.loads((out / "metrics.json").read_text())["runs"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    for name, data in runs.items():
        expected = retrieval_metrics(*(torch.from_numpy(data[k]) for k in CODE_KEYS), map_ks=(None, 5), precision_ks=(1, 10), radius=3, empty="exclude")
        assert saved[name]["mAP"] == expected["mAP"] and saved[name]["mAP@k"]["5"] == expected["mAP@k"][5]
        assert saved[name]["precision@radius"] == expected["precision@radius"] and saved[name]["n_bits"] == expected["n_bits"]
        assert saved[name]["pr_curve"] == expected["pr_curve"]
        mine = {(r["metric"], r["k"]): float(r["value"]) for r in rows if r["run"] == name}
        assert mine[("mAP", "all")] == expected["mAP"] and mine[("recall@k", "10")] == expected["recall@k"][10]
        assert mine[("pr_curve_precision", "3")] == expected["pr_curve"]["precision"][3]
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temp files


def test_report_from_checkpoint(tmp_path):
    import lightning as L

    from dmmh import DMMHModule, SyntheticMultiLabel

    args = dict(num_train=32, num_query=10, num_database=48, image_dim=6, text_dim=5, num_classes=4)
    dm = SyntheticMultiLabel(**args, batch_size=16)
    model = DMMHModule(image_dim=6, text_dim=5, n_classes=4, n_bits=8, dim=8, fusion="additive")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "r"
    data_args = [f"--data.{k}={v}" for k, v in args.items()]
    dmmh_main(["report", "--ckpt", str(tmp_path / "m.ckpt"), "--data", "synthetic", *data_args,
               "--out", str(out), "--name", "dmmh8", "--no-plots", "--no-progress"])
    saved = json.loads((out / "metrics.json").read_text())["runs"]["dmmh8"]
    s = dm.splits
    enc = [model.encode(torch.from_numpy(s[k].image), torch.from_numpy(s[k].text)) for k in ("query", "database")]
    expected = retrieval_metrics(enc[0], enc[1], torch.from_numpy(s["query"].label), torch.from_numpy(s["database"].label),
                                 precision_ks=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
    assert saved["mAP"] == expected["mAP"] and saved["n_database"] == 48 and saved["n_bits"] == 8
    assert not (out / "pr_curve.png").exists()


def test_bad_codes_file_and_arguments(tmp_path):
    data = codes(0, 8)
    del data["query_labels"]
    np.savez(tmp_path / "x.npz", **data)
    with pytest.raises(ValueError, match=r"x\.npz: missing key\(s\) \['query_labels'\]"):
        load_codes(tmp_path / "x.npz")
    with pytest.raises(ValueError, match="unknown codes file type"):
        load_codes(tmp_path / "x.txt")
    with pytest.raises(SystemExit):
        dmmh_main(["report", "--ckpt", "a.ckpt", "--out", str(tmp_path)])  # --ckpt needs --data


def mir_checkpoint(tmp_path, rng, val_split=0.1):
    """A small MIR-format MATLAB v7.3 file (memory-mapped read-only on load) and a checkpoint trained on it."""
    import lightning as L

    from _benchmark_files import make_arrays, write_mat73
    from dmmh import DMMHModule
    from dmmh.data import MIRFlickr25K

    mat = write_mat73(tmp_path / "mir_cnn_twt.mat", make_arrays(rng, 24, sizes=(12, 9, 30)))
    model = DMMHModule(image_dim=7, text_dim=5, n_classes=24, n_bits=16, encoder="mlp", dim=8, fusion="additive")
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, MIRFlickr25K(str(mat), batch_size=8, val_split=val_split))
    trainer.save_checkpoint(tmp_path / "mir16.ckpt")
    return mat, tmp_path / "mir16.ckpt", model


def test_report_from_checkpoint_with_a_fit_config(tmp_path, rng):
    """``dmmh report --ckpt`` takes fit's ``-c`` (a shipped config's name) and ``--data.*``; it shows a progress
    bar, raises no "not writable" warning on a read-only memory map (torch warns once per process: a fresh
    one), and ``--save-codes`` writes codes files that ``--codes`` reads back into the same report."""
    from dmmh.data import MIRFlickr25K

    mat, ckpt, model = mir_checkpoint(tmp_path, rng)
    proc = subprocess.run(
        [sys.executable, "-m", "dmmh.cli", "report", "--ckpt", str(ckpt), "-c", "mirflickr/dmmh_64", "--data.root", str(mat),
         "--data.eval_batch_size", "4", "--out", str(tmp_path / "r1"), "--save-codes", str(tmp_path / "codes"), "--no-plots"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not writable" not in proc.stderr
    assert "encode mir16.ckpt" in proc.stderr and "39/39" in proc.stderr  # progress over query + database items
    s = MIRFlickr25K(str(mat), mmap=False).splits
    enc = {k: model.encode(torch.from_numpy(s[k].image), torch.from_numpy(s[k].text.astype(np.float32))) for k in ("query", "database")}
    expected = retrieval_metrics(enc["query"], enc["database"], torch.from_numpy(s["query"].label),
                                 torch.from_numpy(s["database"].label), precision_ks=(1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000))
    first = json.loads((tmp_path / "r1" / "metrics.json").read_text())["runs"]["mir16"]
    assert first["mAP"] == expected["mAP"] and first["n_database"] == 30 and first["n_bits"] == 16
    assert first.pop("validation") == model.hparams.validation and model.hparams.validation.startswith("held out")
    saved = load_codes(tmp_path / "codes" / "mir16.npz")
    assert torch.equal(saved["query_codes"], enc["query"] >= 0) and torch.equal(saved["database_codes"], enc["database"] >= 0)
    dmmh_main(["report", "--codes", str(tmp_path / "codes" / "mir16.npz"), "--out", str(tmp_path / "r2"), "--no-plots"])
    second = json.loads((tmp_path / "r2" / "metrics.json").read_text())["runs"]["mir16"]
    assert second.pop("validation") == "not recorded (codes file)" and second == first


def test_report_says_selected_on_test(tmp_path, rng, capsys):
    """A checkpoint selected on the test data (``val_split="test"``) is reported as such (issue #12)."""
    mat, ckpt, _ = mir_checkpoint(tmp_path, rng, val_split="test")
    dmmh_main(["report", "--ckpt", str(ckpt), "--data", "mirflickr", "--data.root", str(mat), "--out", str(tmp_path / "r"),
               "--no-plots", "--no-progress"])
    run = json.loads((tmp_path / "r" / "metrics.json").read_text())["runs"]["mir16"]
    assert run["validation"].startswith("selected on test")
    assert "validation: selected on test" in capsys.readouterr().out


def test_report_checks_missing_extras_before_encoding(tmp_path, monkeypatch):
    """Without matplotlib, ``dmmh report`` stops before any encoding with the extra to install (no traceback)."""
    import dmmh.commands.report as report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    monkeypatch.setattr(report, "encode_checkpoint", lambda *a, **k: pytest.fail("encoded before checking extras"))
    monkeypatch.setattr(report, "load_codes", lambda *a, **k: pytest.fail("read codes before checking extras"))
    with pytest.raises(SystemExit) as exit_:
        dmmh_main(["report", "--ckpt", "m.ckpt", "--data", "synthetic", "--out", str(tmp_path / "r")])
    assert "'matplotlib'" in str(exit_.value.code) and "pip install 'dmmh[report]'" in str(exit_.value.code)
    assert "--no-plots" in str(exit_.value.code) and not (tmp_path / "r").exists()
    # several missing packages: one message, one install command for every extra
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(SystemExit) as exit_:
        dmmh_main(["report", "--codes", "a.safetensors", "--out", str(tmp_path / "r")])
    message = str(exit_.value.code)
    assert message.startswith("dmmh report:") and "'matplotlib'" in message and "'safetensors'" in message
    assert message.count("pip install") == 1 and "pip install 'dmmh[data,report]'" in message

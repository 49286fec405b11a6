"""``dmmh table``: cells planned, run through LightningCLI, reused when they verify, aggregated."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from _benchmark_files import make_arrays, write_mat73, write_npz
from dmmh.commands.table import main as table_main
from dmmh.table import Cell, cell_spec, plan, run_table, verify_result
from dmmh.table_outputs import PUBLISHED, aggregate, mean_std

# the reference rows exactly as given in issue #12 (the CLIPMH paper's table)
ISSUE_NUMBERS = {
    ("DMMVH", "mirflickr"): (.8587, .8707, .8798, .8827), ("DMMVH", "nuswide"): (.7714, .7820, .7879, .7916),
    ("DMMVH", "coco"): (.6716, .7030, .7122, .7244), ("BSTH", "mirflickr"): (.8145, .8340, .8482, .8571),
    ("BSTH", "nuswide"): (.6990, .7340, .7505, .7704), ("BSTH", "coco"): (.5831, .6245, .6459, .6654),
}


def _files(tmp_path, rng) -> dict[str, Path]:
    kw = dict(sizes=(40, 12, 60), image_dim=10, text_dim=6)
    return {"mirflickr": write_mat73(tmp_path / "mir_cnn_twt.mat", make_arrays(rng, 24, **kw)),
            "coco": write_npz(tmp_path / "coco.npz", make_arrays(rng, 80, **kw))}


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (out / "cells").rglob("*") if p.is_file()}


def test_quick_table_writes_every_output_and_a_second_run_recomputes_nothing(tmp_path, rng, capsys):
    files = _files(tmp_path, rng)
    out = tmp_path / "table"
    argv = ["--data", *(f"{k}={v}" for k, v in files.items()), "--bits", "16", "32", "--encoders", "mamba",
            "transformer", "--seeds", "0", "1", "--out", str(out), "--quick", "--set", "model.dim=8", "--threads", "1"]
    first = table_main(argv)
    assert len(first["computed"]) == 16 and not first["reused"] and not first["failed"]
    assert sorted(first["outputs"]) == ["map_vs_bits.png", "table.csv", "table.json", "table.md"]
    assert (out / "map_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    results = {Cell(**r["spec"]["cell"]): r for r in json.loads((out / "table.json").read_text())["cells"]}
    assert set(results) == set(plan(["mirflickr", "coco"], [16, 32], ["mamba", "transformer"], [0, 1]))
    for cell, r in results.items():
        assert r["epochs"] == 2 and r["tested"].startswith("best val/mAP checkpoint")
        assert r["validation"].startswith("held out: 4 of the 40 training items")
        assert r["items"] == {"fit": 36, "val_query": 4, "val_database": 36, "query": 12, "database": 60}
        assert r["environment"]["dmmh"] and 0 <= r["test_mAP"] <= 1
    rows = list(csv.DictReader(open(out / "table.csv")))
    measured = [r for r in rows if r["source"] == "measured"]
    assert len(measured) == 8
    for row in measured:
        values = [results[Cell(row["dataset"], int(row["n_bits"]), row["method"], s)]["test_mAP"] for s in (0, 1)]
        assert float(row["mAP_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
        assert float(row["mAP_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row["n_seeds"] == "2" and row["seeds"] == "0;1"
    published = {(r["method"], r["dataset"], int(r["n_bits"])): float(r["mAP_mean"]) for r in rows if r["source"] != "measured"}
    assert published == {(m, d, b): ISSUE_NUMBERS[m, d][i] for m, d in ISSUE_NUMBERS if d in files
                         for i, b in enumerate((16, 32, 64, 128)) if b in (16, 32)}
    assert {r["source"] for r in rows if r["source"] != "measured"} == {"published, other protocol"}
    md = (out / "table.md").read_text()
    assert "Quick smoke run" in md and "arXiv:2308.11797" in md and "published, other protocol" in md
    assert "ties broken by database index" in md and "count as AP 0" in md and "git " in md
    mir_mamba = next(r for r in measured if (r["dataset"], r["method"], r["n_bits"]) == ("mirflickr", "mamba", "16"))
    assert f"| mamba (dmmh, measured) | {float(mir_mamba['mAP_mean']):.4f} ± {float(mir_mamba['mAP_std']):.4f} |" in md

    before = _mtimes(out)
    second = table_main(argv)
    assert not second["computed"] and len(second["reused"]) == 16
    assert _mtimes(out) == before  # nothing trained, nothing written under cells/

    # a result edited by hand no longer verifies: that cell (only) is recomputed, from its saved run
    cell = Cell("coco", 32, "transformer", 1)
    path = next((out / "cells").glob(f"{cell.name}-*/result.json"))
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "test_mAP": 0.99}))
    third = table_main(argv)
    assert third["computed"] == [cell.name] and len(third["reused"]) == 15
    redone = json.loads(path.read_text())
    assert redone["test_mAP"] == stored["test_mAP"] and redone["resumed_from"].endswith("last.ckpt")
    assert redone["best_val_mAP"] == stored["best_val_mAP"] is not None
    capsys.readouterr()


def test_a_failing_cell_is_reported_and_the_rest_is_written(tmp_path, rng):
    files = _files(tmp_path, rng)
    bad = write_npz(tmp_path / "coco_bad.npz", make_arrays(rng, 24, sizes=(40, 12, 60), image_dim=10, text_dim=6))
    status = run_table(tmp_path / "t", {"mirflickr": str(files["mirflickr"]), "coco": str(bad)}, [16], ["mlp"], [0],
                       quick=True, plots=False)
    assert status["computed"] == ["mirflickr-16bit-mlp-seed0"]
    assert list(status["failed"]) == ["coco-16bit-mlp-seed0"] and "80 classes" in status["failed"]["coco-16bit-mlp-seed0"]
    assert sorted(status["outputs"]) == ["table.csv", "table.json", "table.md"]
    md = (tmp_path / "t" / "table.md").read_text()
    assert "Failed cells (rerun `dmmh table` to retry them): coco-16bit-mlp-seed0" in md
    assert next((tmp_path / "t" / "cells").glob("coco-16bit-mlp-seed0-*/error.txt")).read_text().startswith("Traceback")
    rejected = run_table(tmp_path / "t2", {"mirflickr": str(files["mirflickr"])}, [16], ["mlp"], [0],
                         overrides=["model.no_such_option=1"], plots=False)
    assert "LightningCLI rejected the cell's settings" in rejected["failed"]["mirflickr-16bit-mlp-seed0"]
    with pytest.raises(SystemExit, match="1 cell\\(s\\) failed"):
        table_main(["--data", f"mirflickr={files['mirflickr']}", f"coco={bad}", "--bits", "16", "--encoders", "mlp",
                    "--seeds", "0", "--out", str(tmp_path / "t"), "--quick", "--no-plot"])


def test_verify_result_checks_the_checksum_and_the_spec(tmp_path, rng):
    files = _files(tmp_path, rng)
    cell = Cell("mirflickr", 16, "mlp", 0)
    spec = cell_spec(cell, str(files["mirflickr"]), ["trainer.max_epochs=1"])
    from dmmh.table import _digest

    body = {"spec": spec, "test_mAP": 0.5}
    path = tmp_path / "result.json"
    path.write_text(json.dumps({**body, "sha256": _digest(body)}))
    assert verify_result(path, spec)["test_mAP"] == 0.5
    assert verify_result(path, cell_spec(cell, str(files["mirflickr"]), ["trainer.max_epochs=2"])) is None
    assert verify_result(path, cell_spec(Cell("mirflickr", 16, "mlp", 1), str(files["mirflickr"]))) is None
    path.write_text(json.dumps({**body, "test_mAP": 0.6, "sha256": _digest(body)}))
    assert verify_result(path, spec) is None
    path.write_text(path.read_text()[:20])
    assert verify_result(path, spec) is None
    assert verify_result(tmp_path / "missing.json", spec) is None
    # another file at the same root path is another cell
    write_mat73(files["mirflickr"], make_arrays(rng, 24, sizes=(41, 12, 60), image_dim=10, text_dim=6))
    assert cell_spec(cell, str(files["mirflickr"]), ["trainer.max_epochs=1"]) != spec


def test_plan_and_argument_errors(tmp_path):
    assert [c.name for c in plan(["a"], [16, 32], ["mlp"], [0])] == ["a-16bit-mlp-seed0", "a-32bit-mlp-seed0"]
    with pytest.raises(ValueError, match="bits repeat a value"):
        plan(["a"], [16, 16], ["mlp"], [0])
    with pytest.raises(ValueError, match="no seeds"):
        plan(["a"], [16], ["mlp"], [])
    with pytest.raises(FileNotFoundError, match=r"no config .*nope/dmmh_16.yaml .*coco, mirflickr, nuswide, uci_mfeat"):
        cell_spec(Cell("nope", 16, "mlp", 0), None)
    with pytest.raises(FileNotFoundError, match="data root .* does not exist"):
        cell_spec(Cell("mirflickr", 16, "mlp", 0), str(tmp_path / "missing.mat"))
    with pytest.raises(SystemExit):
        table_main(["--data", "mirflickr=", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        table_main(["--data", "uci_mfeat", "--set", "trainer.max_epochs", "--out", str(tmp_path)])


def test_aggregate_mean_and_sample_std(rng):
    cells = plan(["d"], [16], ["mlp"], [0, 1, 2, 3])
    values = rng.random(3)
    results = [{"spec": {"cell": {"dataset": "d", "n_bits": 16, "encoder": "mlp", "seed": s}}, "test_mAP": float(v),
                "fit_seconds": 1.0, "test_seconds": 0.5, "validation": "held out"} for s, v in zip((0, 1, 3), values)]
    (row,) = aggregate(cells, results)
    assert row["mAP_mean"] == pytest.approx(values.mean()) and row["mAP_std"] == pytest.approx(values.std(ddof=1))
    assert row["seeds"] == [0, 1, 3] and row["missing_seeds"] == [2] and row["seconds_per_cell"] == 1.5
    assert mean_std([0.25]) == (0.25, 0.0)
    assert PUBLISHED["bits"] == (16, 32, 64, 128)
    assert {(m, d): v for m, per in PUBLISHED["methods"].items() for d, v in per.items()} == ISSUE_NUMBERS


def test_a_cell_resumes_its_last_checkpoint_weights_only_even_under_torch_force_no_weights_only(tmp_path, rng, monkeypatch):
    """A cell's ``last.ckpt`` (left by a killed run) is loaded with weights_only=True: with the variable
    that turns torch's default off, a checkpoint carrying code is refused and its code does not run."""
    import pickle

    from test_trust import planted_checkpoint

    from dmmh.table import run_cell

    files = _files(tmp_path, rng)
    folder = tmp_path / "cell"
    _, marker = planted_checkpoint(folder / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    spec = cell_spec(Cell("mirflickr", 16, "mlp", 0), str(files["mirflickr"]), ["trainer.max_epochs=1"])
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_cell(spec, folder, threads=1)
    assert not marker.exists()

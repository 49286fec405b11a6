"""The ``dmmh`` console script (LightningCLI) on tiny synthetic data."""

import subprocess
import sys

import yaml

from dmmh.cli import cli


def test_fit_fast_dev_run_from_config(tmp_path):
    cfg = {
        "seed_everything": 0,
        "trainer": {"fast_dev_run": True, "accelerator": "cpu", "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"n_bits": 16, "encoder": "mlp", "dim": 16, "fusion": "cnn_deep", "losses": {"classification": 1.0, "quantization": 0.1}},
        "data": {"class_path": "dmmh.data.SyntheticMultiLabel", "init_args": {"num_train": 64, "num_query": 16, "num_database": 64, "batch_size": 16}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = cli(["fit", "-c", str(path), "--model.n_bits", "8"])
    # widths and class count are linked from the data module into the model
    assert run.model.hparams.image_dim == 64 and run.model.hparams.text_dim == 32 and run.model.hparams.n_classes == 8
    assert run.model.hparams.n_bits == 8
    assert "train/loss" in run.trainer.callback_metrics


def test_console_script_help():
    proc = subprocess.run([sys.executable, "-m", "dmmh.cli", "fit", "--help"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model.n_bits" in proc.stdout and "--data" in proc.stdout


def test_cli_rejects_misspelt_component(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dmmh.cli", "fit", "--trainer.fast_dev_run=true", "--trainer.logger=false",
         "--data=dmmh.data.SyntheticMultiLabel", "--model.encoder=mlp", "--model.fusion=cnn_dep"],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "did you mean 'cnn_deep'" in proc.stderr


def test_top_level_help_lists_every_subcommand(capsys):
    from dmmh.cli import LIGHTNING_COMMANDS, main
    from dmmh.commands import COMMANDS

    for argv in ([], ["--help"], ["-h"]):
        main(argv)
        out = capsys.readouterr().out
        for name, text in {**LIGHTNING_COMMANDS, **COMMANDS}.items():
            assert f"  {name} " in out and text in out


def test_misspelt_subcommand_suggests_the_closest(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dmmh.cli", "extrct"], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown command 'extrct'" in proc.stderr and "did you mean 'extract'" in proc.stderr
    assert "report" in proc.stderr  # lists the commands


def test_every_listed_command_has_a_main():
    import importlib

    from dmmh.commands import COMMANDS

    for name in COMMANDS:
        assert callable(importlib.import_module(f"dmmh.commands.{name}").main)

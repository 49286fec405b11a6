"""The ``dmmh`` console script (LightningCLI) on tiny synthetic data."""

import subprocess
import sys

import pytest
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

    from dmmh.cli import config_names

    for argv in ([], ["--help"], ["-h"], ["help"]):
        main(argv)
        out = capsys.readouterr().out
        for name, text in {**LIGHTNING_COMMANDS, **COMMANDS}.items():
            assert f"  {name} " in out and text in out
        assert "mirflickr/dmmh_64" in out and all(name in out for name in config_names())


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


# -- short names: shipped configs, registered DataModules ------------------------------------------
def test_config_short_names_resolve_to_the_shipped_files(tmp_path):
    import contextlib
    import importlib.resources

    from dmmh.cli import config_names, expand_args

    names = config_names()
    assert {f"{d}/dmmh_{b}" for d in ("mirflickr", "nuswide", "coco") for b in (16, 32, 64, 128)} <= set(names)
    own = tmp_path / "mine.yaml"
    own.write_text("seed_everything: 1\n")
    with contextlib.ExitStack() as stack:
        out = expand_args(["fit", "-c", "mirflickr/dmmh_64", "--config=nuswide/dmmh_16.yaml", "--config", str(own),
                           "-c", "trainer: {max_epochs: 1}", "--model.n_bits", "8"], stack)
        shipped = importlib.resources.files("dmmh") / "configs"
        assert out[2] == str(shipped / "mirflickr" / "dmmh_64.yaml")
        assert out[3] == f"--config={shipped / 'nuswide' / 'dmmh_16.yaml'}"
        assert out[5] == str(own) and out[7] == "trainer: {max_epochs: 1}" and out[8:] == ["--model.n_bits", "8"]
        assert yaml.safe_load(open(out[2]))["model"]["n_bits"] == 64
        with pytest.raises(SystemExit) as exit_:
            expand_args(["fit", "-c", "mirflickr/dmmh64"], stack)
    message = str(exit_.value.code)
    assert "did you mean 'mirflickr/dmmh_64'" in message and all(name in message for name in names)


def test_data_short_names_become_class_paths():
    import contextlib

    import dmmh
    from dmmh.cli import expand_args

    with contextlib.ExitStack() as stack:
        for name in dmmh.list_datamodules():
            cls = dmmh.DATAMODULES.get(name)
            path = f"{cls.__module__}.{cls.__qualname__}"
            assert expand_args(["fit", "--data", name], stack) == ["fit", "--data", path]
            assert expand_args(["fit", f"--data={name}"], stack) == ["fit", f"--data={path}"]
        assert expand_args(["fit", "--data", "mir"], stack)[2].endswith(".MIRFlickr25K")  # an alias
        assert expand_args(["fit", "--data", "my.pkg.Data", "--data.root", "x"], stack) == ["fit", "--data", "my.pkg.Data", "--data.root", "x"]


def test_fit_with_shipped_config_and_data_short_name(tmp_path, rng):
    from _benchmark_files import make_arrays, write_mat73

    mat = write_mat73(tmp_path / "mir_cnn_twt.mat", make_arrays(rng, 24))
    common = ["--data.root", str(mat), "--trainer.fast_dev_run=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}", "--model.encoder=mlp", "--model.n_bits=16", "--model.dim=8"]
    run = cli(expand_cli(["fit", "-c", "mirflickr/dmmh_64", *common]))
    assert type(run.datamodule).__name__ == "MIRFlickr25K" and run.datamodule.batch_size == 1024  # from the config
    assert (run.model.hparams.image_dim, run.model.hparams.text_dim, run.model.hparams.n_classes) == (7, 5, 24)
    run = cli(expand_cli(["fit", "--data", "mirflickr", *common]))
    assert type(run.datamodule).__name__ == "MIRFlickr25K" and "train/loss" in run.trainer.callback_metrics


def expand_cli(args):
    import contextlib

    from dmmh.cli import expand_args

    with contextlib.ExitStack() as stack:  # the shipped files stay where they are in an installed package
        return expand_args(args, stack)


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("given, meant", [
    ("dmmh.data.MIRFlicker25K", "dmmh.data.MIRFlickr25K"),
    ("dmmh.dat.MIRFlickr25K", "dmmh.data.MIRFlickr25K"),
    ("dmmh.data.benchmark.NUSWIDE", "dmmh.data.benchmarks.NUSWIDE"),
    ("lightning.pytorch.callbacks.ModelCheckpont", "lightning.pytorch.callbacks.ModelCheckpoint"),
    ("dmmh.data.MIRFlickr25K", None),  # right already
    ("no_such_package_xyz.Data", None),
])
def test_closest_class_path(given, meant):
    from dmmh.cli import closest_class_path

    assert closest_class_path(given) == meant


@pytest.mark.parametrize("args, hint", [
    (["--data=dmmh.data.MIRFlicker25K", "--data.root=x"], "did you mean 'dmmh.data.MIRFlickr25K'?"),
    (["--data=mirflikr", "--data.root=x"], "did you mean 'mirflickr'"),
    (["--data=synthetic", "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpont"],
     "did you mean 'lightning.pytorch.callbacks.ModelCheckpoint'?"),
])
def test_misspelt_class_paths_get_a_suggestion(args, hint, capsys):
    with pytest.raises(SystemExit):
        cli(expand_cli(args), run=False)
    assert hint in capsys.readouterr().err


def test_error_computing_data_widths_surfaces(tmp_path, monkeypatch):
    """An exception raised while the DataModule computes image_dim/text_dim/num_classes is what the user sees
    (jsonargparse's link skipped an AttributeError, leaving "missing 3 required positional arguments")."""
    (tmp_path / "broken_data.py").write_text(
        "from dmmh.data.base import FeatureDataModule\n"
        "class AttrBug(FeatureDataModule):\n"
        "    def load_splits(self):\n"
        "        return self.no_such_attribute_here\n"
        "class BadFile(FeatureDataModule):\n"
        "    def load_splits(self):\n"
        "        raise ValueError('features.mat: key I_tr has 3 rows, L_tr has 4')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AttributeError, match="no_such_attribute_here"):
        cli(["--data=broken_data.AttrBug", "--trainer.logger=false"], run=False)
    with pytest.raises(ValueError, match=r"^features\.mat: key I_tr has 3 rows, L_tr has 4$"):
        cli(["--data=broken_data.BadFile", "--trainer.logger=false"], run=False)


def test_bad_n_bits_from_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="n_bits must be a positive multiple of 8, got 12"):
        cli(expand_cli(["--data=synthetic", "--model.encoder=mlp", "--model.n_bits=12", "--trainer.logger=false"]), run=False)


def test_missing_extras_print_one_message_not_a_traceback(tmp_path, monkeypatch):
    """``dmmh extract`` into a .safetensors file without open_clip and safetensors: one message naming both
    extras, before any work."""
    from dmmh.cli import main

    for module in ("open_clip", "safetensors"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as exit_:
        main(["extract", "--root", str(tmp_path), "--out", str(tmp_path / "f.safetensors")])
    message = str(exit_.value.code)  # a string: Python prints it without a traceback and exits with status 1
    assert message.startswith("dmmh extract:") and "'open_clip_torch'" in message and "'safetensors'" in message
    assert "pip install 'dmmh[clip,data]'" in message and message.count("pip install") == 1


def test_require_all_names_every_missing_package(monkeypatch):
    from dmmh._optional import MissingDependencyError, require_all

    assert [m.__name__ for m in require_all(["json", "math", "json"], "x")] == ["json", "math"]
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(MissingDependencyError) as err:
        require_all(["json", "faiss", "no_such_module_xyz"], "the thing")
    message = str(err.value)
    assert message.startswith("the thing: missing optional package(s) 'faiss-cpu', 'no_such_module_xyz'")
    assert "pip install 'dmmh[faiss]' and pip install no_such_module_xyz" in message


# -- what dmmh prints ------------------------------------------------------------------------------
def test_fit_output_has_no_lightning_noise_and_names_the_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dmmh.cli", "fit", "--data=synthetic", "--data.num_train=32", "--data.num_query=8",
         "--data.num_database=32", "--data.batch_size=16", "--model.encoder=mlp", "--model.n_bits=8", "--model.dim=8",
         "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "Tip:" not in out and "litlogger" not in out and "LeafSpec" not in out
    ckpt = list(tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
    assert len(ckpt) == 1 and f"best {ckpt[0]}" in proc.stdout
    from dmmh import DMMHModule

    assert DMMHModule.load_from_checkpoint(ckpt[0], weights_only=True).hparams.n_bits == 8  # docs/trust.md


def test_workers_warning_silenced_only_for_feature_arrays(tmp_path, monkeypatch):
    """Lightning's "does not have many workers" (machines with more than 2 cores) is noise for rows of
    in-memory arrays, not for DataModules that decode files in __getitem__."""
    import warnings

    import lightning.pytorch.trainer.connectors.data_connector as connector

    monkeypatch.setattr(connector, "suggested_max_num_workers", lambda devices: 8)  # as on a 16-core machine
    (tmp_path / "decoding_data.py").write_text(
        "import dmmh\n"
        "class Decoding(dmmh.SyntheticMultiLabel):\n"
        "    def dataset(self, split):\n"
        "        return list(super().dataset(split))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--data.num_train=16", "--data.num_query=4", "--data.num_database=16", "--data.batch_size=8", "--model.encoder=mlp",
            "--model.n_bits=8", "--model.dim=8", "--trainer.fast_dev_run=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    for data, warned in (("synthetic", False), ("decoding_data.Decoding", True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cli(expand_cli(["fit", f"--data={data}", *args]))
        assert any("does not have many workers" in str(w.message) for w in caught) == warned, data


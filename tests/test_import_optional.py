"""``import dmmh`` works without the optional packages; using such a feature names the extra."""

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import sys
    # a None entry in sys.modules makes `import x` raise ImportError and find_spec(x) return None,
    # exactly as if the package were not installed
    BLOCKED = {"triton", "mamba_ssm", "selective_scan_cuda", "open_clip", "faiss", "datasets"}
    for name in BLOCKED:
        sys.modules[name] = None
    """
)


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True, timeout=180)


def test_import_without_optional_packages():
    proc = run(
        """
        import dmmh
        print(dmmh.list_encoders(), dmmh.list_fusions(), dmmh.list_hash_heads())
        loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        assert {"mlp"} <= set(dmmh.list_encoders())
        assert {"additive", "cnn_deep"} <= set(dmmh.list_fusions())
        assert len(dmmh.list_hash_heads()) >= 2
        import torch
        m = dmmh.create_model(image_dim=8, text_dim=4, n_bits=8, dim=8, encoder="mlp")
        assert m.encode(torch.randn(2, 8), torch.randn(2, 4)).shape == (2, 8)
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mlp" in proc.stdout and "cnn_deep" in proc.stdout


def test_missing_extra_error_names_the_extra():
    proc = run(
        """
        from dmmh._optional import require, MissingDependencyError
        for module, extra in [("open_clip", "dmmh[clip]"), ("faiss", "dmmh[faiss]"), ("triton", "dmmh[gpu]"),
                              ("datasets", "dmmh[data]")]:
            try:
                require(module, "this feature")
            except MissingDependencyError as e:
                assert extra in str(e), str(e)
            else:
                raise AssertionError(module + " imported")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_hf_pairs_without_datasets_name_the_extra(tmp_path):
    """A Hugging Face source without ``datasets`` installed: the DataModule and ``dmmh extract`` name dmmh[data]."""
    proc = run(
        f"""
        from dmmh._optional import MissingDependencyError
        from dmmh.data.pairs import PairsDataModule
        dm = PairsDataModule.from_hf({str(tmp_path)!r}, transform=lambda im: im, tokenizer=lambda t: t)
        try:
            dm.splits
        except MissingDependencyError as e:
            assert "pip install 'dmmh[data]'" in str(e) and "hf=" in str(e), str(e)
        else:
            raise AssertionError("loaded without datasets")
        from dmmh.commands.extract import main
        try:
            main(["--hf", {str(tmp_path)!r}, "--out", {str(tmp_path / "f.npz")!r}])
        except MissingDependencyError as e:
            assert "'datasets'" in str(e) and "dmmh[" in str(e) and "data" in str(e), str(e)
        else:
            raise AssertionError("extracted without datasets")
        """
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

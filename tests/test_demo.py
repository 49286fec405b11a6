"""The ``make demo`` job, shortened: DMMH beats both baselines at every code length."""

from __future__ import annotations

from dmmh.demo import DEMO_MODEL, QUICK_EPOCHS, format_table, main, run_demo


def test_quick_demo_beats_both_baselines_at_every_code_length(capsys):
    results = main(["--quick"])
    out = capsys.readouterr().out
    assert [r.n_bits for r in results] == [16, 32, 64]
    for r in results:
        assert 0 < r.lsh < 1 and 0 < r.pca_itq < 1 and 0 < r.dmmh <= 1
        assert r.dmmh > r.pca_itq and r.dmmh > r.lsh, r
    table = out[out.index("bits | DMMH"):]
    for r in results:
        assert f"{r.n_bits:>4} | {r.dmmh:>12.4f} | {r.pca_itq:>15.4f} | {r.lsh:>11.4f}" in table
    assert f"epochs={QUICK_EPOCHS}" in out and "encoder=mamba" in out and "total time" in out


def test_demo_is_seeded():
    a = run_demo([16], epochs=1, seed=3)
    b = run_demo([16], epochs=1, seed=3)
    assert (a[0].dmmh, a[0].pca_itq, a[0].lsh) == (b[0].dmmh, b[0].pca_itq, b[0].lsh)
    assert "16 |" in format_table(a, 1, DEMO_MODEL, 1.0)


def test_make_demo_installs_only_the_core_and_make_test_adds_the_extras(tmp_path):
    """``make demo`` on a fresh clone installs dmmh with its core dependencies only (no test/docs extras,
    no torchvision); ``make test`` adds them (read from ``make -n``: what it would run, nothing run)."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        import pytest

        pytest.skip("no make on this machine")
    root = Path(__file__).resolve().parent.parent
    venv = tmp_path / ".venv"  # absent: make plans the whole environment
    plan = lambda target: subprocess.run(["make", "-n", "-C", str(root), target, f"VENV={venv}"],  # noqa: E731
                                         capture_output=True, text=True, check=True).stdout
    demo, test = plan("demo"), plan("test")
    installs = [line for line in demo.splitlines() if "pip install" in line and "--upgrade pip" not in line]
    assert len(installs) == 1 and installs[0].endswith("-e .") and "torchvision" not in demo and "[" not in installs[0]
    assert "-m dmmh.demo" in demo
    assert '-e ".[test,docs]"' in test and "torchvision" in test and "-m pytest" in test

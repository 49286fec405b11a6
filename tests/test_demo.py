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

"""Random-projection LSH and PCA-ITQ against plain numpy / scikit-learn references."""

from __future__ import annotations

import numpy as np
import pytest

from dmmh.hashing.baselines import PCAITQ, RandomProjectionLSH, sign_codes


def _data(rng, n=60, d=12):
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3.0


def test_sign_codes_zero_is_plus_one():
    np.testing.assert_array_equal(sign_codes(np.array([[-0.5, 0.0, -0.0, 2.0]])), [[-1, 1, 1, 1]])


def test_lsh_matches_a_loop():
    rng = np.random.default_rng()
    x, q = _data(rng), _data(rng, n=7)
    lsh = RandomProjectionLSH(16, seed=5).fit(x)
    w = np.random.default_rng(5).standard_normal((12, 16))
    mean = x.mean(0)
    codes = lsh.encode(q)
    assert codes.shape == (7, 16) and codes.dtype == np.float32
    for i in range(7):
        for b in range(16):
            assert codes[i, b] == (1 if sum((q[i, j] - mean[j]) * w[j, b] for j in range(12)) >= 0 else -1)


def test_pca_directions_match_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng()
    x = _data(rng)
    itq = PCAITQ(6, n_iter=0).fit(x)
    ref = PCA(6).fit(x).components_.T
    signs = np.sign((itq.components * ref).sum(0))  # each direction is defined up to its sign
    np.testing.assert_allclose(itq.components * signs, ref, atol=1e-8)


def test_itq_rotation_is_orthogonal_loss_monotone_and_a_fixed_point():
    rng = np.random.default_rng()
    x = _data(rng, n=80, d=10)
    itq = PCAITQ(8, n_iter=30, seed=int(rng.integers(1000))).fit(x)
    r = itq.rotation
    np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-10)
    loss = np.array(itq.quantization_loss)
    assert len(loss) == 30 and (np.diff(loss) <= 1e-9 * loss[0]).all()
    v = (x - x.mean(0)) @ itq.components
    b = sign_codes(v @ r).astype(np.float64)
    # sign(V R) is the best B for the final R, so its error is at most the last recorded one,
    # and no random rotation comes close
    assert ((b - v @ r) ** 2).sum() <= loss[-1] + 1e-9
    for _ in range(20):
        q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
        assert ((b - v @ r) ** 2).sum() <= ((b - v @ q) ** 2).sum() + 1e-9
    np.testing.assert_array_equal(itq.encode(x), b)


def test_itq_separates_clusters():
    """Two well-separated clusters: items share a 1-bit ITQ code exactly when they share a cluster."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2, 20)) * 6
    y = np.repeat([0, 1], 100)
    x = centres[y] + rng.standard_normal((200, 20))
    itq = PCAITQ(1).fit_encode(x)
    agree = lambda c: np.mean([(c[i] == c[j]).all() == (y[i] == y[j]) for i in range(0, 200, 7) for j in range(200)])  # noqa: E731
    assert agree(itq) == 1.0


@pytest.mark.parametrize("cls", [RandomProjectionLSH, PCAITQ])
def test_errors(cls):
    rng = np.random.default_rng()
    with pytest.raises(RuntimeError, match="call fit"):
        cls(4).encode(rng.standard_normal((3, 5)))
    with pytest.raises(ValueError, match=r"expected features \(items >= 1, dim\), got shape \(0, 5\)"):
        cls(4).fit(np.zeros((0, 5)))
    x = rng.standard_normal((10, 5))
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="nan at row 3, column 2"):
        cls(4).fit(x)
    fitted = cls(4).fit(rng.standard_normal((10, 5)))
    with pytest.raises(ValueError, match="6 columns, fitted on 5"):
        fitted.encode(rng.standard_normal((2, 6)))
    with pytest.raises(ValueError, match="n_bits must be >= 1"):
        cls(0)


def test_itq_needs_enough_dimensions():
    with pytest.raises(ValueError, match=r"16 bits need at least 16 items and 16 feature columns.*\(40, 10\)"):
        PCAITQ(16).fit(np.random.default_rng().standard_normal((40, 10)))

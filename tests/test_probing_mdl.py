"""Online-code MDL: closed-form code lengths, planted signal compresses, noise does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aligned_probing.probing.mdl import (
    MDL_FRACTIONS,
    block_boundaries,
    gaussian_codelength,
    online_codelength,
)


def test_fractions_and_boundaries():
    assert MDL_FRACTIONS[0] == 1 / 1024 and MDL_FRACTIONS[-2] == 0.5 and MDL_FRACTIONS[-1] == 1.0
    assert block_boundaries(2048).tolist() == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert block_boundaries(1500).tolist() == [2, 5, 11, 23, 46, 93, 187, 375, 750, 1500]
    assert block_boundaries(10).tolist() == [2, 5, 10]


def test_gaussian_codelength_is_minus_log2_density_times_eps(rng):
    y, mu = rng.uniform(size=(50, 2)), rng.uniform(size=(50, 2))
    sigma2, eps = np.array([0.04, 0.2]), 0.01
    expected = -np.log2(stats.norm.pdf(y, mu, np.sqrt(sigma2)) * eps).sum(axis=0)
    np.testing.assert_allclose(gaussian_codelength(y, mu, sigma2, eps), expected, rtol=1e-12)
    # the variance floor eps^2 bounds a bin's probability: the code stays positive even for sigma -> 0
    assert gaussian_codelength(y[:, :1], y[:, :1], np.array([0.0]), eps)[0] > 0


def test_planted_signal_compresses(rng):
    n, p = 1000, 20
    X = rng.normal(size=(n, p))
    w = rng.normal(size=p)
    y = np.clip(0.5 + 0.12 * X @ w / np.linalg.norm(w) + 0.02 * rng.normal(size=n), 0, 1)  # linear, sd 0.02
    code = online_codelength(X, y)
    assert code.compression[0] > 1.5
    assert code.uniform_codelength[0] == pytest.approx(n * np.log2(100))


def test_noise_does_not_compress(rng):
    n, p = 1000, 20
    X = rng.normal(size=(n, p))
    y = rng.uniform(size=(n, 2))  # uniform targets: the Gaussian code cannot beat the uniform one
    code = online_codelength(X, y)
    np.testing.assert_allclose(code.compression, 1.0, atol=0.1)
    # and a stronger signal compresses more than a weaker one (monotone in information)
    z = X @ rng.normal(size=p)
    z /= z.std()
    weak, strong = (
        online_codelength(X, np.clip(0.5 + 0.1 * z + s * rng.normal(size=n), 0, 1)).compression[0]
        for s in (0.1, 0.03)
    )
    assert 1.0 < weak < strong


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"precision": 0.0}, "precision must be > 0"),
        ({"target_range": (0.0, 0.5)}, r"Y must be finite and inside target_range=\(0.0, 0.5\)"),
    ],
)
def test_errors(rng, kwargs, match):
    X, y = rng.normal(size=(40, 3)), rng.uniform(size=40)
    with pytest.raises(ValueError, match=match):
        online_codelength(X, y, **kwargs)

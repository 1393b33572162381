"""Online-code MDL: closed-form code lengths; gains in bits vs control and baseline; signal vs noise."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from aligned_probing.probing.mdl import (
    MDL_FRACTIONS,
    baseline_codelength,
    block_boundaries,
    gaussian_codelength,
    group_block_boundaries,
    mixture_codelength,
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


def test_gain_does_not_move_with_eps_but_uniform_compression_does(rng):
    n, p = 600, 10
    X = rng.normal(size=(n, p))
    y = np.clip(0.5 + 0.12 * X[:, 0] + 0.05 * rng.normal(size=n), 0, 1)
    control = y[rng.permutation(n)]
    codes = [online_codelength(X, y, control=control, precision=eps) for eps in (1e-3, 1e-4, 1e-6)]
    for code in codes[1:]:  # -log2 eps and the uniform first block cancel in the differences
        np.testing.assert_allclose(code.gain_vs_baseline, codes[0].gain_vs_baseline, rtol=1e-9)
        np.testing.assert_allclose(code.gain_vs_control, codes[0].gain_vs_control, rtol=1e-9)
    assert codes[0].compression[0] > codes[1].compression[0] + 0.05  # the old headline moves with eps


def test_pure_noise_with_skewed_targets_has_no_gain(rng):
    # beta(0.5, 8) targets and random features: uniform/online > 1 (looks "learnable"), the gains are ~0
    n, p = 1000, 20
    gains_b, gains_c, comp = [], [], []
    for _ in range(4):
        X = rng.normal(size=(n, p))
        y = rng.beta(0.5, 8, size=n)
        code = online_codelength(X, y, control=y[rng.permutation(n)], precision=1e-3)
        gains_b.append(code.gain_vs_baseline[0])
        gains_c.append(code.gain_vs_control[0])
        comp.append(code.compression[0])
    assert min(comp) > 1.1  # the old, misleading number
    assert -0.05 < np.mean(gains_b) < 0.01  # bits per sample; not > 0
    assert abs(np.mean(gains_c)) < 0.05


def test_planted_signal_has_a_clear_gain(rng):
    n, p = 1000, 20
    X = rng.normal(size=(n, p))
    w = rng.normal(size=p)
    y = np.clip(0.5 + 0.12 * X @ w / np.linalg.norm(w) + 0.05 * rng.normal(size=n), 0, 1)
    code = online_codelength(X, y, control=y[rng.permutation(n)])
    assert code.gain_vs_baseline[0] > 1.0 and code.gain_vs_control[0] > 1.0  # bits per sample
    assert code.compression_vs_baseline[0] > 1.15


def test_mixture_code_bounds_one_wild_prediction(rng):
    y = np.array([[0.9]])
    wild = mixture_codelength(y, np.array([[0.1]]), np.array([1e-4]), 0.01)[0]
    assert wild <= np.log2(100) + np.log2(100) + 1e-9  # uniform cost + log2(1 / escape)
    assert gaussian_codelength(y, np.array([[0.1]]), np.array([1e-4]), 0.01)[0] > 1000
    good = mixture_codelength(y, np.array([[0.9]]), np.array([0.01]), 0.01)[0]
    assert good == pytest.approx(
        gaussian_codelength(y, np.array([[0.9]]), np.array([0.01]), 0.01)[0], abs=0.02
    )


def test_baseline_code_is_the_running_mean_and_loo_variance(rng):
    y = rng.uniform(size=(40, 1))
    ends = block_boundaries(40)
    expected = ends[0] * np.log2(100)
    for start, stop in zip(ends[:-1], ends[1:], strict=True):
        past = y[:start, 0]
        loo = [past[i] - np.delete(past, i).mean() for i in range(start)]  # explicit leave-one-out
        var = (2 / 12 + start * np.mean(np.square(loo))) / (2 + start)  # shrunk to the uniform variance
        dens = 0.99 * stats.norm.pdf(y[start:stop, 0], past.mean(), np.sqrt(var)) + 0.01  # uniform escape
        expected += -np.log2(dens * 0.01).sum()
    got = baseline_codelength(y, ends, 0.01, np.log2(100))
    np.testing.assert_allclose(got, [expected], rtol=1e-10)


def test_group_blocks_end_between_groups():
    groups = np.repeat(np.arange(20), 3)
    ends = group_block_boundaries(groups)
    assert ends.tolist() == (3 * block_boundaries(20)).tolist()
    with pytest.raises(ValueError, match="groups must be contiguous"):
        group_block_boundaries(np.array([0, 1, 0, 1]))


def _prompt_duplicated_noise(rng, n_prompts=120, k=5, d=40):
    z = rng.normal(size=(n_prompts, d))
    X = np.repeat(z, k, axis=0) + 0.05 * rng.normal(size=(n_prompts * k, d))
    y = np.clip(np.repeat(rng.uniform(size=n_prompts), k) + 0.02 * rng.normal(size=n_prompts * k), 0, 1)
    return X, y, np.repeat(np.arange(n_prompts), k)


def test_prompt_grouped_blocks_do_not_reward_memorising_prompts(rng):
    # No information: prompt vectors are unrelated to the prompt-level target. Rows in random order let
    # later blocks code continuations of prompts already seen (memorised): a spurious gain. Whole prompts
    # per block, and alpha by leave-one-prompt-out, remove it.
    grouped, rowwise = [], []
    for _ in range(5):
        X, y, g = _prompt_duplicated_noise(rng)
        grouped.append(online_codelength(X, y, groups=g).gain_vs_baseline[0])
        perm = rng.permutation(len(y))
        rowwise.append(online_codelength(X[perm], y[perm]).gain_vs_baseline[0])
    assert np.mean(rowwise) > 0.05, rowwise
    assert np.mean(grouped) < 0.02, grouped

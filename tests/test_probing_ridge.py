"""RidgeProbe: agreement with scikit-learn, LOO selection, planted directions, the estimator contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import Ridge, RidgeCV
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from aligned_probing.probing import DEFAULT_ALPHAS, RidgeProbe
from aligned_probing.probing._gcv import ridge_gcv


def _data(rng, n=120, p=30, k=3, noise=0.5):
    X = rng.normal(size=(n, p)) * rng.uniform(0.1, 10, size=p) + rng.normal(size=p) * 5
    W = rng.normal(size=(p, k))
    Y = X @ W + noise * rng.normal(size=(n, k)) * np.std(X @ W, axis=0)
    return X, Y


@pytest.mark.parametrize("estimator", [RidgeProbe(), RidgeProbe(alphas=(1.0,))])
def test_sklearn_estimator_contract(estimator):
    # check_estimator rather than parametrize_with_checks: the latter reports sklearn's optional array-API
    # check as a skipped test (it needs SCIPY_ARRAY_API); on_skip=None leaves such checks out silently.
    check_estimator(estimator, on_skip=None)


@pytest.mark.parametrize("shape", [(120, 30), (25, 60)])  # n > p (primal eigh) and n < p (dual eigh)
@pytest.mark.parametrize("alpha", [0.01, 1.0, 100.0])
def test_matches_sklearn_ridge_at_fixed_alpha(rng, shape, alpha):
    X, Y = _data(rng, *shape)
    probe = RidgeProbe(alphas=(alpha,)).fit(X, Y)
    scaler = StandardScaler().fit(X)
    ref = Ridge(alpha=alpha).fit(scaler.transform(X), Y)
    np.testing.assert_allclose(probe.coef_, ref.coef_ / scaler.scale_, rtol=1e-6, atol=1e-8)
    X_new = rng.normal(size=(40, shape[1])) * 3
    np.testing.assert_allclose(
        probe.predict(X_new), ref.predict(scaler.transform(X_new)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("shape", [(150, 40), (30, 80)])
def test_loo_alpha_selection_matches_ridgecv(rng, shape):
    X, Y = _data(rng, *shape, k=4, noise=2.0)
    alphas = np.logspace(-2, 5, 15)
    probe = RidgeProbe(alphas=alphas).fit(X, Y)
    Xs = StandardScaler().fit_transform(X)
    ref = RidgeCV(alphas=alphas, alpha_per_target=True, gcv_mode="svd").fit(Xs, Y)
    np.testing.assert_array_equal(probe.alpha_, ref.alpha_)
    np.testing.assert_allclose(probe.loo_mse_, -ref.best_score_, rtol=1e-7)


def test_loo_error_equals_explicit_leave_one_out(rng):
    # The closed-form LOO residual (y_i - yhat_i) / (1 - H_ii) against n refits without sample i.
    X, Y = _data(rng, 30, 8, k=2)
    Xs = StandardScaler().fit_transform(X)
    alpha = 3.0
    fit = ridge_gcv(Xs, Y, np.array([alpha]))
    resid = [
        Y[i] - Ridge(alpha=alpha).fit(np.delete(Xs, i, 0), np.delete(Y, i, 0)).predict(Xs[i : i + 1])[0]
        for i in range(len(Y))
    ]
    np.testing.assert_allclose(fit.loo_mse, np.mean(np.square(resid), axis=0), rtol=1e-9)


def test_planted_direction_recovered(rng):
    n, p = 600, 50
    w = rng.normal(size=p)
    X = rng.normal(size=(n, p))
    y = X @ w + 0.1 * rng.normal(size=n)
    probe = RidgeProbe().fit(X, pd.Series(y, name="toxicity"))
    cosine = probe.direction("toxicity") @ (w / np.linalg.norm(w))
    assert cosine > 0.99
    np.testing.assert_allclose(np.linalg.norm(probe.direction(0)), 1.0)


def test_multi_output_equals_separate_fits(rng):
    # One fit for all targets = one fit per target (alpha is chosen per target).
    X, Y = _data(rng, 80, 20, k=3, noise=1.0)
    joint = RidgeProbe().fit(X, Y)
    for j in range(3):
        single = RidgeProbe().fit(X, Y[:, j])
        assert single.alpha_ == joint.alpha_[j]
        np.testing.assert_allclose(single.coef_, joint.coef_[j], rtol=1e-10, atol=1e-12)
        assert np.ndim(single.predict(X)) == 1


def test_standardisation_uses_training_data_only(rng):
    # Predictions on new data must not depend on the test set: refitting with a shifted test set is a no-op,
    # and invariance to feature scaling shows that standardisation is part of the model.
    X, Y = _data(rng, 100, 10)
    scale = rng.uniform(0.01, 100, size=10)
    a = RidgeProbe().fit(X, Y)
    b = RidgeProbe().fit(X * scale, Y)
    X_new = rng.normal(size=(20, 10)) + 100
    np.testing.assert_allclose(a.predict(X_new), b.predict(X_new * scale), rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(a.alpha_, b.alpha_)


def test_target_names_and_direction_errors(rng):
    X, Y = _data(rng, 50, 5, k=2)
    probe = RidgeProbe().fit(X, pd.DataFrame(Y, columns=["toxicity", "insult"]))
    assert probe.target_names_ == ["toxicity", "insult"]
    with pytest.raises(ValueError, match=r"attribute must be one of \['toxicity', 'insult'\], got 'threat'"):
        probe.direction("threat")
    with pytest.raises(ValueError, match=r"int in \[0, 1\], got 5"):
        probe.direction(5)
    assert RidgeProbe().fit(X, Y).target_names_ == ["0", "1"]


@pytest.mark.parametrize("alphas", [(), (0.0, 1.0), (-1.0,), (np.nan,)])
def test_bad_alphas_error(rng, alphas):
    X, Y = _data(rng, 20, 3)
    with pytest.raises(ValueError, match="alphas must be a non-empty sequence of finite values > 0"):
        RidgeProbe(alphas=alphas).fit(X, Y)


def test_nan_targets_rejected(rng):
    X, Y = _data(rng, 20, 3)
    Y[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        RidgeProbe().fit(X, Y)


def test_clone_keeps_params_only(rng):
    probe = RidgeProbe(alphas=(1.0, 2.0)).fit(*_data(rng, 20, 3))
    copy = clone(probe)
    assert copy.get_params() == {"alphas": (1.0, 2.0), "backend": "numpy", "device": None}
    assert not hasattr(copy, "coef_")


def _duplicated_prompts(rng, n_prompts=60, k=5, p=40, noise=0.05):
    """Prompt-level duplication: each prompt's k rows share a random prompt vector (plus small row noise)
    and a prompt-level target effect that the features cannot predict for *new* prompts; only a weak
    linear signal generalises."""
    w = rng.normal(size=p) / np.sqrt(p)
    z = rng.normal(size=(n_prompts, p))
    effect = rng.normal(size=n_prompts)  # memorisable per prompt, not predictable
    X = np.repeat(z, k, axis=0) + noise * rng.normal(size=(n_prompts * k, p))
    y = np.repeat(0.5 * z @ w + effect, k) + 0.1 * rng.normal(size=n_prompts * k)
    return X, y, np.repeat(np.arange(n_prompts), k), w


def test_leave_one_group_out_equals_explicit_group_refits(rng):
    X, y, groups, _ = _duplicated_prompts(rng, n_prompts=12, k=3, p=6)
    groups = groups.copy()
    groups[:2] = 99  # ragged group sizes: one group of 2, one of 1, the rest 3
    Xs = StandardScaler().fit_transform(X)
    alpha = 2.0
    fit = ridge_gcv(Xs, y[:, None], np.array([alpha]), groups=groups)
    sse = 0.0
    for g in np.unique(groups):
        out = groups == g
        ref = Ridge(alpha=alpha).fit(Xs[~out], y[~out])
        sse += np.sum((y[out] - ref.predict(Xs[out])) ** 2)
    np.testing.assert_allclose(fit.loo_mse[0], sse / len(y), rtol=1e-10)
    # groups of one row are plain LOO
    loo = ridge_gcv(Xs, y[:, None], np.array([alpha]))
    np.testing.assert_allclose(
        ridge_gcv(Xs, y[:, None], np.array([alpha]), groups=np.arange(len(y))).loo_mse, loo.loo_mse
    )


def test_grouped_selection_avoids_the_small_alpha_that_loo_picks_on_duplicated_prompts(rng):
    # Old behaviour: LOO keeps the held-out row's siblings in the fit, so memorising prompts looks good
    # and LOO picks a small alpha; on new prompts that alpha predicts worse than the grouped choice.
    X, y, groups, w = _duplicated_prompts(rng)
    alphas = np.logspace(-2, 5, 15)
    loo = RidgeProbe(alphas=alphas).fit(X, y)
    logo = RidgeProbe(alphas=alphas).fit(X, y, groups=groups)
    assert loo.alpha_ * 10 <= logo.alpha_
    Xn, yn, _, _ = _duplicated_prompts(np.random.default_rng(1), n_prompts=400)
    Xn = np.repeat(rng.normal(size=(400, X.shape[1])), 5, axis=0)  # new prompts, same signal w
    yn = Xn @ w * 0.5 + np.repeat(rng.normal(size=400), 5)
    mse = {name: np.mean((yn - m.predict(Xn)) ** 2) for name, m in (("loo", loo), ("logo", logo))}
    assert mse["logo"] < mse["loo"]


def test_groups_length_error(rng):
    X, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    with pytest.raises(ValueError, match="groups must have one entry per row: got 5 groups for 20 rows"):
        RidgeProbe().fit(X, y, groups=np.arange(5))


@pytest.mark.parametrize("shape", [(150, 40), (30, 80)])  # primal and dual (n < p) forms
@pytest.mark.parametrize("grouped", [False, True])
def test_torch_backend_matches_numpy(rng, shape, grouped):
    X, Y = _data(rng, *shape, k=3, noise=2.0)
    X[:, 3] = 7.0  # a constant feature: scale 1 in both backends
    groups = np.repeat(np.arange(shape[0] // 3 + 1), 3)[: shape[0]] if grouped else None
    alphas = np.logspace(-2, 5, 15)
    ref = RidgeProbe(alphas=alphas).fit(X, Y, groups=groups)
    got = RidgeProbe(alphas=alphas, backend="torch", device="cpu").fit(X, Y, groups=groups)
    np.testing.assert_array_equal(got.alpha_, ref.alpha_)
    np.testing.assert_allclose(got.loo_mse_, ref.loo_mse_, rtol=1e-6)
    np.testing.assert_allclose(got.coef_, ref.coef_, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(got.intercept_, ref.intercept_, rtol=1e-6, atol=1e-9)
    X_new = rng.normal(size=(20, shape[1]))
    np.testing.assert_allclose(got.predict(X_new), ref.predict(X_new), rtol=1e-6, atol=1e-8)


def test_torch_batched_over_layers_equals_per_layer_fits(rng):
    from aligned_probing.probing._gcv_torch import ridge_fit_torch

    X = rng.normal(size=(3, 50, 12))
    y = rng.normal(size=(50, 2))
    fit = ridge_fit_torch(X, y, np.logspace(-2, 4, 9), device="cpu")
    for layer in range(3):
        ref = RidgeProbe(alphas=np.logspace(-2, 4, 9)).fit(X[layer], y)
        np.testing.assert_allclose(fit.coef[layer], ref.coef_, rtol=1e-6, atol=1e-10)
        np.testing.assert_array_equal(fit.alpha[layer], ref.alpha_)


def test_bad_backend_error(rng):
    with pytest.raises(ValueError, match=r"backend must be one of \('numpy', 'torch'\), got 'jax'"):
        RidgeProbe(backend="jax").fit(rng.normal(size=(10, 2)), rng.normal(size=10))


def _frozen_ridge_gcv(Xs, Y, alphas, groups=None):
    """The solver before the standardisation was folded into the Gram matrix (commit 1c12f52), frozen here
    as the parity reference: standardised design, `np.linalg.eigh`, `U = (Xs V) / s`."""
    from aligned_probing.probing._gcv import _select, check_groups, group_buckets

    n, p = Xs.shape
    y_mean = Y.mean(axis=0)
    Yc = Y - y_mean
    Xs = Xs - Xs.mean(axis=0)
    if n >= p:
        evals, V = np.linalg.eigh(Xs.T @ Xs)
    else:
        evals, U = np.linalg.eigh(Xs @ Xs.T)
    evals = np.clip(evals, 0.0, None)
    keep = evals > (max(n, p) * np.finfo(np.float64).eps * evals.max())
    s = np.sqrt(evals)[keep]
    if n >= p:
        V = V[:, keep]
        U = (Xs @ V) / s
    else:
        U = U[:, keep]
        V = (Xs.T @ U) / s
    UtY = U.T @ Yc
    s2 = s**2
    shrink = s2[:, None] / (s2[:, None] + alphas[None, :])
    fitted = (U @ (shrink[:, :, None] * UtY[:, None, :]).reshape(len(s), -1)).reshape(n, len(alphas), -1)
    groups = check_groups(groups, n)
    if groups is None:
        h = 1.0 / n + (U**2) @ shrink
        mse = np.mean(((Yc[:, None, :] - fitted) / (1.0 - h)[:, :, None]) ** 2, axis=0)
    else:
        resid = Yc[:, None, :] - fitted
        sse = np.zeros((len(alphas), Y.shape[1]))
        for rows in group_buckets(groups):
            UG = U[rows]
            H = 1.0 / n + np.einsum("msr,ra,mtr->mast", UG, shrink, UG, optimize=True)
            e = np.linalg.solve(np.eye(rows.shape[1]) - H, resid[rows].transpose(0, 2, 1, 3))
            sse += (e**2).sum(axis=(0, 2))
        mse = sse / n
    best = _select(mse)
    alpha = alphas[best]
    coef = (V @ ((s[:, None] / (s2[:, None] + alpha[None, :])) * UtY)).T
    return coef, alpha, mse[best, np.arange(mse.shape[1])], y_mean


@pytest.mark.parametrize("shape", [(400, 60), (40, 90)])  # primal (syrk + eigh) and dual forms
@pytest.mark.parametrize("grouped", [False, True])
def test_folded_standardisation_matches_the_frozen_solver(rng, shape, grouped):
    # Residual-stream-like features: offsets, anisotropic scales, a few "massive" dimensions and a constant
    # one; the probe (standardisation folded into the Gram matrix and the projection) must reproduce the
    # frozen standardise-then-solve path to 1e-8.
    n, p = shape
    X = rng.normal(size=(n, p)) * np.exp(rng.normal(size=p)) + rng.normal(size=p) * 20
    X[:, :3] *= 300
    X[:, 5] = 4.0
    Y = X[:, :8] @ rng.normal(size=(8, 3)) / X[:, :8].std(axis=0).sum() + rng.normal(size=(n, 3))
    groups = np.repeat(np.arange(n), 2)[:n] if grouped else None
    alphas = np.asarray(DEFAULT_ALPHAS)
    probe = RidgeProbe().fit(X, Y, groups=groups)
    scaler = StandardScaler().fit(X)
    coef, alpha, mse, y_mean = _frozen_ridge_gcv(scaler.transform(X), Y, alphas, groups)
    coef = coef / scaler.scale_
    np.testing.assert_array_equal(probe.alpha_, alpha)
    np.testing.assert_allclose(probe.coef_, coef, rtol=1e-8, atol=1e-8 * np.abs(coef).max())
    np.testing.assert_allclose(probe.intercept_, y_mean - coef @ scaler.mean_, rtol=1e-8)
    np.testing.assert_allclose(probe.loo_mse_, mse, rtol=1e-8)
    fit = ridge_gcv(X - scaler.mean_, Y, alphas, groups=groups, scale=scaler.scale_, centred=True)
    np.testing.assert_allclose(fit.coef / scaler.scale_, coef, rtol=1e-8, atol=1e-8 * np.abs(coef).max())
    # not centred: ridge_gcv centres the design itself (a shift of X changes nothing)
    shifted = ridge_gcv(X + 5.0, Y, alphas, groups=groups, scale=scaler.scale_)
    np.testing.assert_allclose(shifted.loo_mse, mse, rtol=1e-8)


def _fold_data(rng, n=240, p=30):
    """Residual-stream-like design: offsets, anisotropic and massive dimensions, a constant column, and a
    column nearly constant on the first 180 rows only (the training rows of the direct-Gram fold below)."""
    X = rng.normal(size=(n, p)) * np.exp(rng.normal(size=p)) + rng.normal(size=p) * 50
    X[:, :2] *= 500
    X[:, 4] = 3.0
    X[:, 6] = 2.0 + 1e-6 * rng.normal(size=n)
    X[180:, 6] += rng.normal(size=n - 180)
    Y = X[:, 7:12] @ rng.normal(size=(5, 3)) / X[:, 7:12].std(axis=0).sum() + rng.normal(size=(n, 3))
    Y[:180, 0] += (X[:180, 6] - 2.0) * 1e6  # the nearly constant feature carries signal on those rows
    return X, Y


@pytest.mark.parametrize("grouped", [False, True])
def test_fold_gram_equals_a_probe_fitted_on_the_training_rows(rng, grouped):
    # The Gram matrix of all rows downdated to each fold's training rows: the same probe to 1e-8.
    from aligned_probing.probing._foldgram import FoldGram

    X, Y = _fold_data(rng)
    X[:, 6] = rng.normal(size=len(X))  # no near-constant column: every fold is downdated
    groups = np.repeat(np.arange(len(X) // 2), 2) if grouped else None
    shared = FoldGram(X)
    folds = np.arange(len(X)) % 4
    alphas = np.asarray(DEFAULT_ALPHAS)
    for fold in range(4):
        train = folds != fold
        g = None if groups is None else groups[train]
        ref = RidgeProbe().fit(X[train], Y[train], groups=g)
        coef, intercept, alpha, mse = shared.fit(train, Y[train], alphas, groups=g)
        np.testing.assert_array_equal(alpha, ref.alpha_)
        np.testing.assert_allclose(coef, ref.coef_, rtol=1e-8, atol=1e-8 * np.abs(ref.coef_).max())
        np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-8)
        np.testing.assert_allclose(mse, ref.loo_mse_, rtol=1e-8)
        _, mean, scale, _ = shared.standardise(train)
        np.testing.assert_allclose(mean, ref.x_mean_, rtol=1e-12)
        np.testing.assert_allclose(scale, ref.x_scale_, rtol=1e-10)
        assert scale[4] == 1.0  # constant feature: StandardScaler's rule


def test_fold_gram_falls_back_to_a_direct_gram_for_a_feature_nearly_constant_on_the_training_rows(rng):
    # Column 6 varies by 1e-6 on rows 0..179 and by 1 on 180..239: downdating would lose ~1e12 of precision.
    from aligned_probing.probing._foldgram import FoldGram

    X, Y = _fold_data(rng)
    train = np.arange(len(X)) < 180
    shared = FoldGram(X)
    _, _, scale, G = shared.standardise(train)
    Xs = StandardScaler().fit_transform(X[train])
    np.testing.assert_allclose(G, Xs.T @ Xs, rtol=1e-9, atol=1e-9 * np.abs(G).max())
    ref = RidgeProbe().fit(X[train], Y[train])
    coef, intercept, alpha, _ = shared.fit(train, Y[train], np.asarray(DEFAULT_ALPHAS))
    np.testing.assert_array_equal(alpha, ref.alpha_)
    np.testing.assert_allclose(coef, ref.coef_, rtol=1e-8, atol=1e-8 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(intercept, ref.intercept_, rtol=1e-8)


def test_fold_gram_recovers_a_planted_direction(rng):
    from aligned_probing.probing._foldgram import FoldGram

    n, p = 800, 40
    w = rng.normal(size=p)
    X = rng.normal(size=(n, p)) + 100.0  # large offset: the downdate is centred on the all-rows mean
    y = (X - 100.0) @ w + 0.1 * rng.normal(size=n)
    train = np.arange(n) % 4 != 0
    coef, intercept, _, _ = FoldGram(X).fit(train, y[train], np.asarray(DEFAULT_ALPHAS))
    assert coef[0] @ w / np.linalg.norm(coef[0]) / np.linalg.norm(w) > 0.999
    pred = X[~train] @ coef[0] + intercept[0]
    assert np.corrcoef(pred, y[~train])[0, 1] > 0.99


def test_fold_gram_accumulated_in_row_blocks_and_masked_rows(rng, monkeypatch):
    # The all-rows Gram matrix is summed over blocks of rows and only over the usable rows: blocks of 37
    # rows and a mask give the Gram matrix of those rows, and a training mask outside them is an error.
    from aligned_probing.probing import _foldgram

    X, _ = _fold_data(rng)
    rows = np.ones(len(X), dtype=bool)
    rows[[5, 77, 200]] = False
    X[~rows] = np.nan
    whole = _foldgram.FoldGram(X, rows=rows)
    monkeypatch.setattr(_foldgram, "BLOCK_ROWS", 37)
    blocked = _foldgram.FoldGram(X, rows=rows)
    Xg = X[rows] - X[rows].mean(axis=0)
    np.testing.assert_allclose(blocked.offset, whole.offset, rtol=1e-13)
    np.testing.assert_allclose(blocked.gram, Xg.T @ Xg, rtol=1e-10, atol=1e-10 * np.abs(whole.gram).max())
    np.testing.assert_allclose(whole.gram, Xg.T @ Xg, rtol=1e-10, atol=1e-10 * np.abs(whole.gram).max())
    with pytest.raises(ValueError, match="within the usable rows"):
        whole.standardise(np.ones(len(X), dtype=bool))

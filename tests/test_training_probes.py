"""Logistic probes: scikit-learn contract, planted directions, ensembles, safetensors round trip."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.utils.estimator_checks import check_estimator

from aligned_probing.training.probes import LogisticProbe, ProbeSet, auroc, fit_probe_set


def _planted(rng: np.random.Generator, n: int = 400, d: int = 16, scale: np.ndarray | None = None):
    direction = rng.normal(size=d)
    direction /= np.linalg.norm(direction)
    y = rng.integers(0, 2, size=n)
    X = rng.normal(size=(n, d)) + np.outer(2.0 * y - 1.0, direction) * 2.0
    if scale is not None:
        X = X * scale + 5.0  # unit and offset changes that standardisation must undo
    return X, y, direction


def test_sklearn_contract():
    # One call rather than parametrize_with_checks: scikit-learn skips its array-API check when
    # SCIPY_ARRAY_API is unset, and we keep the suite free of skipped tests (on_skip=None).
    check_estimator(LogisticProbe(), on_skip=None)


def test_planted_direction_recovered(rng):
    X, y, direction = _planted(rng, n=4000)
    probe = LogisticProbe(C=1.0).fit(X, y)
    cosine = probe.weight_ @ direction / np.linalg.norm(probe.weight_)
    assert cosine > 0.95, f"probe direction cosine {cosine:.3f} with the planted one"
    assert auroc(probe.decision_function(X), y) > 0.95


def test_raw_space_direction_matches_pipeline(rng):
    """weight_/bias_ fold the scaler into the classifier: same logits as scaler -> classifier."""
    X, y, _ = _planted(rng, scale=rng.uniform(0.1, 10, size=16))
    probe = LogisticProbe().fit(X, y)
    expected = probe.classifier_.decision_function(probe.scaler_.transform(X))
    np.testing.assert_allclose(probe.decision_function(X), expected, rtol=1e-8, atol=1e-8)


def test_ensemble_members_differ_and_agree(rng):
    X, y, direction = _planted(rng)
    ps = fit_probe_set(X, y, n_probes=5, subsample=0.7, seed=3, meta={"layer": 2})
    assert ps.n_probes == 5 and ps.meta["seeds"] == [3, 4, 5, 6, 7]
    assert not np.allclose(ps.weight[0], ps.weight[1]), "different subsets must give different probes"
    cosines = ps.weight @ direction / np.linalg.norm(ps.weight, axis=1)
    assert cosines.min() > 0.9
    probs = ps.predict_proba(X)
    assert probs.shape == (len(y),) and (probs >= 0).all() and (probs <= 1).all()


def test_save_load_checks_fingerprint(tmp_path, rng):
    X, y, _ = _planted(rng)
    ps = fit_probe_set(X, y, meta={"hook_name": "blocks.1.hook_resid_post", "layer": 2})
    ps.save(tmp_path / "p")
    loaded = ProbeSet.load(tmp_path / "p", expect={"hook_name": "blocks.1.hook_resid_post", "d_model": 16})
    np.testing.assert_allclose(loaded.decision_function(X), ps.decision_function(X), rtol=1e-5, atol=1e-4)
    assert loaded.meta["fingerprint"] == ps.meta["fingerprint"]
    with pytest.raises(ValueError, match="hook_name"):
        ProbeSet.load(tmp_path / "p", expect={"hook_name": "blocks.5.hook_resid_post"})


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"n_probes": 0}, "n_probes"), ({"subsample": 1.5}, "subsample")]
)
def test_bad_arguments_name_the_parameter(rng, kwargs, match):
    X, y, _ = _planted(rng, n=20)
    with pytest.raises(ValueError, match=match):
        fit_probe_set(X, y, **kwargs)


def test_auroc_single_class_is_nan():
    assert np.isnan(auroc(np.array([0.1, 0.2]), np.array([1, 1])))

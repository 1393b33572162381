"""LayerwiseProbe equals independent per-layer fits."""

from __future__ import annotations

import numpy as np
import pytest

from aligned_probing.probing import LayerwiseProbe, RidgeProbe


def test_equals_independent_fits(rng):
    acts = rng.normal(size=(3, 60, 7))
    y = acts[1] @ rng.normal(size=7) + 0.1 * rng.normal(size=60)
    lw = LayerwiseProbe(RidgeProbe()).fit(acts, y)
    assert lw.n_layers_ == 3 and len(lw.estimators_) == 3
    for layer in range(3):
        single = RidgeProbe().fit(acts[layer], y)
        np.testing.assert_array_equal(lw.estimators_[layer].coef_, single.coef_)
        np.testing.assert_array_equal(lw.predict(acts)[layer], single.predict(acts[layer]))
    scores = lw.score_layers(acts, y)
    assert scores.argmax() == 1 and scores[1] > 0.99
    assert not hasattr(lw.estimator, "coef_")  # the base estimator is cloned, never fitted


def test_shape_errors(rng):
    with pytest.raises(ValueError, match=r"shape \(layers, samples, features\), got shape \(60, 7\)"):
        LayerwiseProbe(RidgeProbe()).fit(rng.normal(size=(60, 7)), rng.normal(size=60))
    lw = LayerwiseProbe(RidgeProbe()).fit(rng.normal(size=(2, 30, 4)), rng.normal(size=30))
    with pytest.raises(ValueError, match="X must have 2 layers"):
        lw.predict(rng.normal(size=(3, 5, 4)))

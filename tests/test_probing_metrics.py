"""Column-wise metrics against numpy/scikit-learn one column at a time."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import mean_squared_error, r2_score

from aligned_probing.probing._metrics import regression_metrics


def test_against_reference(rng):
    y, p = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    p[:, 1] = y[:, 1] * 2 + 1  # perfect linear relation: r = 1, R^2 < 1
    m = regression_metrics(y, p)
    for j in range(3):
        assert np.isclose(m["pearson"][j], np.corrcoef(y[:, j], p[:, j])[0, 1])
        assert np.isclose(m["r2"][j], r2_score(y[:, j], p[:, j]))
        assert np.isclose(m["rmse"][j], np.sqrt(mean_squared_error(y[:, j], p[:, j])))
    assert np.isclose(m["pearson"][1], 1.0)


def test_constant_columns_give_nan(rng):
    y = np.column_stack([np.full(10, 0.3), rng.normal(size=10)])
    m = regression_metrics(y, rng.normal(size=(10, 2)))
    assert np.isnan(m["pearson"][0]) and np.isnan(m["r2"][0]) and np.isfinite(m["pearson"][1])
    assert np.isnan(regression_metrics(y[:1], y[:1])["pearson"]).all()

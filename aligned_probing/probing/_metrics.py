"""Column-wise test metrics for many targets at once (one call per fitted probe)."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson r, R^2 and RMSE of each column of `y_true` `[n, k]` against `y_pred` `[n, k]`.

    - pearson = cov(y, yhat) / (sd(y) sd(yhat)), in [-1, 1]; NaN when either column is constant
      (undefined) or n < 2. Computed by `scipy.stats.pearsonr(axis=0)`.
    - r2 = 1 - sum (y - yhat)^2 / sum (y - mean y)^2, in (-inf, 1] (out-of-sample, so it can be negative);
      NaN when y is constant.
    - rmse = sqrt(mean (y - yhat)^2), in [0, inf).

    Returns:
        {"pearson", "r2", "rmse"}, each `[k]`.
    """
    n, k = y_true.shape
    if n < 2:
        nan = np.full(k, np.nan)
        return {"pearson": nan, "r2": nan.copy(), "rmse": np.sqrt(np.mean((y_true - y_pred) ** 2, axis=0))}
    with warnings.catch_warnings():
        # Constant columns give NaN; callers count them and warn once per run.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        pearson = np.asarray(stats.pearsonr(y_true, y_pred, axis=0).statistic, dtype=np.float64)
    sse = np.sum((y_true - y_pred) ** 2, axis=0)
    sst = np.sum((y_true - y_true.mean(axis=0)) ** 2, axis=0)
    varying = np.ptp(y_true, axis=0) > 0  # exact test: sst of a constant column is only ~0 in floating point
    r2 = np.full(k, np.nan)
    r2[varying] = 1.0 - sse[varying] / sst[varying]
    return {"pearson": pearson, "r2": r2, "rmse": np.sqrt(sse / n)}

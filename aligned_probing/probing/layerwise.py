"""`LayerwiseProbe`: one clone of a base estimator per layer, fitted on `[layers, samples, features]`."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted


class LayerwiseProbe(BaseEstimator):
    """Fit a clone of `estimator` on every layer's activations, as `MultiOutputRegressor` does per target.

    Args:
        estimator: An unfitted scikit-learn regressor (e.g. `RidgeProbe()`); it is cloned per layer.

    Attributes:
        estimators_: The fitted clones, `estimators_[l]` for layer l.
        n_layers_: Number of layers seen in `fit`.

    Example:
        >>> lw = LayerwiseProbe(RidgeProbe()).fit(acts, y)  # acts: [layers, samples, d_model]
        >>> lw.score_layers(acts_test, y_test)  # R^2 per layer
    """

    def __init__(self, estimator: Any):
        self.estimator = estimator

    @staticmethod
    def _check_3d(X: Any) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 3:
            raise ValueError(f"X must have shape (layers, samples, features), got shape {X.shape}.")
        return X

    def fit(self, X: Any, y: Any) -> LayerwiseProbe:
        """Fit one clone per layer of `X` `[layers, samples, features]` on the same targets `y`."""
        X = self._check_3d(X)
        self.estimators_ = [clone(self.estimator).fit(X[layer], y) for layer in range(X.shape[0])]
        self.n_layers_ = X.shape[0]
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions `[layers, samples(, targets)]`, layer l from `estimators_[l]`."""
        check_is_fitted(self)
        X = self._check_3d(X)
        if X.shape[0] != self.n_layers_:
            raise ValueError(f"X must have {self.n_layers_} layers (as in fit), got {X.shape[0]}.")
        return np.stack([est.predict(X[layer]) for layer, est in enumerate(self.estimators_)])

    def score_layers(self, X: Any, y: Any) -> np.ndarray:
        """Each layer's `estimator.score` (R^2 for regressors) on `X[l]`, `y`, as a `[layers]` array."""
        check_is_fitted(self)
        X = self._check_3d(X)
        return np.array([est.score(X[layer], y) for layer, est in enumerate(self.estimators_)])

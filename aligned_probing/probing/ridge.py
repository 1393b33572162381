"""`RidgeProbe`: a scikit-learn regressor for layer-wise probing (standardise, ridge, LOO-selected alpha).

One fit handles every target (attribute) at once and every alpha at once: the training data are
standardised, one eigendecomposition is taken, and each target gets the alpha with the smallest exact
leave-one-out error on the *training* data. Nothing is fitted on test data (the reference code min-max
scaled its labels on the whole data set).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

from aligned_probing.probing._gcv import ridge_gcv

if TYPE_CHECKING:  # persistence imports this module; import it lazily at run time
    from aligned_probing.probing.persistence import ProbeFingerprint

#: Default penalty grid for standardised features: 1e-2 .. 1e6 in half-decade steps (17 values).
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(10.0**e) for e in np.arange(-2.0, 6.01, 0.5))


def _target_names(y: Any) -> list[str] | None:
    if isinstance(y, pd.DataFrame):
        return [str(c) for c in y.columns]
    if isinstance(y, pd.Series) and y.name is not None:
        return [str(y.name)]
    return None


def _check_alphas(alphas: Any) -> np.ndarray:
    values = np.asarray(alphas, dtype=np.float64).reshape(-1)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"alphas must be a non-empty sequence of finite values > 0, got {alphas!r}.")
    return values


class RidgeProbe(RegressorMixin, BaseEstimator):
    """Standardised ridge regression with one alpha per target chosen by leave-one-out error.

    Features are standardised with the training mean and standard deviation (`StandardScaler`), the
    ridge solution is computed in closed form, and the learned `coef_` and `intercept_` are mapped back
    to the original feature space, so `predict(X) = X @ coef_.T + intercept_` and `direction()` gives a
    vector that can be added to raw residual activations (steering).

    Args:
        alphas: Penalty grid (> 0) on the standardised features; the selected value per target is
            `alpha_`. A single value fixes alpha.

    Attributes:
        coef_: `[n_targets, n_features]` (or `[n_features]` for a 1-D `y`) in the original feature space.
        intercept_: `[n_targets]` (or a float).
        alpha_: Selected penalty per target (or a float).
        loo_mse_: Leave-one-out mean squared error on the training data at `alpha_`.
        x_mean_, x_scale_: The standardisation fitted on the training data, `[n_features]`.
        target_names_: Target names (the columns of a DataFrame `y`, else "0", "1", ...).
        n_features_in_: Number of features seen in `fit`.

    Example:
        >>> probe = RidgeProbe().fit(X_train, targets[["toxicity", "insult"]])
        >>> r = np.corrcoef(probe.predict(X_test)[:, 0], y_test)[0, 1]
        >>> v = probe.direction("toxicity")  # unit vector in activation space
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS):
        self.alphas = alphas

    def __sklearn_tags__(self):  # noqa: D105
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> RidgeProbe:
        """Standardise `X`, fit every target and alpha at once, and keep the LOO-best alpha per target.

        Args:
            X: Features `[n_samples, n_features]`.
            y: Targets `[n_samples]` or `[n_samples, n_targets]` (a DataFrame names the targets).

        Returns:
            self.
        """
        names = _target_names(y)
        alphas = _check_alphas(self.alphas)
        X, y = validate_data(
            self, X, y, multi_output=True, y_numeric=True, dtype=np.float64, ensure_min_samples=2
        )
        y2 = y.reshape(len(y), -1)
        scaler = StandardScaler().fit(X)
        fit = ridge_gcv(scaler.transform(X), y2, alphas)
        coef = fit.coef / scaler.scale_  # back to the original feature space
        intercept = fit.y_mean - coef @ scaler.mean_
        self.x_mean_, self.x_scale_ = scaler.mean_, scaler.scale_
        self.target_names_ = names if names is not None else [str(i) for i in range(y2.shape[1])]
        if y.ndim == 1:
            self.coef_, self.intercept_ = coef[0], float(intercept[0])
            self.alpha_, self.loo_mse_ = float(fit.alpha[0]), float(fit.loo_mse[0])
        else:
            self.coef_, self.intercept_, self.alpha_, self.loo_mse_ = coef, intercept, fit.alpha, fit.loo_mse
        return self

    def predict(self, X: Any) -> np.ndarray:
        """Predictions `[n_samples]` or `[n_samples, n_targets]` (same dimensionality as the fitted `y`)."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return X @ self.coef_.T + self.intercept_

    def direction(self, attribute: str | int = 0) -> np.ndarray:
        """Unit probe direction `coef / ||coef||` of one target, in the original (raw activation) space.

        This is the direction along which the probe's prediction rises fastest per unit of activation
        norm, i.e. what steering adds or subtracts.

        Args:
            attribute: A target name from `target_names_`, or its position.

        Returns:
            A float64 vector `[n_features]` of unit Euclidean norm.
        """
        check_is_fitted(self)
        if isinstance(attribute, str):
            if attribute not in self.target_names_:
                raise ValueError(f"attribute must be one of {self.target_names_}, got {attribute!r}.")
            index = self.target_names_.index(attribute)
        elif isinstance(attribute, int | np.integer) and 0 <= attribute < len(self.target_names_):
            index = int(attribute)
        else:
            raise ValueError(
                f"attribute must be a target name or an int in [0, {len(self.target_names_) - 1}], "
                f"got {attribute!r}."
            )
        coef = np.atleast_2d(self.coef_)[index]
        norm = float(np.linalg.norm(coef))
        if norm == 0.0:
            raise ValueError(
                f"The probe for {self.target_names_[index]!r} has an all-zero coefficient vector."
            )
        return coef / norm

    def save(self, path: str | Path, fingerprint: ProbeFingerprint) -> Path:
        """Write weights (safetensors) and config plus fingerprint (JSON); see `save_probe`."""
        from aligned_probing.probing.persistence import save_probe

        return save_probe(self, path, fingerprint)

    @classmethod
    def load(cls, path: str | Path, *, expect: ProbeFingerprint | None = None) -> RidgeProbe:
        """Read a probe written by `save`; `expect` (a `ProbeFingerprint`) must match; see `load_probe`."""
        from aligned_probing.probing.persistence import load_probe

        return load_probe(path, expect=expect)
